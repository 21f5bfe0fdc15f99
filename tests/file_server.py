"""A real HTTP server on 127.0.0.1 serving the files of a folder, for ingestion tests
and the ingestion benchmark.

``hold(name, until)`` makes requests for ``name`` wait until ``until()`` is true (or
``hold_timeout`` passes, then 503): a test can make one download finish only after
something else happened. ``delay`` seconds pass before every answer (a remote host's
round trip, for the ingestion benchmark). Every request's path is counted in ``hits``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FileServer:
    def __init__(self, folder: Path, hold_timeout: float = 30.0, delay: float = 0.0):
        self.folder = folder
        self.delay = delay
        self.hits: Counter[str] = Counter()
        self.holds: dict[str, Callable[[], bool]] = {}
        self.hold_timeout = hold_timeout
        self._lock = threading.Lock()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                name = self.path.lstrip("/")
                with server._lock:
                    server.hits[name] += 1
                if server.delay:
                    time.sleep(server.delay)
                until = server.holds.get(name)
                if until is not None:
                    deadline = time.monotonic() + server.hold_timeout
                    while not until():
                        if time.monotonic() > deadline:
                            self.send_error(503, "held too long")
                            return
                        time.sleep(0.05)
                super().do_GET()

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
        self._httpd.daemon_threads = True
        self._httpd.handle_error = lambda request, address: None
        self.base = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def hold(self, name: str, until: Callable[[], bool]) -> None:
        self.holds[name] = until

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
