"""Searching: upload an image, get its nearest catalogue images; and the health check."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool

from .deps import ServiceDep, read_upload
from .schemas import UPLOAD_ERRORS, Health, SearchResponse

router = APIRouter()


@router.post(
    "/similarity-search",
    response_model=SearchResponse,
    responses=UPLOAD_ERRORS,
    summary="The k catalogue images nearest to an uploaded image",
)
async def similarity_search(
    service: ServiceDep,
    file: Annotated[UploadFile, File(description="An image (JPEG, PNG, GIF, WebP, BMP, TIFF)")],
    k: Annotated[int, Form(ge=1, le=100, description="How many neighbours")] = 3,
) -> dict[str, Any]:
    data = await read_upload(file, service)
    results = await run_in_threadpool(service.search_bytes, data, k)
    return service.response(results)


@router.get("/health", response_model=Health, summary="Status, model and vector count")
async def health(service: ServiceDep) -> dict[str, Any]:
    return await run_in_threadpool(service.health)
