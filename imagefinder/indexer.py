"""Extraction: a folder of images -> vectors in the index, incrementally.

The pipeline keeps the model busy. Worker threads read, hash, decode (JPEGs at a
reduced DCT scale) and preprocess files while the main thread runs batched
inference and commits each batch in its own transaction. The queue between them
is bounded, so memory stays flat however large the folder is.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
from PIL.Image import Image as PILImage

from . import augment
from .config import DEFAULT_MAX_PIXELS
from .errors import ImageError
from .files import sha256_file
from .images import is_image_path, load_rgb
from .metadata import read_sidecar
from .store import FileState, Item, Store

if TYPE_CHECKING:
    # Not at run time: the Ray engine's download tasks import this module for the
    # writer's types, and each would otherwise pay torch's import (1.5 s, ~300 MB).
    import torch

    from .model.embedder import Embedder

T = TypeVar("T")
R = TypeVar("R")
# What a decode worker hands back: the file, its hash, its tensor (None when its content
# is already indexed), or the reason it was skipped.
Prepared = tuple["Candidate", str | None, "torch.Tensor | None", str | None]


@dataclass
class Summary:
    indexed: int = 0
    unchanged: int = 0
    skipped: int = 0
    pruned: int = 0
    missing: int = 0
    # Rows another writer (the API) changed while this run worked on them: left as they are.
    kept: int = 0
    # Images whose DBA vectors were recomputed at the end (0: DBA off, or nothing changed).
    augmented: int = 0
    # Ids this run added (not in the index before it).
    added: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, item: str, reason: str) -> None:
        self.skipped += 1
        self.problems.append((item, reason))

    def line(self) -> str:
        parts = [
            f"{self.indexed} indexed",
            f"{self.unchanged} unchanged",
            f"{self.skipped} skipped",
        ]
        if self.pruned:
            parts.append(f"{self.pruned} pruned")
        if self.kept:
            parts.append(f"{self.kept} changed by another writer meanwhile (kept)")
        return ", ".join(parts)


@dataclass(frozen=True)
class Candidate:
    id: str
    path: Path  # absolute: what the index records
    size: int
    mtime_ns: int
    # As found under the folder the user named (relative if it was): what messages show,
    # so every skip line of a run names its file the same way.
    shown: str = ""


def file_id(path: Path, root: Path) -> str:
    """The id of ``path``: its stem, with sub-folders kept as ``a/b/stem``."""
    rel = path.relative_to(root).with_suffix("")
    return rel.as_posix()


def in_shard(image_id: str, shard: tuple[int, int]) -> bool:
    """Whether ``image_id`` falls in shard ``(i, n)``: by a hash that is the same on every
    machine and in every Python run (unlike hash())."""
    digest = hashlib.sha1(image_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % shard[1] == shard[0]


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in a file name become surrogates
        return False
    return True


def scan(root: Path) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Image files under ``root`` (recursively), sorted, and the ones refused."""
    found: dict[str, Candidate] = {}
    refused: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not is_image_path(path):
                continue
            if not _is_utf8(str(path)):
                # Paths and ids are stored and served as text: a name in another
                # encoding would fail its whole batch at the insert.
                shown = os.fsencode(path).decode("utf-8", "backslashreplace")
                refused.append((shown, "file name is not UTF-8; rename the file"))
                continue
            image_id = file_id(path, root)
            if image_id in found:
                refused.append((str(path), f"same id {image_id!r} as {found[image_id].path.name}"))
                continue
            try:
                st = path.stat()
            except OSError as e:
                refused.append((str(path), e.strerror or str(e)))
                continue
            found[image_id] = Candidate(
                image_id, path.resolve(), st.st_size, st.st_mtime_ns, str(path)
            )
    return list(found.values()), refused


