"""The ASGI app for `uvicorn main:app`; configure it with IMAGEFINDER_* variables."""

from imagefinder.server.app import create_app

app = create_app()
