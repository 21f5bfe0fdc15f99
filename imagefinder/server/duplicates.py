"""Duplicates: the groups of images in an index that are the same file, the same
picture, or alike (``duplicates.py`` defines the levels)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from .. import duplicates
from .deps import IndexesDep
from .gate import Gate
from .schemas import DUPLICATES_ERRORS, DuplicatesResponse

router = APIRouter(tags=["browse"])
MAX_GROUPS = 1000


@router.get(
    "/duplicates",
    response_model=DuplicatesResponse,
    responses=DUPLICATES_ERRORS,
    summary="Groups of duplicate images in the index, largest first",
    description="level=exact: the same file content. near: the same picture re-encoded, "
    "resized, cropped a little, rotated by EXIF, overlaid or colour-shifted (vectors "
    "within the model's calibrated near distance). similar: a looser calibrated cut "
    "(alike pictures). Models without calibration offer exact only. The report is "
    "computed over the whole index and reused for up to a minute while the image count "
    "is unchanged.",
)
async def get_duplicates(
    request: Request,
    indexes: IndexesDep,
    level: Annotated[
        Literal["exact", "near", "similar"], Query(description="How alike a group's images are")
    ] = "near",
    index: Annotated[
        str | None,
        Query(max_length=64, description="Which index (a name from /health); default: the first"),
    ] = None,
    offset: Annotated[int, Query(ge=0, description="Groups to skip (paging)")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_GROUPS, description="Groups in this page")] = 100,
) -> dict[str, Any]:
    service = indexes.get(index)
    report = await run_in_threadpool(service.cached_duplicates, level)
    if report is None:
        # One report at a time on the server; another request meanwhile is told to come
        # back (503 busy, Retry-After) rather than hold a thread for the whole pass.
        gate: Gate = request.app.state.duplicates_gate
        with gate.admit():
            report = await gate.run(service.duplicate_report, level)
    return duplicates.as_json(report, offset, limit)
