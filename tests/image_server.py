"""A real HTTP server on 127.0.0.1 serving every case the downloader must survive.

Routes (GET):

- ``/img/<name>.jpg``, ``/img/<name>.png``  a good image (JPEG, PNG)
- ``/png-named.jpg``     PNG bytes under a JPEG name and content type
- ``/missing``           404
- ``/error``             500, every time
- ``/flaky/<key>``       500 on the first request for ``<key>``, then a good JPEG
- ``/slow``              a good JPEG after ``slow_seconds`` (longer than the client's timeout)
- ``/pause/<name>.jpg``  a good JPEG after ``pause_seconds`` (to show downloads overlap)
- ``/trickle.jpg``       half a JPEG, then the rest once ``release`` is set
- ``/page.html``         an HTML page with status 200
- ``/truncated.jpg``     the first half of a JPEG, with a matching Content-Length
- ``/dropped.jpg``       a Content-Length of the full JPEG, then the connection closes early
- ``/redirect``          302 to ``/img/redirected.jpg``
- ``/redirect-ftp``      302 to an ftp:// url
- ``/loop``              302 to itself, forever
- ``/huge``              ``huge_bytes`` of JPEG-prefixed data with its Content-Length declared
- ``/huge-undeclared``   the same, without a Content-Length (ends when the connection closes)

Every request's path and headers are recorded in ``requests``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from support import image_bytes

JPEG = image_bytes((64, 48), (200, 30, 30))
PNG = image_bytes((40, 30), (30, 200, 30), fmt="PNG")


class ImageServer:
    def __init__(
        self, slow_seconds: float = 2.0, pause_seconds: float = 0.5, huge_bytes: int = 300_000
    ):
        self.slow_seconds = slow_seconds
        self.pause_seconds = pause_seconds
        self.release = threading.Event()
        self.huge_bytes = huge_bytes
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        # A client that gave up (timeout, size cap) leaves a broken pipe behind: not news.
        self._httpd.handle_error = lambda request, address: None
        self.base = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return self.base + path

    def count(self, path: str) -> int:
        with self._lock:
            return self.hits[path]

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _record(self, path: str, headers: dict[str, str]) -> int:
        with self._lock:
            self.requests.append((path, headers))
            self.hits[path] += 1
            return self.hits[path]

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def send(self, status: int, body: bytes = b"", ctype: str = "image/jpeg", **headers):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(headers.pop("length", len(body))))
                for key, value in headers.items():
                    self.send_header(key.replace("_", "-"), value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path
                nth = server._record(path, dict(self.headers.items()))
                if path.startswith("/img/") and path.endswith(".png"):
                    self.send(200, PNG, "image/png")
                elif path.startswith("/img/"):
                    self.send(200, JPEG)
                elif path == "/png-named.jpg":
                    self.send(200, PNG, "image/jpeg")
                elif path == "/missing":
                    self.send(404, b"not found", "text/plain")
                elif path == "/error":
                    self.send(500, b"boom", "text/plain")
                elif path.startswith("/flaky/"):
                    if nth == 1:
                        self.send(500, b"try again", "text/plain")
                    else:
                        self.send(200, JPEG)
                elif path == "/slow":
                    time.sleep(server.slow_seconds)
                    self.send(200, JPEG)
                elif path.startswith("/pause/"):
                    time.sleep(server.pause_seconds)
                    self.send(200, JPEG)
                elif path == "/trickle.jpg":
                    half = len(JPEG) // 2
                    self.send(200, JPEG[:half], length=len(JPEG))
                    self.wfile.flush()
                    server.release.wait(10)
                    self.wfile.write(JPEG[half:])
                elif path == "/page.html":
                    self.send(200, b"<!doctype html><title>Hi</title><p>Not an image", "text/html")
                elif path == "/truncated.jpg":
                    self.send(200, JPEG[: len(JPEG) // 2])
                elif path == "/dropped.jpg":
                    self.send(200, JPEG[:100], length=len(JPEG))
                    self.close_connection = True
                elif path == "/redirect":
                    self.send(302, b"", "text/plain", Location="/img/redirected.jpg")
                elif path == "/loop":
                    self.send(302, b"", "text/plain", Location="/loop")
                elif path == "/redirect-ftp":
                    self.send(302, b"", "text/plain", Location="ftp://127.0.0.1/x.jpg")
                elif path in ("/huge", "/huge-undeclared"):
                    body = JPEG + b"\0" * (server.huge_bytes - len(JPEG))
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    if path == "/huge":
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    self.close_connection = True
                else:
                    self.send(404, b"no such route", "text/plain")

        return Handler
