"""The API's response bodies, and the error answers each route documents in OpenAPI."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Neighbour(BaseModel):
    id: str
    distance: float


class SearchResponse(BaseModel):
    model: str
    metric: str
    results: list[Neighbour]


class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str
    index: str
    model: str | None = None
    metric: str | None = None
    dim: int | None = None
    vectors: int = 0
    model_loaded: bool = False
    detail: str | None = None


class ImageWritten(BaseModel):
    id: str
    replaced: bool
    format: str
    bytes: int


class ImageDeleted(BaseModel):
    id: str
    file_removed: bool


def errors(**described: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses: ``errors(_404="Unknown id")``."""
    return {
        int(status.lstrip("_")): {"model": ErrorResponse, "description": text}
        for status, text in described.items()
    }


UPLOAD_ERRORS = errors(
    _400="Not an image, or a corrupt or truncated one",
    _413="Upload over the byte cap or the pixel cap",
    _422="Invalid parameter",
    _503="The index is missing or empty",
)
ID_ERRORS = errors(
    _404="No image with this id, or its file is gone",
    _422="Invalid parameter",
    _503="The index is missing or empty",
)
AUTH_ERRORS = {
    **UPLOAD_ERRORS,
    **errors(
        _401="Missing or wrong bearer token",
        _403="Writes disabled: no IMAGEFINDER_API_TOKEN",
    ),
}
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "The client's copy (If-None-Match) is current"}
}