def calibration_sample(folder: str | Path, count: int = 100) -> list[Path]:
    """Up to ``count`` image files spread evenly over ``folder`` (int8 calibration)."""
    found, _ = scan(Path(folder))
    step = max(1, len(found) // count)
    return [c.path for c in found[::step][:count]]


def _bounded_map(
    fn: Callable[[T], R], items: Iterable[T], pool: ThreadPoolExecutor, ahead: int
) -> Iterator[R]:
    """Like ``pool.map`` but with at most ``ahead`` results in flight."""
    pending: deque[Future[R]] = deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            break
    while pending:
        yield pending.popleft().result()
        for item in it:
            pending.append(pool.submit(fn, item))
            break


def _chunked_map(
    fn: Callable[[T], R], items: Sequence[T], pool: ThreadPoolExecutor, chunk: int
) -> Iterator[R]:
    """Like ``pool.map``, one chunk at a time: nothing decodes while the caller works."""
    for start in range(0, len(items), chunk):
        yield from pool.map(fn, items[start : start + chunk])


class States(Protocol):
    """What a writer knows of the index before it writes: id -> the row's state."""

    def get(self, image_id: str, /) -> FileState | None: ...


class LiveStates:
    """Each id's state read from the store when first asked (a stream of files has no
    scan to snapshot them from), then remembered."""

    def __init__(self, store: Store):
        self.store = store
        self._seen: dict[str, FileState | None] = {}
        self._lock = threading.Lock()

    def get(self, image_id: str, /) -> FileState | None:
        with self._lock:
            if image_id in self._seen:
                return self._seen[image_id]
        state = self.store.file_state(image_id)
        with self._lock:
            return self._seen.setdefault(image_id, state)


class Writer:
    """Files -> rows, idempotent per id and content hash: a file whose row records the
    same path, size and mtime, or the same content, is not embedded again. New content
    is embedded a batch at a time and written compare-and-set against ``known`` (the
    state each row had when this run looked), so a newer write by another writer (the
    API) wins. ``extract`` and ``ingest`` both write through one."""

    def __init__(
        self,
        store: Store,
        embedder: Embedder,
        known: States,
        summary: Summary,
        batch_size: int = 8,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        on_progress: Callable[[int], None] | None = None,
        on_skip: Callable[[str, str], None] | None = None,
        load: Callable[[Path, int, int | None], PILImage] = load_rgb,
    ):
        self.store = store
        self.embedder = embedder
        self.known = known
        self.summary = summary
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.on_progress = on_progress
        self.on_skip = on_skip
        self.load = load
        # Ids whose rows this run rewrote: a snapshot in ``known`` still shows their old
        # file, which may be gone because another file (a.png replacing a.jpg) took over
        # the id; such a row is current, not an orphan to report or prune.
        self.rewritten: set[str] = set()
        self.batch: list[tuple[Candidate, str, torch.Tensor]] = []

    def prepare(self, c: Candidate) -> Prepared:
        """Hash, decide, decode, preprocess (thread-safe: runs in decode workers)."""
        try:
            state = self.known.get(c.id)
            if state and (state.path, state.size, state.mtime_ns) == (
                str(c.path),
                c.size,
                c.mtime_ns,
            ):
                return c, state.sha256, None, None
            digest = sha256_file(c.path)
            if state and state.sha256 == digest:
                return c, digest, None, None
            img = self.load(c.path, self.max_pixels, self.embedder.min_side)
            return c, digest, self.embedder.preprocess(img), None
        except (ImageError, OSError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            return c, None, None, reason

    def add(self, prepared: Prepared) -> None:
        """Take one prepared file: skip it, record it unchanged, or batch it for the model."""
        c, digest, tensor, reason = prepared
        if reason is not None:
            self.summary.skip(c.shown or str(c.path), reason)
            if self.on_skip:
                self.on_skip(c.shown or str(c.path), reason)
            self._progress(1)
        elif tensor is None:
            self.same_content(c)
        else:
            assert digest is not None  # every tensor comes with its file's hash
            self.batch.append((c, digest, tensor))
            if len(self.batch) >= self.batch_size:
                self.flush()

    def same_content(self, c: Candidate) -> bool:
        """Record a file whose content the index already has (maybe at a new path or
        mtime). False if another writer changed the row meanwhile (kept as it is)."""
        state = self.known.get(c.id)
        assert state is not None  # no "same content" without a row
        same_file = (state.path, state.size, state.mtime_ns) == (str(c.path), c.size, c.mtime_ns)
        done = same_file or self.store.touch(c.id, str(c.path), c.size, c.mtime_ns, expected=state)
        if done:
            self.summary.unchanged += 1
        else:
            self.summary.kept += 1
        self.rewritten.add(c.id)
        self._progress(1)
        return done

    def flush(self) -> None:
        """Embed and write the batched files."""
        batch, self.batch = self.batch, []
        if not batch:
            return
        import torch

        vectors = self.embedder.embed_tensors(torch.stack([t for _, _, t in batch]))
        self.write([(c, digest, v) for (c, digest, _), v in zip(batch, vectors, strict=True)])

    def write(self, rows: Sequence[tuple[Candidate, str, np.ndarray]]) -> int:
        """Write embedded files in one transaction; returns how many were written."""
        # Conditional on each row being as this run saw it: an image the API replaced or
        # deleted meanwhile is newer than this run's view, and wins.
        written = self.store.upsert(
            (Item(c.id, str(c.path), digest, c.size, c.mtime_ns, v) for c, digest, v in rows),
            expected={c.id: self.known.get(c.id) for c, _, _ in rows},
        )
        self.summary.indexed += written
        self.summary.kept += len(rows) - written
        self.summary.added += [c.id for c, _, _ in rows if self.known.get(c.id) is None]
        self.rewritten.update(c.id for c, _, _ in rows)
        self._progress(len(rows))
        return written

    def _progress(self, n: int) -> None:
        if self.on_progress:
            self.on_progress(n)


def candidate(path: Path, image_id: str, shown: str = "") -> Candidate:
    """One file as a candidate (raises OSError when it cannot be read)."""
    st = path.stat()
    return Candidate(image_id, path.resolve(), st.st_size, st.st_mtime_ns, shown or str(path))


def index_folder(
    folder: str | Path,
    store: Store,
    embedder: Embedder,
    *,
    batch_size: int = 8,
    workers: int = 2,
    overlap: bool = False,
    prune: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    select: Callable[[str], bool] | None = None,
    dba: bool | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_skip: Callable[[str, str], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Summary:
    """Embed every new or changed image under ``folder`` into ``store``.

    ``select`` limits the run to some ids (sharding). ``dba`` turns the index's
    database-side augmentation on or off (None: as it is); while on, the augmented
    vectors are recomputed at the end whenever the run changed anything (augment.py).
    ``on_*`` callbacks drive the CLI's progress bar without tying this module to click.
    """
    root = Path(folder)
    summary = Summary()

    def skip(path: str, reason: str) -> None:
        summary.skip(path, reason)
        if on_skip:
            on_skip(path, reason)

    store.ensure_schema(embedder.meta())
    if dba is not None:
        augment.set_enabled(store, dba, compute=False)
    candidates, refused = scan(root)
    for refused_path, why in refused:
        skip(refused_path, why)
    if select is not None:
        candidates = [c for c in candidates if select(c.id)]
    known = store.file_states()
    todo: list[Candidate] = []
    for c in candidates:
        state = known.get(c.id)
        if state and (state.path, state.size, state.mtime_ns) == (str(c.path), c.size, c.mtime_ns):
            summary.unchanged += 1
        else:
            todo.append(c)
    if on_total:
        on_total(len(todo))
    if todo or prune:
        augment.mark_stale(store)  # cleared by the refresh at the end: a crash keeps it
    store.begin_bulk(len(todo))

    writer = Writer(store, embedder, known, summary, batch_size, max_pixels, on_progress, on_skip)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        # By default the workers decode a batch, then the model runs alone. Decoding
        # beside a forward that already uses every core preempts its threads, and each
        # layer then waits for the slowest one: on 2 cores that doubled the forward's
        # time (ResNet50, 12 MP JPEGs), far more than the decoding it hid.
        if overlap:
            prepared = _bounded_map(writer.prepare, todo, pool, ahead=batch_size * 2 + workers)
        else:
            prepared = _chunked_map(writer.prepare, todo, pool, batch_size)
        for item in prepared:
            writer.add(item)
        writer.flush()
    rewritten = writer.rewritten

    # A shard judges only its own ids: another machine may mount the folder elsewhere.
    gone = [
        i
        for i, s in known.items()
        if i not in rewritten and (select is None or select(i)) and not Path(s.path).exists()
    ]
    if prune and gone:
        # Only rows still as scanned: one the API replaced meanwhile points at a new file.
        summary.pruned = store.delete(gone, expected={i: known[i] for i in gone})
        summary.kept += len(gone) - summary.pruned
    else:
        summary.missing = len(gone)
    finish_run(store, summary)
    return summary


def finish_run(store: Store, summary: Summary) -> None:
    """After a run of writes: rebuild what ``begin_bulk`` dropped, and recompute the DBA
    vectors if the run changed anything (or a crashed run left them stale)."""
    store.end_bulk()
    # This run's own changes too, not only the mark: a shard that finished first may
    # have cleared the mark this run set.
    changed = summary.indexed or summary.pruned
    if augment.enabled(store) and (changed or augment.is_stale(store)):
        summary.augmented = augment.refresh(store)


# The meta key recording the content hash of the metadata file last applied.
METADATA_KEY = "metadata_sha256"


def apply_metadata(
    store: Store,
    path: str | Path,
    added: Sequence[str] = (),
    shard: tuple[int, int] | None = None,
) -> tuple[int, list[tuple[str, str]]]:
    """Give the index's images their metadata from a metadata file (``metadata.py``):
    every listed image when the file changed since it was last applied, else only the
    images this run ``added``. Metadata set otherwise (``POST /images``) is left alone
    until the file changes. Returns how many images were written, and the file's rows
    that were refused."""
    digest, rows, refused = read_sidecar(path)
    key = METADATA_KEY + (f".{shard[0]}of{shard[1]}" if shard else "")
    changed = store.meta().get(key) != digest
    ids = [i for i in rows if shard is None or in_shard(i, shard)]
    if not changed:
        new = set(added)
        ids = [i for i in ids if i in new]
    written = 0
    for start in range(0, len(ids), 1000):
        written += store.set_metadata((i, rows[i]) for i in ids[start : start + 1000])
    if changed:
        store.set_meta(key, digest)
    return written, refused
