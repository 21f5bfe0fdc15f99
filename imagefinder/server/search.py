"""Searching: upload an image or type a text, get the nearest catalogue images; and the
health check. Every search route takes the same options (``SearchParams``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool

from ..errors import InvalidRequest
from ..query import MAX_QUERIES
from .deps import IndexesDep, answer, read_upload
from .schemas import TEXT_ERRORS, UPLOAD_ERRORS, Health, SearchParams, SearchResponse, TextQuery

router = APIRouter()


@router.post(
    "/similarity-search",
    response_model=SearchResponse,
    responses=UPLOAD_ERRORS,
    summary="The k catalogue images nearest to an uploaded image, or to several",
)
async def similarity_search(
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
    return await answer(service, service.search_uploads, uploads, options)


@router.post(
    "/text-search",
    response_model=SearchResponse,
    responses=TEXT_ERRORS,
    summary="The k catalogue images that best match a text (indexes whose model embeds text)",
)
async def text_search(indexes: IndexesDep, params: Annotated[TextQuery, Form()]) -> dict[str, Any]:
    service = indexes.get(params.index)
    return await answer(service, service.search_text, params.q, params.options())


@router.get("/health", response_model=Health, summary="Status, model and vector count")
async def health(indexes: IndexesDep) -> dict[str, Any]:
    return await run_in_threadpool(indexes.health)
