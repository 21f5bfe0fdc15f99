"""The HTTP app: create_app, its lifespan, the one table from error code to HTTP status,
and the middleware. Routes live in ``search``, ``browse`` and ``writes``.

Every error, including FastAPI's own validation errors, leaves in one shape:
``{"error": {"status": 413, "code": "too_large", "message": "..."}}``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__, images, memory
from ..config import Settings
from ..errors import Busy, ImageFinderError
from ..indexes import Indexes
from ..redact import redact
from ..service import Service
from . import browse, docs, duplicates, health, jobs, observe, search, writes
from .decoders import Decoders
from .deps import error_response
from .gate import Gate
from .headers import SecurityHeaders
from .health import HealthCheck
from .runner import JobRunner

log = logging.getLogger("imagefinder")

# Multipart framing and the small form fields ride on top of the file itself.
BODY_SLACK = 64 * 1024
# After IMAGEFINDER_BODY_TIMEOUT seconds a body must average this many bytes a second:
# a 20 MB upload may take half an hour, a dripping client is cut off.
BODY_MIN_RATE = 10_000

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
    "unknown_job": 404,
    "job_finished": 409,
    "too_many_jobs": 429,
    "too_many_files": 413,
    "too_many_rows": 413,
    "method_not_allowed": 405,
    "too_large": 413,
    "too_many_pixels": 413,
    "too_complex": 413,
    "invalid_request": 422,
    "invalid_id": 422,
    "text_not_supported": 422,
    "not_calibrated": 422,
    "busy": 503,
    "index_missing": 503,
    "index_empty": 503,
    "index_unusable": 503,
    "model_unavailable": 503,
    "invalid_setting": 503,
    "request_timeout": 408,
    "remote_error": 502,  # raised by the CLI's HTTP client, never by a route
}


def error_for(exc: ImageFinderError, settings: Settings | None = None) -> JSONResponse:
    """The answer to ``exc``: its code's status, its message (with no path or credential
    in it: anyone may read it), in the one shape."""
    status = STATUS.get(exc.code, 500)
    response = error_response(status, exc.code, redact(exc.message, settings))
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, Busy):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


class _BodyTooLarge(Exception):
    pass


class _BodyTooSlow(Exception):
    pass


class BodyLimits:
    """Refuse bodies over the cap while they stream in, never buffering them whole, and
    bodies that arrive too slowly: after ``grace`` seconds a body must keep an average of
    ``min_rate`` bytes a second (a client dripping a byte a second would otherwise hold
    its connection, and a place in the queue, for ever). A response sent before the body
    is complete closes the connection, so the rest is never waited for."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        grace: float,
        min_rate: float,
        larger: dict[tuple[str, str], int] | None = None,
    ):
        self.app = app
        self.max_bytes = max_bytes
        # (method, path) -> a larger cap for that route (POST /jobs: many files at once)
        self.larger = larger or {}
        self.grace = grace
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        cap = self.larger.get((scope.get("method", ""), scope.get("path", "")), self.max_bytes)
        if declared.isdigit() and int(declared) > cap:
            await _closing(error_response(413, "too_large", self._message(cap)), scope, send)
            return
        seen = 0
        started_at = time.monotonic()
        body_done = not (declared.isdigit() and int(declared) > 0) and (
            b"chunked" not in headers.get(b"transfer-encoding", b"")
        )
        failure: type[Exception] | None = None
        started = False

        async def limited_receive() -> Message:
            nonlocal seen, failure, body_done
            if body_done:  # the body is in: what follows is a wait for the disconnect
                return await receive()
            allowed = started_at + self.grace + seen / self.min_rate - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.01, allowed))
            except TimeoutError:
                failure = _BodyTooSlow
                raise _BodyTooSlow from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > cap:
                    failure = _BodyTooLarge
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if failure is not None:
                return  # whatever the app makes of the aborted body, ours is the answer
            if message["type"] == "http.response.start":
                started = True
                if not body_done:  # answered early: do not wait for the rest of the body
                    message = {**message, "headers": [*message["headers"], CLOSE]}
            await send(message)

        with suppress(_BodyTooLarge, _BodyTooSlow):
            await self.app(scope, limited_receive, guarded_send)
        if failure is not None and not started:
            if failure is _BodyTooLarge:
                answer = error_response(413, "too_large", self._message(cap))
            else:
                answer = error_response(
                    408,
                    "request_timeout",
                    f"the request body arrived too slowly (under {self.min_rate:,.0f} bytes "
                    f"a second after {self.grace:g} s)",
                )
            await _closing(answer, scope, send)

    def _message(self, cap: int) -> str:
        return f"request body over the limit of {cap - BODY_SLACK:,} bytes"


