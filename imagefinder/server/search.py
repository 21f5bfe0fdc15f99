"""Searching: upload an image or type a text, get the nearest catalogue images; and the
health check. Every search route takes the same options (``SearchParams``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool

from .deps import IndexesDep, read_upload
from .schemas import TEXT_ERRORS, UPLOAD_ERRORS, Health, SearchParams, SearchResponse, TextQuery

router = APIRouter()


@router.post(
    "/similarity-search",
    response_model=SearchResponse,
    responses=UPLOAD_ERRORS,
    summary="The k catalogue images nearest to an uploaded image",
)
async def similarity_search(
    indexes: IndexesDep,
    file: Annotated[UploadFile, File(description="An image (JPEG, PNG, GIF, WebP, BMP, TIFF)")],
    params: Annotated[SearchParams, Form()],
) -> dict[str, Any]:
    service = indexes.get(params.index)
    options = params.options()
    data = await read_upload(file, service)
    results = await run_in_threadpool(service.search_bytes, data, options)
    return service.response(results)


@router.post(
    "/text-search",
    response_model=SearchResponse,
    responses=TEXT_ERRORS,
    summary="The k catalogue images that best match a text (indexes whose model embeds text)",
)
async def text_search(indexes: IndexesDep, params: Annotated[TextQuery, Form()]) -> dict[str, Any]:
    service = indexes.get(params.index)
    results = await run_in_threadpool(service.search_text, params.q, params.options())
    return service.response(results)


@router.get("/health", response_model=Health, summary="Status, model and vector count")
async def health(indexes: IndexesDep) -> dict[str, Any]:
    return await run_in_threadpool(indexes.health)
