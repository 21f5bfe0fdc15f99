"""The API's response bodies, and the error answers each route documents in OpenAPI."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ..query import MAX_K, MAX_TEXT, SearchOptions


class SearchParams(BaseModel):
    """The options every search route takes: form fields on POST, query parameters on
    GET. One declaration, parsed once, into ``query.SearchOptions``."""

    k: int = Field(3, ge=1, le=MAX_K, description="How many neighbours")
    index: str | None = Field(
        None,
        max_length=64,
        description="Which index to search (a name from /health); default: the first",
    )
    expand: bool | None = Field(
        None,
        description="Query expansion (αQE): one more search from the query and its nearest "
        "images; default: the server's IMAGEFINDER_EXPAND",
    )

    def options(self) -> SearchOptions:
        return SearchOptions(k=self.k, expand=self.expand)


class TextQuery(SearchParams):
    q: str = Field(min_length=1, max_length=MAX_TEXT, description="What to look for, in words")


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


class IndexHealth(BaseModel):
    status: str
    index: str
    model: str | None = None
    metric: str | None = None
    dim: int | None = None
    vectors: int = 0
    model_loaded: bool = False
    # Whether the index's model embeds text (POST /text-search), and has DBA on.
    text: bool = False
    dba: bool = False
    detail: str | None = None


class NamedIndexHealth(IndexHealth):
    name: str


class Health(IndexHealth):
    """The default index's health, and every index's under ``indexes``."""

    indexes: list[NamedIndexHealth] = []


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
    _404="No index with this name",
    _413="Upload over the byte cap or the pixel cap",
    _422="Invalid parameter",
    _503="The index is missing or empty",
)
ID_ERRORS = errors(
    _404="No image with this id, or its file is gone; or no index with this name",
    _422="Invalid parameter",
    _503="The index is missing or empty",
)
TEXT_ERRORS = errors(
    _404="No index with this name",
    _422="Invalid parameter, or the index's model embeds images only (text_not_supported)",
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
