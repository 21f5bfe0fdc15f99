"""Download a catalogue's images: concurrent, retried, capped, atomic, guarded.

A response only counts once it decodes as an image. Bytes go to a hidden
temporary file in the output folder and are renamed into place (``files.py``).
Connections go only to public addresses, checked after DNS and on every redirect
(``netguard.py``, unless ``allow_private``), and each file has an overall deadline
covering every attempt, redirect and byte of it.
"""

from __future__ import annotations

import csv
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests

from . import __version__, network
from .catalog import Row, printable, spreadsheet_safe, url_problem
from .config import DEFAULT_MAX_PIXELS
from .errors import ImageError
from .files import existing_file, place_file, sweep_temp_files, temp_file
from .images import probe
from .netguard import Guard, PrivateAddress, refusal_in

USER_AGENT = f"ImageFinder/{__version__} (+https://github.com/imagefinder; image downloader)"
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class DownloadOptions:
    timeout: float = 20.0
    retries: int = 3
    backoff: float = 0.5
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 8
    # Seconds one file may take in all (attempts, backoff, a server trickling bytes).
    deadline: float = 120.0
    # Fetch from loopback, private and link-local addresses (a local test server).
    allow_private: bool = False


@dataclass(frozen=True)
class Outcome:
    line: int
    id: str
    url: str
    status: str  # downloaded | skipped | failed
    reason: str = ""
    path: str = ""
    bytes: int = 0
    # For a network failure, its kind (network.DNS, REFUSED, ...): the summary of a run
    # where every row failed names the common cause.
    cause: str = ""


class _Failure(Exception):
    def __init__(self, message: str, cause: str = ""):
        super().__init__(message)
        self.cause = cause  # a network.* kind, for network failures


class _Permanent(_Failure):
    """A failure that retrying will not fix."""


class _Transient(_Failure):
    """A failure worth retrying (timeouts, connection resets, 5xx, 429)."""


class _OutOfTime(Exception):
    """The file's deadline passed."""


def _network_failure(exc: BaseException, url: str) -> _Failure:
    failure = network.explain(exc, url)
    kind = _Transient if failure.retry else _Permanent
    return kind(failure.message, failure.kind)


