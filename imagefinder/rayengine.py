"""Ingestion on a Ray cluster (``pip install 'imagefinder[ray]'``): the same job as
``ingest.py``, expressed in Ray Data.

- rows: the catalogue's ``url,id`` rows (refused rows never leave the driver);
- ``_fetch`` CPU tasks: download (the one downloader, with its guard and deadline) into
  the catalogue folder, hash, and for new content decode and crop to the model's input
  (``images.square_crop``: what ``Embedder.preprocess`` does before normalising). A task
  handles its batch's rows in the downloader's threads (``--workers``): downloads wait
  on the network, so threads give the concurrency, and the pool of fetch tasks stays at
  one per two CPUs of the cluster. Each task process imports the pipeline once; on one
  machine, more of them only took CPU from the model (measured: 500 local photos, 11 s
  of CPU in eight fetch processes against 4 s in one);
- embedding in a pool of actors, one model per actor: on a cluster that outlives the
  job, models kept loaded between jobs (``raymodels``: the download tasks hand each
  batch to one), else ``_Embed``, Ray Data's actor pool for this job alone, fractional
  CPUs (``actor_cpus``), one GPU each when the cluster has them;
- writes in batches, compare-and-set against the state each row had when the job
  started (``indexer.Writer``): on PostgreSQL from the workers (``_write`` tasks: many
  writers at once), on SQLite from the driver (the single writer).

Failure: Ray retries a task whose worker died and restarts a dead actor, which redoes
its batch; a batch is written only once embedded, and a write of a row already written
by a retried task changes nothing (same id, same content). A whole job killed and run
again finds its finished rows by content hash and its files already downloaded.

The catalogue folder must be one every worker sees at the same path (one machine, or a
shared filesystem): the index records where each image is.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import errors
from .catalog import Row
from .config import Settings
from .download import Downloader, DownloadOptions, Outcome
from .errors import ConfigError, ImageError, ModelUnavailable
from .files import sha256_file
from .images import load_rgb, square_crop
from .indexer import Candidate, Summary, Writer
from .model.registry import spec_for
from .store import FileState, Store, is_postgres, open_store

if TYPE_CHECKING:
    from .raymodels import WarmModels

# Rows per batch through the pipeline (download, embed, write): fewer, larger batches
# spend less in Ray's per-task and per-block costs (500 photos on 2 CPUs: 16 a batch
# took 1-2 s less than 8; 32 left the model idle while the first batches downloaded).
BATCH = 16
OUTCOME = ("line", "id", "url", "status", "reason", "path", "bytes")


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a cluster on this machine
    actors: int = 1
    actor_cpus: float = 0.5
    # Less than an actor's: a download waits more than it computes; and with other
    # resources than the actors', Ray keeps these tasks apart instead of fusing them
    # into the actors (which would download and decode one batch at a time per model).
    fetch_cpus: float = 0.25
    batch_size: int = BATCH
    # Seconds a model stays loaded on the cluster after a job (raymodels.py); 0: each
    # job starts and ends its own actors.
    keep_warm: float = 0


def _ray() -> Any:
    if "RAY_AUTH_MODE" not in os.environ and _auth_token_available():
        # Ray >= 2.59 starts clusters with token authentication when a token exists, but
        # a client joining one by address sends it only in token mode (read when ray is
        # imported): without this it retries for ~10 s and fails "Failed to connect". A
        # cluster without authentication ignores the token.
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
        import ray.data  # noqa: F401 (the extra's other half)
    except ImportError:
        raise ConfigError(
            "the Ray engine needs Ray Data; install it with: pip install 'imagefinder[ray]'"
        ) from None
    return ray


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (``auto``: the one ``ray start`` began here), or
    start one on this machine; this package travels to its workers."""
    ray = _ray()

    if ray.is_initialized():
        return
    package = str(Path(__file__).resolve().parent)
    try:
        ray.init(
            address=address,
            runtime_env={"py_modules": [package]},
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        hint = ""
        if address and not _auth_token_available():
            hint = (
                "; if the cluster uses token authentication, put its token (`ray "
                "get-auth-token` on the head node) in RAY_AUTH_TOKEN or ~/.ray/auth_token"
            )
        raise ConfigError(f"cannot start or reach {where}: {' '.join(str(e).split())}{hint}") from e


@contextlib.contextmanager
def session(address: str | None) -> Iterator[None]:
    """Connected to the cluster for the block; if the block's ``connect`` is what joined
    it (or started one), leave at the end rather than at the interpreter's exit: Ray's
    own teardown there took ~1 s longer (500-photo benchmark, running cluster)."""
    ray = _ray()
    joined = not ray.is_initialized()
    connect(address)
    try:
        yield
    finally:
        if joined:
            ray.shutdown()


def _auth_token_available() -> bool:
    """Whether Ray would find a token: its environment variables, or the file ``ray
    start`` writes on the head node."""
    return bool(
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").is_file()
    )


def _known(ref: Any) -> dict[str, FileState]:
    import ray

    cache = _known.__dict__.setdefault("cache", {})
    key = ref.hex()
    if key not in cache:
        cache.clear()
        cache[key] = ray.get(ref)
    known: dict[str, FileState] = cache[key]
    return known


def _fetch(
    batch: dict[str, np.ndarray],
    output_dir: str,
    options: DownloadOptions,
    known_ref: Any,
    input_size: int,
    warm: WarmModels | None = None,
) -> dict[str, Any]:
    """Download each row, hash it, and for new content decode and crop it; the rows of
    the batch at once, in up to ``options.workers`` threads. With ``warm``, embed the
    batch on a warm model too."""
    known = _known(known_ref)
    downloader = Downloader(output_dir, options)
    empty = np.zeros((input_size, input_size, 3), dtype=np.uint8)

    def one(row: Row) -> tuple[Outcome, str, str, int, int, str, np.ndarray]:
        o = downloader.fetch_row(row)
        digest, size, mtime, todo, crop = "", 0, 0, "failed", empty
        reason = o.reason
        if o.status != "failed":
            try:
                st = os.stat(o.path)
                size, mtime = st.st_size, st.st_mtime_ns
                digest = sha256_file(o.path)
                state = known.get(o.id)
                if state is not None and state.sha256 == digest:
                    todo = "same"
                else:
                    img = load_rgb(o.path, options.max_pixels, min_side=input_size)
                    crop, todo = square_crop(img, input_size), "embed"
            except (ImageError, OSError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return o, reason, digest, size, mtime, todo, crop

    rows = [
        Row(int(line), str(url), str(image_id))
        for line, image_id, url in zip(batch["line"], batch["id"], batch["url"], strict=True)
    ]
    with ThreadPoolExecutor(max(1, min(options.workers, len(rows)))) as pool:
        done = list(pool.map(one, rows))
    cols: dict[str, list[Any]] = {k: [] for k in (*OUTCOME, "sha256", "size", "mtime_ns", "todo")}
    for o, reason, digest, size, mtime, todo, _ in done:
        for k, v in zip(
            OUTCOME, (o.line, o.id, o.url, o.status, reason, o.path, o.bytes), strict=True
        ):
            cols[k].append(v)
        for k, v in (("sha256", digest), ("size", size), ("mtime_ns", mtime), ("todo", todo)):
            cols[k].append(v)
    out: dict[str, Any] = {k: np.array(v) for k, v in cols.items()}
    out["slot"] = np.asarray(batch["slot"])
    out["pixels"] = np.stack([crop for *_, crop in done])
    return warm.embed(out) if warm else out


class _Embed:
    """One model per actor, for one job (``RayOptions.keep_warm`` 0, or GPUs)."""

    def __init__(
        self, model: str, weights: str | None, precision: str, threads: int, weights_id: str
    ):
        from .raymodels import load_checked

        self.embedder = load_checked(model, weights, precision, threads, weights_id)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .raymodels import embed_batch

        return embed_batch(self.embedder, batch)


def _write_into(store: Store, batch: dict[str, np.ndarray], known: Any) -> dict[str, np.ndarray]:
    """Write a batch's rows; each row's result (``indexed``, ``unchanged``, ``kept``,
    ``failed``) replaces its ``todo``."""
    summary = Summary()
    writer = Writer(store, None, known, summary)  # type: ignore[arg-type]  # writes only
    results = np.array(batch["todo"], dtype=object)
    embedded: list[tuple[Candidate, str, np.ndarray]] = []
    for n, todo in enumerate(batch["todo"]):
        if todo == "failed":
            continue
        c = Candidate(
            str(batch["id"][n]),
            Path(str(batch["path"][n])).resolve(),
            int(batch["size"][n]),
            int(batch["mtime_ns"][n]),
        )
        if todo == "same":
            results[n] = "unchanged" if writer.same_content(c) else "kept"
        else:
            embedded.append((c, str(batch["sha256"][n]), batch["vector"][n]))
    if embedded:
        written = writer.write(embedded)
        if written < len(embedded):  # another writer, or a retried task's earlier write
            rows = np.flatnonzero(batch["todo"] == "embed").tolist()
            for row, (c, digest, _) in zip(rows, embedded, strict=True):
                state = store.file_state(c.id)
                results[row] = "indexed" if state and state.sha256 == digest else "kept"
        else:
            results[batch["todo"] == "embed"] = "indexed"
    out = {k: v for k, v in batch.items() if k not in ("vector", "todo")}
    out["result"] = results.astype(str)
    return out


def _write(batch: dict[str, np.ndarray], location: str, known_ref: Any) -> dict[str, np.ndarray]:
    """A write task on a worker (PostgreSQL: many writers at once)."""
    stores = _write.__dict__.setdefault("stores", {})
    if location not in stores:
        stores[location] = open_store(location)
    return _write_into(stores[location], batch, _known(known_ref))


@dataclass
class RayRun:
    summary: Summary
    outcomes: list[Outcome]
    errors: list[tuple[str, str]]


def ingest(
    rows: list[Row],
    store: Store,
    location: str,
    model: str,
    weights: str | None,
    settings: Settings,
    output_dir: str | Path,
    download: DownloadOptions,
    options: RayOptions,
    on_row: Callable[[Outcome, str], None] | None = None,
    stop: threading.Event | None = None,
) -> RayRun:
    """Put ``rows`` into ``store`` (whose schema exists) through a Ray Data pipeline.
    ``on_row(outcome, result)`` sees each row as it is written (``result``: indexed,
    unchanged, kept or failed)."""
    ray = _ray()

    spec = spec_for(model)
    if spec.own_preprocessing:
        raise ConfigError(
            f"--engine ray crops and normalises in its workers the standard way; {model} "
            "brings its own preprocessing: ingest it with the local engine"
        )
    connect(options.address)
    output = str(Path(output_dir).resolve())
    Path(output).mkdir(parents=True, exist_ok=True)
    known = store.file_states()  # the state every compare-and-set write expects
    known_ref = ray.put(known)
    run = RayRun(Summary(), [], [])
    usable = [r for r in rows if not r.problem]
    for r in rows:
        if r.problem:
            outcome = Outcome(r.line, r.id, r.url, "failed", r.problem)
            run.outcomes.append(outcome)
            _count(run, outcome, "failed", on_row)
    if not usable:
        return run
    cluster = ray.cluster_resources()
    gpus = 1 if cluster.get("GPU", 0) >= 1 else 0
    fetchers = max(1, int(cluster.get("CPU", 1)) // 2)
    # Rows take turns between the embedding slots, a batch at a time (raymodels).
    slots = max(1, options.actors)
    threads = max(1, (os.cpu_count() or 1) // slots)
    ds: Any = ray.data.from_items(
        [
            {"line": r.line, "id": r.id, "url": r.url, "slot": k // options.batch_size % slots}
            for k, r in enumerate(usable)
        ]
    )
    weights_id = store.meta().get("weights", "")
    warm = None
    tasks, task_cpus = fetchers, options.fetch_cpus
    if options.keep_warm > 0 and not gpus:
        from .raymodels import WarmModels, model_key

        key = model_key(model, weights, weights_id, settings.precision)
        warm = WarmModels(
            key, threads, model, weights, settings.precision, weights_id, options.keep_warm
        )
        # One batch at the model per slot, one more being downloaded; the warm models
        # reserve nothing, so the tasks waiting on them hold their share.
        tasks, task_cpus = slots + 1, max(options.fetch_cpus, options.actor_cpus)
    ds = ds.map_batches(
        _fetch,
        batch_size=options.batch_size,
        batch_format="numpy",
        fn_kwargs={
            "output_dir": output,
            "options": replace(download),
            "known_ref": known_ref,
            "input_size": spec.input_size,
            "warm": warm,
        },
        num_cpus=task_cpus,
        compute=ray.data.TaskPoolStrategy(size=tasks),
    )
    if warm is None:
        ds = ds.map_batches(
            _Embed,
            batch_size=options.batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={
                "model": model,
                "weights": weights,
                "precision": settings.precision,
                "threads": threads,
                "weights_id": weights_id,
            },
            compute=ray.data.ActorPoolStrategy(size=options.actors),
            num_cpus=options.actor_cpus,
            num_gpus=gpus,
        )
    remote = is_postgres(location)
    if remote:
        ds = ds.map_batches(
            _write,
            batch_size=options.batch_size,
            batch_format="numpy",
            fn_kwargs={"location": location, "known_ref": known_ref},
            num_cpus=0.25,
        )
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if stop is not None and stop.is_set():
                break
            if not remote:
                batch = _write_into(store, batch, known)
            for n in range(len(batch["id"])):
                outcome = Outcome(*(_plain(batch[k][n]) for k in OUTCOME))
                run.outcomes.append(outcome)
                _count(run, outcome, str(batch["result"][n]), on_row)
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
        # Ray Data gives up when an actor dies in its constructor (bad weights on a
        # worker, a model its packages lack), or a warm model's does and fails the task
        # that called it: the remote trace names the cause.
        cause = _cause(e)
        if cause is not None:
            raise cause from e
        if isinstance(e, ray.exceptions.RayActorError):
            raise ModelUnavailable(f"the embedding actors could not start: {e}") from e
        raise
    return run


def _cause(error: BaseException) -> errors.ImageFinderError | None:
    """The last of this package's errors in a remote traceback's text, remade here."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.findall(r"^\s*imagefinder\.errors\.(\w+): (.+)$", text, re.MULTILINE)
    if found:
        cls = getattr(errors, found[-1][0], None)
        if isinstance(cls, type) and issubclass(cls, errors.ImageFinderError):
            return cls(found[-1][1].strip())
    return None


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _count(
    run: RayRun, outcome: Outcome, result: str, on_row: Callable[[Outcome, str], None] | None
) -> None:
    s = run.summary
    if result == "indexed":
        s.indexed += 1
    elif result == "unchanged":
        s.unchanged += 1
    elif result == "kept":
        s.kept += 1
    else:
        image_id = outcome.id or f"line {outcome.line}"
        s.skip(image_id, outcome.reason)
        run.errors.append((image_id, outcome.reason))
    if on_row:
        on_row(outcome, result)
