"""The ASGI app for `uvicorn main:app`; configure it with IMAGEFINDER_* variables."""

import sys

from imagefinder.errors import ImageFinderError
from imagefinder.server.app import create_app

try:
    app = create_app()
except ImageFinderError as e:
    # A bad IMAGEFINDER_* value: one line and a non-zero exit, as the CLI gives, rather
    # than uvicorn's traceback of the import.
    sys.exit(f"Error: {e.message}")
