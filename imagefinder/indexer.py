"""Extraction: a folder of images -> vectors in the index, incrementally.

The pipeline keeps the model busy. Worker threads read, hash, decode (JPEGs at a
reduced DCT scale) and preprocess files while the main thread runs batched
inference and commits each batch in its own transaction. The queue between them
is bounded, so memory stays flat however large the folder is.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from . import augment
from .config import DEFAULT_MAX_PIXELS
from .errors import ImageError
from .files import sha256_file
from .images import is_image_path, load_rgb
from .model.embedder import Embedder
from .store import Item, Store

T = TypeVar("T")
R = TypeVar("R")
# What a decode worker hands back: the file, its hash, its tensor (None when its content
# is already indexed), or the reason it was skipped.
Prepared = tuple["Candidate", str | None, torch.Tensor | None, str | None]


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
    problems: list[tuple[str, str]] = field(default_factory=list)

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
        summary.skipped += 1
        summary.problems.append((path, reason))
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
    # Ids whose rows this run rewrote: the snapshot in ``known`` still shows their old
    # file, which may be gone because another file (a.png replacing a.jpg) took over the
    # id; such a row is current, not an orphan to report or prune.
    rewritten: set[str] = set()

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

    def prepare(c: Candidate) -> Prepared:
        """Runs in a worker: hash, decide, decode, preprocess."""
        try:
            digest = sha256_file(c.path)
            state = known.get(c.id)
            if state and state.sha256 == digest:
                return c, digest, None, None
            img = load_rgb(c.path, max_pixels, min_side=embedder.min_side)
            return c, digest, embedder.preprocess(img), None
        except (ImageError, OSError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            return c, None, None, reason

    batch: list[tuple[Candidate, str, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        vectors = embedder.embed_tensors(torch.stack([t for _, _, t in batch]))
        # Conditional on each row being as the scan saw it: an image the API replaced or
        # deleted meanwhile is newer than this run's view, and wins.
        written = store.upsert(
            (
                Item(c.id, str(c.path), digest, c.size, c.mtime_ns, v)
                for (c, digest, _), v in zip(batch, vectors, strict=True)
            ),
            expected={c.id: known.get(c.id) for c, _, _ in batch},
        )
        summary.indexed += written
        summary.kept += len(batch) - written
        rewritten.update(c.id for c, _, _ in batch)
        if on_progress:
            on_progress(len(batch))
        batch.clear()

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        # By default the workers decode a batch, then the model runs alone. Decoding
        # beside a forward that already uses every core preempts its threads, and each
        # layer then waits for the slowest one: on 2 cores that doubled the forward's
        # time (ResNet50, 12 MP JPEGs), far more than the decoding it hid.
        if overlap:
            prepared = _bounded_map(prepare, todo, pool, ahead=batch_size * 2 + workers)
        else:
            prepared = _chunked_map(prepare, todo, pool, batch_size)
        for c, digest, tensor, reason in prepared:
            if reason is not None:
                skip(c.shown or str(c.path), reason)
                if on_progress:
                    on_progress(1)
            elif tensor is None:  # same content, new path or mtime
                if store.touch(c.id, str(c.path), c.size, c.mtime_ns, expected=known[c.id]):
                    summary.unchanged += 1
                else:
                    summary.kept += 1
                rewritten.add(c.id)
                if on_progress:
                    on_progress(1)
            else:
                assert digest is not None  # every tensor comes with its file's hash
                batch.append((c, digest, tensor))
                if len(batch) >= batch_size:
                    flush()
        flush()

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
    store.end_bulk()
    # This run's own changes too, not only the mark: a shard that finished first may
    # have cleared the mark this run set.
    changed = summary.indexed or summary.pruned
    if augment.enabled(store) and (changed or augment.is_stale(store)):
        summary.augmented = augment.refresh(store)
    return summary
