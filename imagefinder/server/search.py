"""Searching: upload an image or type a text, get the nearest catalogue images. Every
search route takes the same options (``SearchParams``) and runs through the gate (the
health check is in ``health.py``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile

from ..errors import InvalidRequest
from ..query import MAX_QUERIES
from .deps import IndexesDep, read_upload
from .gate import GatedRoute, gate_of
from .schemas import TEXT_ERRORS, UPLOAD_ERRORS, SearchParams, SearchResponse, TextQuery

router = APIRouter(route_class=GatedRoute)


@router.post(
    "/similarity-search",
    response_model=SearchResponse,
    responses=UPLOAD_ERRORS,
    summary="The k catalogue images nearest to an uploaded image, or to several",
)
async def similarity_search(
    request: Request,
    indexes: IndexesDep,
    file: Annotated[
        list[UploadFile],
        File(
            description="An image (JPEG, PNG, GIF, WebP, BMP, TIFF). Repeat the part for "
            f"several ('more like these', at most {MAX_QUERIES}): they are searched as one, "
            "the normalised mean of their vectors, and those that are catalogue images "
            "(the same file content) are left out of the results"
        ),
    ],
    params: Annotated[SearchParams, Form()],
) -> dict[str, Any]:
    service = indexes.get(params.index)
    options = params.options()
    if len(file) > MAX_QUERIES:
        raise InvalidRequest(f"at most {MAX_QUERIES} images per search, not {len(file)}")
    uploads = [await read_upload(f, service) for f in file]
    # Several images take one place in the gate: they are decoded one after another.
    return await gate_of(request).run(
        lambda: service.response(service.search_uploads(uploads, options))
    )


@router.post(
    "/text-search",
    response_model=SearchResponse,
    responses=TEXT_ERRORS,
    summary="The k catalogue images that best match a text (indexes whose model embeds text)",
)
async def text_search(
    request: Request, indexes: IndexesDep, params: Annotated[TextQuery, Form()]
) -> dict[str, Any]:
    service = indexes.get(params.index)
    return await gate_of(request).run(
        lambda: service.response(service.search_text(params.q, params.options()))
    )
