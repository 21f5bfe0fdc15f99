"""The browsing side: the search page, catalogue images, thumbnails and similar images.

An id only ever selects a row of the index; the file served is the path that row
recorded when the image was indexed, so no id (``../x``, ``/etc/passwd``, NUL...)
can reach a file outside the catalogue.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from ..errors import ImageError, NotFound, unknown_id
from ..images import FORMATS, sniff
from ..redact import redact
from ..service import Service, build_command
from ..store import FileState
from . import thumbs
from .deps import IndexesDep, answer
from .gate import gate_of
from .schemas import ID_ERRORS, NOT_MODIFIED, SearchParams, SearchResponse

STATIC = Path(str(files("imagefinder.server") / "static"))

# A changed image keeps its URL, so clients revalidate every time; a 304 costs one stat.
CACHE_CONTROL = "no-cache"

router = APIRouter(tags=["browse"])

# The index whose catalogue an image route reads (the page passes the one it searches).
IndexParam = Annotated[
    str | None,
    Query(max_length=64, description="Which index (a name from /health); default: the first"),
]


def check_id(image_id: str) -> None:
    # No file name holds a NUL, so no id does; PostgreSQL would refuse it as a 503.
    if "\x00" in image_id:
        raise unknown_id(image_id)


def catalogue_file(service: Service, image_id: str) -> tuple[FileState, thumbs.Version]:
    """The index row behind ``image_id`` and the version of its file on disk, or 404/503."""
    check_id(image_id)
    store = service.store
    state = store.file_state(image_id) if store.meta() else None
    if state is None:
        service.require_index()  # no index at all: a 503 naming the build command
        raise unknown_id(image_id)
    try:
        return state, thumbs.version_of(image_id, state)
    except OSError:
        raise gone(service, image_id) from None


def gone(service: Service, image_id: str) -> NotFound:
    return NotFound(
        f"the file of image {image_id!r} is missing or unreadable; refresh the index with: "
        f"{build_command(service.settings, service.location)} --prune",
        code="file_missing",
    )


def not_modified(request: Request, etag: str) -> Response | None:
    """A 304 if the request's If-None-Match already names ``etag``."""
    header = request.headers.get("if-none-match", "")
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    if "*" in tags or etag in tags:
        return Response(status_code=304, headers=cache_headers(etag))
    return None


def cache_headers(etag: str) -> dict[str, str]:
    return {"ETag": etag, "Cache-Control": CACHE_CONTROL}


def image_content(media_types: Iterable[str]) -> dict[str, Any]:
    return {"content": {m: {"schema": {"type": "string", "format": "binary"}} for m in media_types}}


@router.get(
    "/images/{image_id:path}/thumbnail",
    response_class=Response,
    responses={
        200: {
            "description": f"A JPEG at most {thumbs.SIDE} pixels a side",
            **image_content(["image/jpeg"]),
        },
        **NOT_MODIFIED,
        **ID_ERRORS,
    },
    summary="A small JPEG of a catalogue image, made once and cached",
)
async def get_thumbnail(
    indexes: IndexesDep, image_id: str, request: Request, index: IndexParam = None
) -> Response:
    service = indexes.get(index)
    state, version = await run_in_threadpool(catalogue_file, service, image_id)
    etag = f'"{version.tag}"'
    cached = not_modified(request, etag)
    if cached:
        return cached
    folder = thumbs.cache_dir(service.settings, service.store)
    path = thumbs.cached(folder, version)
    if path is None:  # made once, through the gate like any other decode
        gate = gate_of(request)
        try:
            with gate.admit():
                path = await gate.run(
                    thumbs.thumbnail,
                    folder,
                    version,
                    state.path,
                    service.settings.max_pixels,
                    service.decoder.load_rgb,
                )
        except (ImageError, OSError):
            raise gone(service, image_id) from None
    return FileResponse(path, media_type="image/jpeg", headers=cache_headers(etag))


@router.get(
    "/images/{image_id:path}/similar",
    response_model=SearchResponse,
    responses=ID_ERRORS,
    summary="The k catalogue images nearest to one already in the index (itself excluded)",
)
async def get_similar(
    indexes: IndexesDep, image_id: str, params: Annotated[SearchParams, Query()]
) -> dict[str, Any]:
    service = indexes.get(params.index)
    check_id(image_id)
    return await answer(service, service.search_id, image_id, params.options())


@router.get(
    "/images/{image_id:path}",
    response_class=Response,
    responses={
        200: {
            "description": "The catalogue image, as indexed",
            **image_content(dict.fromkeys(f.media_type for f in FORMATS.values())),
        },
        **NOT_MODIFIED,
        **ID_ERRORS,
    },
    summary="A catalogue image",
)
async def get_image(
    indexes: IndexesDep, image_id: str, request: Request, index: IndexParam = None
) -> Response:
    service = indexes.get(index)
    state, version = await run_in_threadpool(catalogue_file, service, image_id)
    etag = f'"{version.tag}-original"'
    cached = not_modified(request, etag)
    if cached:
        return cached
    try:
        fmt = await run_in_threadpool(sniff, state.path)
    except (ImageError, OSError):
        raise gone(service, image_id) from None
    if fmt not in FORMATS:
        raise gone(service, image_id)
    return FileResponse(state.path, media_type=FORMATS[fmt].media_type, headers=cache_headers(etag))


@router.get(
    "/",
    response_class=HTMLResponse,
    responses={200: {"description": "The search page", "content": {"text/html": {}}}},
    summary="The search page: drop an image, browse its nearest neighbours",
)
async def index_page(indexes: IndexesDep) -> str:
    service = indexes.default
    # The page learns the upload cap so it can refuse a huge file before sending it: a
    # 413 sent while the browser is still uploading can reach it as a reset connection.
    # It also learns the command that builds the index, for when there is none.
    return (
        page_html()
        .replace("{{max_upload_bytes}}", str(service.settings.max_upload_bytes))
        .replace(
            "{{build_command}}",
            html.escape(redact(build_command(service.settings), service.settings)),
        )
    )


@cache
def page_html() -> str:
    return (STATIC / "index.html").read_text(encoding="utf-8")


def install(app: FastAPI) -> None:
    """Add the page, its static files and the browsing routes to ``app``."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
