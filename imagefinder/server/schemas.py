"""The API's response bodies, and the error answers each route documents in OpenAPI."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from ..metadata import MAX_FILTERS, parse_filter
from ..query import MAX_DEPTH, MAX_K, MAX_TEXT, SearchOptions


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
    offset: int = Field(
        0,
        ge=0,
        lt=MAX_DEPTH,
        description=f"Results to skip (paging): this page is results offset..offset+k-1 of "
        f"one ranking; k + offset <= {MAX_DEPTH}. The response's next_offset is the next "
        "page's offset, or null",
    )
    max_distance: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="Drop results farther than this L2 distance (0 = identical; the same "
        "distance the results carry), so fewer than k may come back",
    )
    filter: list[str] = Field(
        [],
        max_length=MAX_FILTERS,
        description="Metadata column=value, e.g. category=shoes; repeat for several "
        "(all must hold). Applied inside the search: k results come back when k "
        "matching images exist",
    )

    def options(self) -> SearchOptions:
        return SearchOptions(
            k=self.k,
            expand=self.expand,
            offset=self.offset,
            max_distance=self.max_distance,
            where=parse_filter(self.filter),
        )


class TextQuery(SearchParams):
    q: str = Field(min_length=1, max_length=MAX_TEXT, description="What to look for, in words")


class Neighbour(BaseModel):
    id: str
    distance: float = Field(description="L2 distance between the query's and the image's vectors")
    match: Literal["exact", "near"] | None = Field(
        None,
        description="exact: the same file content as a query image; near: the same picture "
        "re-encoded, resized, cropped a little, rotated, overlaid or colour-shifted (within "
        "the model's calibrated distance; never for a model without calibration); else null",
    )
    metadata: dict[str, str] = Field({}, description="The image's metadata columns")


class SearchResponse(BaseModel):
    model: str
    metric: str
    results: list[Neighbour]
    next_offset: int | None = Field(
        None, description="The offset of the next page, or null when there is none"
    )


class DuplicateImage(BaseModel):
    id: str
    distance: float = Field(description="L2 distance to the group's first image")


class DuplicateGroup(BaseModel):
    images: list[DuplicateImage] = Field(
        description="The group's representative first (the image most others are within "
        "the distance of), then the rest by distance to it"
    )


class DuplicatesResponse(BaseModel):
    level: Literal["exact", "near", "similar"]
    max_distance: float | None = Field(
        description="The level's distance for this index's model (null for exact)"
    )
    images: int = Field(description="Images in the index")
    total_groups: int
    groups: list[DuplicateGroup]
    next_offset: int | None = Field(description="The offset of the next page of groups, or null")


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
DUPLICATES_ERRORS = errors(
    _404="No index with this name",
    _422="Invalid parameter, or a level the index's model has no calibrated distance for "
    "(not_calibrated)",
    _503="The index is missing or empty; or another request's report is being computed "
    "(busy, with Retry-After)",
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