CLOSE = (b"connection", b"close")


async def _closing(response: JSONResponse, scope: Scope, send: Send) -> None:
    """Send ``response`` and close the connection (its request body is not read)."""
    response.headers["Connection"] = "close"

    async def no_body() -> Message:
        return {"type": "http.disconnect"}

    await response(scope, no_body, send)


def raise_file_limit() -> None:
    """Lift the soft limit on open files to the hard one: each idle client holds a
    socket, and at the soft limit (often 1024) accept() fails for everyone, /health
    included."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed: keep the limit
        pass


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log asyncio's "accept() out of system resource" once a minute, not once per retry:
    at the open-file limit it logged a million lines in seconds."""
    previous = loop.get_exception_handler()
    last = [-60.0]

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "out of system resource" in str(context.get("message", "")):
            if time.monotonic() - last[0] < 60:
                return
            last[0] = time.monotonic()
            log.error("out of open files: new connections wait (%s)", context.get("exception"))
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    settings = settings or (service.settings if service else Settings.from_env())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        indexes = Indexes(settings, [service] if service else ())
        app.state.indexes = indexes
        app.state.service = indexes.default
        decoders = Decoders(settings.decode_processes) if settings.decode_processes else None
        for svc in indexes:
            if decoders is not None:
                svc.decoder = decoders
        raise_file_limit()
        quiet_accept_errors(asyncio.get_running_loop())
        memory.map_large_blocks()  # upload buffers go back to the OS when freed
        # Load each model once, now, if its index says which one; otherwise on the
        # first search after an index appears. A database server still starting, or a
        # weights file gone: serve anyway, loudly; that index's searches answer 503 with
        # the message until it is fixed.
        for name, problem in await run_in_threadpool(indexes.load_models):
            log.error("cannot serve searches from index %r yet: %s", name, problem)
        # A large SQLite index's codes (2 GB at 1M images) are read in the background:
        # the server answers at once, its first searches at disk speed.
        threading.Thread(target=indexes.warm, name="warm-indexes", daemon=True).start()
        # Ingestion jobs: kept in the default index, run one at a time through the gate.
        runner = JobRunner(indexes.default, app.state.gate)
        app.state.runner = runner
        runner.start()
        try:
            yield
        finally:
            await run_in_threadpool(runner.stop)
            indexes.close()
            if decoders is not None:
                decoders.close()
                for svc in indexes:
                    svc.decoder = images
            app.state.gate.close()
            app.state.duplicates_gate.close()
            app.state.health.close()

    app = FastAPI(
        title="ImageFinder",
        version=__version__,
        description="Find the catalogue images that look most like an uploaded photo.",
        lifespan=lifespan,
        docs_url=None,  # docs.install: offline assets, no inline script
        redoc_url=None,
    )
    if service is not None:
        app.state.indexes = Indexes(settings, [service])
        app.state.service = service
    app.state.gate = Gate(settings.max_concurrency, settings.max_queue)
    # A duplicate report reads every vector of an index: one at a time on the server,
    # others told to come back (duplicates.py).
    app.state.duplicates_gate = Gate(1, 0, work="duplicate report being computed", seconds=5)
    app.state.health = HealthCheck()

    @app.exception_handler(ImageFinderError)
    async def _known_error(request: Request, exc: ImageFinderError) -> JSONResponse:
        return error_for(exc, settings)

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

    app.include_router(health.router)
    app.include_router(search.router)
    app.include_router(duplicates.router)
    app.include_router(writes.router)
    app.include_router(jobs.router)
    browse.install(app)
    docs.install(app)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(
        BodyLimits,
        max_bytes=settings.max_upload_bytes + BODY_SLACK,
        grace=settings.body_timeout,
        min_rate=BODY_MIN_RATE,
        larger={("POST", "/jobs"): settings.job_max_bytes + BODY_SLACK},
    )
    # Request ids, one log line per request, /metrics (observe.py, logs.py, metrics.py).
    observe.install(app, settings)
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, errors included
    return app