class Downloader:
    def __init__(self, output_dir: str | Path, options: DownloadOptions | None = None):
        self.output_dir = Path(output_dir)
        self.options = options or DownloadOptions()
        self.guard = Guard(self.options.allow_private)
        self._local = threading.local()
        self._present: set[str] | None = None  # the output folder's names, when known
        # Host -> (DNS failures, message). A catalogue names a few hosts many times: once a
        # name proved unresolvable (or the resolver stayed silent through every retry of
        # it), its other rows fail at once, so an offline run ends in seconds rather than
        # minutes of lookups and backoff.
        self._dns_failures: dict[str, tuple[float, str]] = {}

    @property
    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self.guard.session()
            s.headers["User-Agent"] = USER_AGENT
            s.headers["Accept"] = "image/*,*/*;q=0.5"
            # A fresh connection per request: the deadline watches every socket a
            # download opens, and a pooled one would have been opened by another.
            s.headers["Connection"] = "close"
            self._local.session = s
        return s

    def run(
        self,
        rows: Iterable[Row],
        on_done: Callable[[Outcome], None] | None = None,
    ) -> list[Outcome]:
        """Fetch every row; outcomes come back in CSV order."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        sweep_temp_files(self.output_dir)
        rows = list(rows)
        # One listing instead of a stat per format per row (100k rows: seconds).
        self._present = set(os.listdir(self.output_dir))
        outcomes: dict[int, Outcome] = {}
        # Workers pull rows from one iterator and hand outcomes back on one queue: no
        # future per row (100k rows of futures cost seconds before anything was fetched).
        todo = iter(rows)
        lock = threading.Lock()
        results: queue.SimpleQueue[Outcome | BaseException | None] = queue.SimpleQueue()

        def worker() -> None:
            try:
                while True:
                    with lock:
                        row = next(todo, None)
                    if row is None:
                        return
                    results.put(self.fetch_row(row))
            except BaseException as e:  # a bug, not a bad row: stop the run with it
                results.put(e)
            finally:
                results.put(None)

        count = max(1, min(self.options.workers, len(rows)))
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(count)]
        for t in threads:
            t.start()
        running = count
        while running:
            item = results.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                outcomes[item.line] = item
                if on_done:
                    on_done(item)
        return [outcomes[row.line] for row in rows]

    def fetch_row(self, row: Row) -> Outcome:
        def out(
            status: str,
            reason: str = "",
            path: Path | None = None,
            size: int = 0,
            cause: str = "",
        ) -> Outcome:
            return Outcome(row.line, row.id, row.url, status, reason, str(path or ""), size, cause)

        if row.problem:
            return out("failed", row.problem)
        try:  # an address written in the URL is refused before anything else
            self.guard.check_literal(urlsplit(row.url).hostname or "")
        except PrivateAddress as e:
            return out("failed", str(e))
        current = existing_file(self.output_dir, row.id, self._present)
        if current is not None:
            try:
                probe(current, self.options.max_pixels)
                return out("skipped", "already downloaded", current, current.stat().st_size)
            except (ImageError, OSError):
                pass  # a bad leftover: fetch it again
        deadline = time.monotonic() + self.options.deadline
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise _OutOfTime
                with self.guard.deadline(left) as download:
                    try:
                        path, size = self._fetch(row, left)
                    except (_Permanent, _Transient):
                        if download.expired:
                            raise _OutOfTime from None
                        raise
                return out("downloaded", "", path, size)
            except _OutOfTime:
                return out("failed", f"not done within the {self.options.deadline:g} s deadline")
            except _Permanent as e:
                return out("failed", str(e), cause=e.cause)
            except _Transient as e:
                attempt += 1
                if attempt > self.options.retries:
                    return out("failed", f"{e} (after {attempt} attempts)", cause=e.cause)
                delay = self.options.backoff * 2 ** (attempt - 1) * (0.5 + random.random())
                time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
            except Exception as e:  # never let one row kill the run
                return out("failed", f"unexpected error: {type(e).__name__}: {e}")

    def _get(self, url: str, left: float) -> requests.Response:
        """GET following redirects by hand, so every hop's scheme is checked (its address
        is checked by the guard, as every connection's is)."""
        timeout = min(self.options.timeout, left)
        for hop in range(MAX_REDIRECTS + 1):
            problem = url_problem(url)
            if problem:
                raise _Permanent(f"redirected to a refused url: {problem}")
            host = urlsplit(url).hostname or ""
            failures, message = self._dns_failures.get(host, (0, ""))
            if failures > self.options.retries:
                raise _Permanent(f"{message} (as before in this run)", network.DNS)
            try:
                # An address written in the URL needs no DNS: refused without a request.
                self.guard.check_literal(host)
                resp = self.session.get(url, stream=True, timeout=timeout, allow_redirects=False)
            except (requests.Timeout, requests.ConnectionError, PrivateAddress) as e:
                refused = refusal_in(e)
                if refused is not None:
                    where = f"redirected to {url}: " if hop else ""
                    raise _Permanent(f"{where}{refused}") from e
                failure = _network_failure(e, url)
                if failure.cause == network.DNS:
                    permanent = isinstance(failure, _Permanent)
                    count = float("inf") if permanent else failures + 1
                    self._dns_failures[host] = (count, str(failure))
                raise failure from e
            except requests.RequestException as e:
                raise _Permanent(f"request failed: {e}") from e
            if resp.is_redirect:
                location = resp.headers.get("Location", "")
                resp.close()
                url = urljoin(url, location)
                continue
            return resp
        raise _Permanent(f"more than {MAX_REDIRECTS} redirects")

    def _fetch(self, row: Row, left: float) -> tuple[Path, int]:
        resp = self._get(row.url, left)
        with resp:
            if resp.status_code in RETRY_STATUS:
                raise _Transient(f"HTTP {resp.status_code}")
            if resp.status_code != 200:
                raise _Permanent(f"HTTP {resp.status_code}")
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.options.max_bytes:
                raise _Permanent(
                    f"{int(declared):,} bytes, over the {self.options.max_bytes:,} byte limit"
                )
            fd, tmp_path = temp_file(self.output_dir, row.id)
            try:
                size = 0
                with os.fdopen(fd, "wb") as f:
                    try:
                        for chunk in resp.iter_content(64 * 1024):
                            size += len(chunk)
                            if size > self.options.max_bytes:
                                raise _Permanent(
                                    f"more than the {self.options.max_bytes:,} byte limit"
                                )
                            f.write(chunk)
                    except (requests.RequestException, OSError) as e:
                        if isinstance(e, OSError) and not isinstance(e, requests.RequestException):
                            raise _Permanent(f"cannot write: {e}") from e
                        failure = network.explain(e, row.url)
                        raise _Transient(
                            f"download broke off: {failure.message}", failure.kind
                        ) from e
                    f.flush()
                    os.fsync(f.fileno())
                if size == 0:
                    raise _Permanent("empty response")
                try:
                    fmt = probe(tmp_path, self.options.max_pixels)
                except ImageError as e:
                    # A server's header, shown later in a terminal: no control bytes.
                    ctype = printable(resp.headers.get("Content-Type", "?").split(";")[0][:80])
                    raise _Permanent(f"not an image ({ctype}): {e}") from e
                return place_file(tmp_path, self.output_dir, row.id, fmt), size
            finally:
                if tmp_path.exists():
                    tmp_path.unlink()


MANIFEST_FIELDS = ("line", "id", "url", "status", "reason", "path", "bytes")


def write_manifest(path: str | Path, outcomes: Iterable[Outcome]) -> None:
    """Every row's outcome, as CSV a spreadsheet opens safely: text cells never start a
    formula and hold no control character (ids, urls and reasons come from the catalogue
    and from servers)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_FIELDS)
        for o in outcomes:
            writer.writerow([_cell(getattr(o, name)) for name in MANIFEST_FIELDS])
    os.replace(tmp, path)


def _cell(value: object) -> object:
    return spreadsheet_safe(value) if isinstance(value, str) else value
