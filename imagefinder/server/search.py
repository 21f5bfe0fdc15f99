"""Searching: upload an image, get its nearest catalogue images (through the gate)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile

from .deps import ServiceDep, read_upload
from .gate import GatedRoute, gate_of
from .schemas import UPLOAD_ERRORS, SearchResponse

router = APIRouter(route_class=GatedRoute)


@router.post(
    "/similarity-search",
    response_model=SearchResponse,
    responses=UPLOAD_ERRORS,
    summary="The k catalogue images nearest to an uploaded image",
)
async def similarity_search(
    request: Request,
    service: ServiceDep,
    file: Annotated[UploadFile, File(description="An image (JPEG, PNG, GIF, WebP, BMP, TIFF)")],
    k: Annotated[int, Form(ge=1, le=100, description="How many neighbours")] = 3,
) -> dict[str, Any]:
    data = await read_upload(file, service)
    return await gate_of(request).run(lambda: service.response(service.search_bytes(data, k)))
