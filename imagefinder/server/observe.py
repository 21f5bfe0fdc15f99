"""Watching every request: an id (``X-Request-ID``), one log line, and the metrics.

The middleware wraps the whole app, outside even Starlette's handler of unexpected
errors, so it sees exactly what the client gets: a 500 carries its request id and is
counted and logged like any other answer. An error's ``code`` is read from the answer
itself (the one JSON error shape), whichever layer produced it.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Settings
from . import logs, metrics

log = logging.getLogger(logs.REQUEST_LOGGER)

# A request id a client (or the proxy in front) sent is kept if it looks like one;
# anything else is replaced, so no client writes arbitrary text into the log.
CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Error bodies are small JSON objects; nothing larger is parsed for its code.
MAX_ERROR_BODY = 64 * 1024


# "{image_id:path}" -> "{image_id}": the converter says nothing to a reader of the label.
CONVERTER = re.compile(r"\{(\w+):\w+\}")


def route_of(scope: Scope) -> str:
    """The template of the route that answered (``/images/{image_id}``), never the raw
    path, whose values are the client's; ``unmatched`` for a 404."""
    path = getattr(scope.get("route"), "path", None)
    return CONVERTER.sub(r"{\1}", path) if isinstance(path, str) and path else "unmatched"


def error_code(body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return str(error["code"]) if isinstance(error, dict) else ""
    except (ValueError, KeyError, TypeError):
        return ""


class Observe:
    def __init__(self, app: ASGIApp, counters: metrics.Metrics | None):
        self.app = app
        self.counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        # Every record logged while this request is handled carries its id.
        logs.request_id.set(rid)
        # 499 (as nginx logs it): the client went away before any answer started. An
        # exception still passes through send_observed as Starlette's 500.
        status, code = 499, ""
        read_code = False

        async def send_observed(message: Message) -> None:
            nonlocal status, code, read_code
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = rid
                read_code = status >= 400 and headers.get("content-type", "").startswith(
                    "application/json"
                )
            elif message["type"] == "http.response.body" and read_code:
                read_code = False  # the first chunk: error answers come in one
                body = message.get("body", b"")
                if len(body) <= MAX_ERROR_BODY:
                    code = error_code(body)
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            self._record(scope, rid, status, code, time.perf_counter() - start)

    def _record(self, scope: Scope, rid: str, status: int, code: str, seconds: float) -> None:
        method = str(scope.get("method", ""))
        route = route_of(scope)
        client = scope.get("client")
        fields: dict[str, Any] = {
            "method": method,
            "path": str(scope.get("path", "")),
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
            "client": f"{client[0]}:{client[1]}" if client else "-",
            "code": code or None,
            "request_id": rid,
        }
        level = logging.ERROR if status >= 500 else logging.INFO
        log.log(level, "%s %s %s", method, route, status, extra=fields)
        if self.counters is not None:
            self.counters.observe(method, route, status, seconds, code)


def install(app: FastAPI, settings: Settings) -> None:
    """Logging in the configured format, ``/metrics``, and the middleware around it all.

    The middleware goes around the stack Starlette builds (``build_middleware_stack``),
    not inside it with ``add_middleware``: only from there does it see the 500s that
    Starlette's outermost layer makes of unexpected errors."""
    logs.configure(settings)
    counters = metrics.install(app, settings)
    build = app.build_middleware_stack

    def build_observed() -> ASGIApp:
        return Observe(build(), counters)

    app.build_middleware_stack = build_observed  # type: ignore[method-assign]
