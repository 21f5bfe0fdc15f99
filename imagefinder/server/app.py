"""The HTTP app: create_app, its lifespan, the one table from error code to HTTP status,
and the middleware. Routes live in ``search``, ``browse`` and ``writes``.

Every error, including FastAPI's own validation errors, leaves in one shape:
``{"error": {"status": 413, "code": "too_large", "message": "..."}}``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..config import Settings
from ..errors import ImageFinderError
from ..service import Indexes, Service
from . import browse, observe, search, writes
from .deps import error_response

log = logging.getLogger("imagefinder")

# Multipart framing and the small form fields ride on top of the file itself.
BODY_SLACK = 64 * 1024

# Every error code the package raises, and the HTTP status it answers with.
STATUS = {
    "not_an_image": 400,
    "empty_upload": 400,
    "invalid_catalog": 400,
    "unauthorized": 401,
    "writes_disabled": 403,
    "metrics_disabled": 403,
    "unknown_id": 404,
    "file_missing": 404,
    "not_found": 404,
    "unknown_index": 404,
    "method_not_allowed": 405,
    "too_large": 413,
    "too_many_pixels": 413,
    "invalid_request": 422,
    "invalid_id": 422,
    "text_not_supported": 422,
    "index_missing": 503,
    "index_empty": 503,
    "index_unusable": 503,
    "model_unavailable": 503,
    "invalid_setting": 503,
    "remote_error": 502,  # raised by the CLI's HTTP client, never by a route
}


def error_for(exc: ImageFinderError) -> JSONResponse:
    """The answer to ``exc``: its code's status, its message, in the one shape."""
    status = STATUS.get(exc.code, 500)
    response = error_response(status, exc.code, exc.message)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Refuse bodies over the cap while they stream in, never buffering them whole."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, "too_large", self._message())(scope, receive, send)
            return
        seen = 0
        too_large = started = False

        async def limited_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large:
                return  # whatever the app makes of the aborted body, ours is the answer
            started = started or message["type"] == "http.response.start"
            await send(message)

        with suppress(_BodyTooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if too_large and not started:
            await error_response(413, "too_large", self._message())(scope, receive, send)

    def _message(self) -> str:
        return f"request body over the limit of {self.max_bytes - BODY_SLACK:,} bytes"


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    settings = settings or (service.settings if service else Settings.from_env())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        indexes = Indexes(settings, [service] if service else ())
        app.state.indexes = indexes
        app.state.service = indexes.default
        # Load each model once, now, if its index says which one; otherwise on the
        # first search after an index appears. A database server still starting, or a
        # weights file gone: serve anyway, loudly; that index's searches answer 503 with
        # the message until it is fixed.
        for name, problem in await run_in_threadpool(indexes.load_models):
            log.error("cannot serve searches from index %r yet: %s", name, problem)
        # A large SQLite index's codes (2 GB at 1M images) are read in the background:
        # the server answers at once, its first searches at disk speed.
        threading.Thread(target=indexes.warm, name="warm-indexes", daemon=True).start()
        try:
            yield
        finally:
            indexes.close()

    app = FastAPI(
        title="ImageFinder",
        version=__version__,
        description="Find the catalogue images that look most like an uploaded photo.",
        lifespan=lifespan,
    )
    if service is not None:
        app.state.indexes = Indexes(settings, [service])
        app.state.service = service

    @app.exception_handler(ImageFinderError)
    async def _known_error(request: Request, exc: ImageFinderError) -> JSONResponse:
        return error_for(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; see the server log")

    app.include_router(search.router)
    app.include_router(writes.router)
    browse.install(app)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + BODY_SLACK)
    # Request ids, one log line per request, /metrics (observe.py, logs.py, metrics.py).
    observe.install(app, settings)
    return app
