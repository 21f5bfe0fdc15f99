"""Security headers on every response: what the browser may load, run and frame.

- ``Content-Security-Policy``: the page loads scripts, styles and images from this
  server only (plus ``blob:``/``data:`` images: the user's own upload, the icon);
  ``/docs`` and ``/redoc`` also need inline styles (Swagger UI and ReDoc set them from
  script) and ReDoc a ``blob:`` worker; everything else (JSON, images) may load nothing.
  ``frame-ancestors 'none'`` everywhere: no page of this server is framed (clickjacking).
- ``X-Content-Type-Options: nosniff``: a browser takes each response as its declared
  type (catalogue images are served with the type sniffed from their bytes).
- ``Referrer-Policy: no-referrer``; ``X-Frame-Options: DENY`` for older browsers.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_COMMON = "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    f"connect-src 'self'; {_COMMON}"
)
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    f"img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src blob:; {_COMMON}"
)
API_CSP = f"default-src 'none'; {_COMMON}; sandbox"

HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def policy_for(path: str) -> str:
    if path == "/":
        return PAGE_CSP
    if path in ("/docs", "/redoc"):
        return DOCS_CSP
    return API_CSP


class SecurityHeaders:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = policy_for(scope.get("path", ""))

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
                headers.setdefault("Content-Security-Policy", policy)
            await send(message)

        await self.app(scope, receive, with_headers)
