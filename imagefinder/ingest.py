"""Ingestion: a catalogue (``url,id`` rows) or a set of uploaded files -> images in the
catalogue folder -> vectors in the index, in one streaming pass.

Files arrive from background threads (the downloader's workers, or the placing of
uploads) while the caller's thread decodes and embeds what has arrived, a batch at a
time: the model starts on the first images while later ones still download. Each file
goes through the indexer's ``Writer``, so ingestion is idempotent per id and content
hash exactly like ``extract``: running it again, or after a crash, redoes nothing that
is already in the index.

``run`` wraps every stretch of decoding and embedding: the CLI runs it directly, the
server through its gate (``server/gate.py``), so a job takes one place in the bounded
inference path at a time and searches keep theirs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .catalog import Row
from .download import Downloader, Outcome
from .errors import ImageError
from .files import existing_file, place_file
from .indexer import Candidate, Prepared, Writer, candidate

T = TypeVar("T")
# Seconds without a new file after which the batch so far is embedded anyway: an image
# should not wait for a slow download to be searchable, nor a progress bar stall.
IDLE_FLUSH = 0.5


def direct(fn: Callable[[], T]) -> T:
    return fn()


@dataclass(frozen=True)
class Upload:
    """An uploaded file, staged on the catalogue folder's filesystem, and its id."""

    id: str
    path: Path


@dataclass(frozen=True)
class Fetched:
    """A file that arrived (``path``), or why it did not (``reason``)."""

    id: str
    label: str  # how messages name it: a CSV line, or the id
    path: Path | None
    reason: str = ""
    outcome: Outcome | None = None  # a download's, for the manifest


@dataclass
class Tally:
    """A run's counts, as a job reports them."""

    total: int = 0
    done: int = 0  # embedded and written
    skipped: int = 0  # already in the index with this content (or newer from the API)
    failed: int = 0  # could not be fetched, decoded or read
    errors: list[tuple[str, str]] = field(default_factory=list)  # (id, reason), in order


def _background(
    produce: Callable[[Callable[[Fetched], None]], None],
) -> Iterator[Fetched | None]:
    """Run ``produce(emit)`` on a thread; yield what it emits, and None whenever nothing
    arrived for ``IDLE_FLUSH`` seconds. An exception in ``produce`` is raised here."""
    items: queue.SimpleQueue[Fetched | BaseException | None] = queue.SimpleQueue()

    def target() -> None:
        try:
            produce(items.put)
        except BaseException as e:  # a bug, not a bad row: it stops the run
            items.put(e)
        finally:
            items.put(None)

    threading.Thread(target=target, name="ingest-fetch", daemon=True).start()
    while True:
        try:
            item = items.get(timeout=IDLE_FLUSH)
        except queue.Empty:
            yield None
            continue
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def downloads(
    rows: Sequence[Row],
    downloader: Downloader,
    label: Callable[[Row | Outcome], str],
    stop: threading.Event | None = None,
) -> Iterator[Fetched | None]:
    """Download ``rows`` with ``downloader`` (its workers, its guard, its deadline);
    each file as soon as it is there."""

    def produce(emit: Callable[[Fetched], None]) -> None:
        def done(o: Outcome) -> None:
            path = Path(o.path) if o.status != "failed" and o.path else None
            emit(Fetched(o.id, label(o), path, o.reason if path is None else "", o))

        downloader.run(rows, on_done=done, stop=stop)

    return _background(produce)


def uploads(
    files: Sequence[Upload],
    output_dir: Path,
    probe: Callable[[Path], str],
    stop: threading.Event | None = None,
) -> Iterator[Fetched | None]:
    """Move staged uploads that are images into ``output_dir`` as ``<id>.<ext>``
    (``probe`` names the format, or raises ImageError); the rest fail."""

    def produce(emit: Callable[[Fetched], None]) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        for f in files:
            if stop is not None and stop.is_set():
                return
            if not f.path.is_file():  # placed by an earlier run of this job
                placed = existing_file(output_dir, f.id)
                reason = "" if placed else "the uploaded file is gone"
                emit(Fetched(f.id, f.id, placed, reason))
                continue
            try:
                fmt = probe(f.path)
                emit(Fetched(f.id, f.id, place_file(f.path, output_dir, f.id, fmt)))
            except (ImageError, OSError) as e:
                emit(Fetched(f.id, f.id, None, str(e)))

    return _background(produce)


