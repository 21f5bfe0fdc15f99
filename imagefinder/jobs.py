"""Ingestion jobs: what a job holds, and running one on a server's loaded model.

A job's source is kept in its row: the CSV text, or the list of uploaded files (ids
and names, the files staged under ``<images_dir>/.jobs/<job id>/``, a hidden folder
``extract`` never scans). Running a job is ``ingest.py`` with the server's decoder
processes and its gate: downloads or uploads land in the catalogue folder as
``<id>.<ext>``, then go through the indexer's ``Writer``. A job run again (after a
restart) finds what it had done by content hash and redoes none of it.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .catalog import Row, parse_catalog
from .config import Settings
from .download import Downloader, DownloadOptions, Outcome
from .errors import ImageFinderError
from .indexer import LiveStates, Summary, Writer, finish_run
from .ingest import Fetched, Ingest, Tally, Upload, downloads, uploads
from .service import Service
from .store.jobtable import MAX_ERRORS, Job, JobTable, now_text

STAGING = ".jobs"
# Seconds between two progress writes (a heartbeat too: see jobtable.STALE_AFTER).
PROGRESS_EVERY = 0.5
# Concurrent downloads of a CSV job.
DOWNLOAD_WORKERS = 4

Run = Callable[[Callable[[], None]], None]


def new_job(kind: str, total: int) -> Job:
    return Job(id=uuid.uuid4().hex, kind=kind, total=total, created_at=now_text())


def staging_dir(settings: Settings, job_id: str) -> Path:
    return Path(settings.images_dir) / STAGING / job_id


@dataclass(frozen=True)
class StagedFile:
    id: str
    name: str  # the staged file's name in the job's staging folder


def files_source(files: list[StagedFile]) -> str:
    return json.dumps([{"id": f.id, "name": f.name} for f in files])


def _uploads(settings: Settings, job_id: str, source: str) -> list[Upload]:
    folder = staging_dir(settings, job_id)
    return [Upload(f["id"], folder / f["name"]) for f in json.loads(source)]


def _row_label(item: Row | Outcome) -> str:
    return item.id or f"line {item.line}"


def execute(
    job: Job,
    table: JobTable,
    service: Service,
    run: Run,
    stop: threading.Event,
) -> str:
    """Run ``job`` (claimed by this process) to its end. Returns its final state, or
    ``interrupted`` when ``stop`` was set by a server shutting down (the job stays
    running in the table for ``release``)."""
    settings = service.settings
    out = Path(settings.images_dir)
    halt = threading.Event()  # set when the job was cancelled or taken over
    either = _Either(stop, halt)
    try:
        embedder = service.ensure_index()
        source = table.source(job.id)
        summary = Summary()
        writer = Writer(
            service.store,
            embedder,
            LiveStates(service.store),
            summary,
            settings.job_batch_size,
            settings.max_pixels,
            load=service.decoder.load_rgb,
        )
        last = [0.0]

        def record(tally: Tally) -> None:
            _copy(tally, job)
            if time.monotonic() - last[0] < PROGRESS_EVERY:
                return
            last[0] = time.monotonic()
            if not table.progress(job):
                halt.set()

        if settings.ray_address and job.kind == "csv":
            summary, tally = _on_ray(job, source, service, either, record)
        else:
            ingest = Ingest(writer, run=run, stop=either, on_step=record)
            fetched = _source(job, source, settings, out, service, either)
            tally = ingest.run(fetched, job.total)
        _copy(tally, job)
        if not stop.is_set():
            run(lambda: finish_run(service.store, summary))
    except ImageFinderError as e:
        if stop.is_set():  # the gate or the store closing under a shutdown
            return "interrupted"
        job.errors = [*job.errors[: MAX_ERRORS - 1], {"id": "", "reason": e.message}]
        table.finish(job, "failed")
        _clean(settings, job)
        return "failed"
    if stop.is_set():
        return "interrupted"
    current = table.get(job.id)
    if current is not None and current.owner != job.owner:
        return "taken over"  # another server re-ran it: its state is that one's to write
    cancelled = halt.is_set() or (current is not None and current.cancel)
    if cancelled:
        state = "cancelled"
    elif job.total and job.done + job.skipped == 0:
        state = "failed"  # nothing at all could be used: say so, not "done"
    else:
        state = "done"
    table.finish(job, state)
    _clean(settings, job)
    return state


class _Either(threading.Event):
    """Set when either of two events is (checked, never waited on)."""

    def __init__(self, a: threading.Event, b: threading.Event):
        super().__init__()
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()


def _source(
    job: Job,
    source: str,
    settings: Settings,
    out: Path,
    service: Service,
    stop: threading.Event,
) -> Iterator[Fetched | None]:
    if job.kind == "csv":
        rows = parse_catalog(source.encode("utf-8"), name="the job's CSV")
        options = DownloadOptions(
            max_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_pixels,
            workers=DOWNLOAD_WORKERS,
            allow_private=settings.job_allow_private,
        )
        return downloads(rows, Downloader(out, options), _row_label, stop)
    files = _uploads(settings, job.id, source)

    def probe(path: Path) -> str:
        return service.decoder.probe(path, settings.max_pixels)

    return uploads(files, out, probe, stop)


def _on_ray(
    job: Job,
    source: str,
    service: Service,
    stop: threading.Event,
    record: Callable[[Tally], None],
) -> tuple[Summary, Tally]:
    """A CSV job on the Ray cluster at IMAGEFINDER_RAY_ADDRESS: the server only drives it
    (no gate place: the work is the cluster's)."""
    from .rayengine import RayOptions
    from .rayengine import ingest as ray_ingest

    settings = service.settings
    model, weights = service.choose_model()
    tally = Tally(total=job.total)

    def row_done(outcome: Outcome, result: str) -> None:
        if result == "indexed":
            tally.done += 1
        elif result in ("unchanged", "kept"):
            tally.skipped += 1
        else:
            tally.failed += 1
            tally.errors.append((outcome.id or f"line {outcome.line}", outcome.reason))
        record(tally)

    options = DownloadOptions(
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_pixels,
        allow_private=settings.job_allow_private,
    )
    run = ray_ingest(
        parse_catalog(source.encode("utf-8"), name="the job's CSV"),
        service.store,
        service.location,
        model,
        weights,
        settings,
        settings.images_dir,
        options,
        RayOptions(
            settings.ray_address,
            batch_size=settings.batch_size,
            keep_warm=settings.ray_keep_warm,
        ),
        on_row=row_done,
        stop=stop,
    )
    return run.summary, tally


def _copy(tally: Tally, job: Job) -> None:
    job.total, job.done, job.skipped, job.failed = (
        tally.total,
        tally.done,
        tally.skipped,
        tally.failed,
    )
    job.errors = [{"id": i, "reason": r} for i, r in tally.errors[:MAX_ERRORS]]


def _clean(settings: Settings, job: Job) -> None:
    """A finished job's staged uploads are no longer needed."""
    shutil.rmtree(staging_dir(settings, job.id), ignore_errors=True)
