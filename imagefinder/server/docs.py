"""``/docs`` (Swagger UI) and ``/redoc``, served entirely by this server.

FastAPI's own pages load their scripts from a CDN (a blank page offline) and run an
inline script (which a strict Content-Security-Policy forbids). These pages take their
assets from the ``fastapi-offline`` package and their setup from ``static/docs.js``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(str(files("fastapi_offline") / "static"))
ASSETS_URL = "/docs-assets"

SWAGGER = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>ImageFinder API</title>
  <link rel="icon" href="{ASSETS_URL}/favicon.png">
  <link rel="stylesheet" href="{ASSETS_URL}/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{ASSETS_URL}/swagger-ui-bundle.js"></script>
  <script src="/static/docs.js"></script>
</body>
</html>
"""

REDOC = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>ImageFinder API</title>
  <link rel="icon" href="{ASSETS_URL}/favicon.png">
</head>
<body>
  <redoc spec-url="/openapi.json"></redoc>
  <script src="{ASSETS_URL}/redoc.standalone.js"></script>
</body>
</html>
"""


def install(app: FastAPI) -> None:
    """Add /docs, /redoc and their assets (the app is created with docs_url=None)."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    async def swagger_ui() -> str:
        return SWAGGER

    @app.get("/redoc", include_in_schema=False, response_class=HTMLResponse)
    async def redoc() -> str:
        return REDOC