class Ingest:
    """Feed arriving files through ``writer``: ``Ingest(writer).run(downloads(...))``."""

    def __init__(
        self,
        writer: Writer,
        *,
        run: Callable[[Callable[[], None]], None] = direct,
        workers: int = 0,
        stop: threading.Event | None = None,
        on_fetched: Callable[[Fetched], None] | None = None,
        on_step: Callable[[Tally], None] | None = None,
    ):
        """``workers``: decoding threads (0: decode in the calling thread, as the server
        does with its own decoder processes). ``on_step`` sees the tally after each
        batch; ``on_fetched`` each arrival (the CLI's messages)."""
        self.writer = writer
        self.run_ = run
        self.workers = workers
        self.stop = stop
        self.on_fetched = on_fetched
        self.on_step = on_step
        self.tally = Tally()
        self.outcomes: list[Outcome] = []
        self._ids: dict[str, str] = {}  # label -> id, for the writer's skip messages
        self._fetch_failed = 0
        previous = writer.on_skip

        def skipped(label: str, reason: str) -> None:
            self._error(self._ids.get(label, label), reason)
            if previous:
                previous(label, reason)

        writer.on_skip = skipped

    def _error(self, image_id: str, reason: str) -> None:
        if len(self.tally.errors) < 1000:
            self.tally.errors.append((image_id, reason))

    def _count(self) -> Tally:
        s = self.writer.summary
        t = self.tally
        t.done = s.indexed
        t.skipped = s.unchanged + s.kept
        t.failed = self._fetch_failed + s.skipped
        return t

    def run(self, fetched: Iterator[Fetched | None], total: int) -> Tally:
        self.tally.total = total
        pool = ThreadPoolExecutor(self.workers, "decode") if self.workers else None
        pending: list[Candidate] = []
        try:
            for item in fetched:
                if self.stop is not None and self.stop.is_set():
                    break
                if item is None:  # a pause in arrivals: embed what is there
                    if pending:
                        self._process(pending, pool)
                        pending = []
                    elif self.writer.batch:
                        self.run_(self.writer.flush)
                        self._step()
                    continue
                if item.outcome is not None:
                    self.outcomes.append(item.outcome)
                if self.on_fetched:
                    self.on_fetched(item)
                c = self._candidate(item)
                if c is not None:
                    pending.append(c)
                    if len(pending) >= self.writer.batch_size:
                        self._process(pending, pool)
                        pending = []
            if pending and not (self.stop is not None and self.stop.is_set()):
                self._process(pending, pool)
            self.run_(self.writer.flush)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return self._step()

    def _candidate(self, item: Fetched) -> Candidate | None:
        reason = item.reason
        if item.path is not None:
            try:
                self._ids[item.label] = item.id
                return candidate(item.path, item.id, item.label)
            except OSError as e:
                reason = e.strerror or str(e)
        self._fetch_failed += 1
        self._error(item.id or item.label, reason)
        if self.writer.on_progress:
            self.writer.on_progress(1)
        return None

    def _process(self, chunk: list[Candidate], pool: ThreadPoolExecutor | None) -> None:
        """Decode, preprocess and (when a batch is full) embed ``chunk``, in one ``run``."""
        writer = self.writer

        def work() -> None:
            prepared: list[Prepared] = (
                list(pool.map(writer.prepare, chunk))
                if pool is not None
                else [writer.prepare(c) for c in chunk]
            )
            for p in prepared:
                writer.add(p)

        self.run_(work)
        self._step()

    def _step(self) -> Tally:
        tally = self._count()
        if self.on_step:
            self.on_step(tally)
        return tally
