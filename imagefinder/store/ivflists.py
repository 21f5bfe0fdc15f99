"""The inverted file's lists as stored: the tables, the cached centroids, and the
upkeep of list sizes as writers file and forget codes (``ivf.py`` builds and searches).

Writers file a vector under its nearest centroid. Vectors of a kind the centroids were
not trained on crowd into one or a few lists, which then cost every probe that reads
them; so ``split_grown`` splits a list once it passes SPLIT_CAP times the mean size, in
the same transaction, without retraining the others.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import kmeans

log = logging.getLogger("imagefinder")

TABLE = "vec_ivf"
CENTROIDS = "ivf_centroids"
LISTS = "ivf_lists"
STATE = "ivf_state"
# Inserts split a list once it passes SPLIT_CAP times the mean size (a build splits at
# ivf.BUILD_CAP). A split list's new centroids can also be nearer to members of the
# lists around it: those of NEIGHBOURS nearest lists are re-filed too.
SPLIT_CAP = 3.0
NEIGHBOURS = 32
# vec0 refuses larger k.
MAX_CANDIDATES = 4096


@dataclass(frozen=True)
class Lists:
    build: str
    centroids: np.ndarray
    norms: np.ndarray
    centre: np.ndarray
    scale: float
    rows: int

    def nearest_list(self, vectors: np.ndarray) -> np.ndarray:
        return kmeans.nearest(vectors, self.centroids, self.norms)

    def code(self, vectors: np.ndarray) -> np.ndarray:
        """int8 codes: one scale for every dimension, so L2 between codes is L2 between
        vectors (times the scale) up to rounding."""
        scaled = np.rint((vectors - self.centre) * self.scale)
        return np.clip(scaled, -127, 127).astype(np.int8)


# Centroids by build id: a build id is unique to one build of one file, so a process
# serving several indexes, or seeing one rebuilt, never uses another's centroids.
_CACHE: OrderedDict[str, Lists] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def exists(conn: Any) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (STATE,)
        ).fetchone()
        is not None
    )


def load(conn: Any) -> Lists | None:
    """The current build's centroids (cached), or None if there is no structure."""
    try:
        row = conn.execute(f"SELECT build FROM {STATE}").fetchone()
    except Exception as e:  # sqlite3 or sqlean's OperationalError
        if "no such table" in str(e):
            return None
        raise
    if row is None:
        return None
    build = row[0]
    with _CACHE_LOCK:
        cached = _CACHE.get(build)
        if cached is not None:
            _CACHE.move_to_end(build)
            return cached
    rows, centre, scale = conn.execute(f"SELECT rows, centre, scale FROM {STATE}").fetchone()
    blobs = conn.execute(f"SELECT vector FROM {CENTROIDS} ORDER BY list").fetchall()
    dim = len(centre) // 4
    centroids = np.frombuffer(b"".join(b[0] for b in blobs), dtype=np.float32).reshape(-1, dim)
    lists = Lists(
        build,
        centroids,
        (centroids * centroids).sum(axis=1),
        np.frombuffer(centre, dtype=np.float32),
        float(scale),
        int(rows),
    )
    with _CACHE_LOCK:
        _CACHE[build] = lists
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return lists


# -- writes (inside the writer's transaction) ---------------------------------------


def file_codes(
    conn: Any,
    lists: Lists,
    rowids: list[int],
    into: np.ndarray,
    vectors: np.ndarray,
    count: bool = True,
) -> None:
    """Insert the codes of ``vectors`` under the lists ``into``, and count them."""
    codes = lists.code(vectors)
    conn.executemany(
        f"INSERT INTO {TABLE} (rowid, list, code) VALUES (?, ?, vec_int8(?))",
        [(r, int(n), c.tobytes()) for r, n, c in zip(rowids, into, codes, strict=True)],
    )
    if count:
        resize(conn, into.tolist(), +1)


def forget_codes(conn: Any, rowids: list[int]) -> list[int]:
    """Delete the codes of ``rowids`` (those that have one); returns their lists."""
    lists = []
    for rowid in rowids:
        row = conn.execute(f"SELECT list FROM {TABLE} WHERE rowid = ?", (rowid,)).fetchone()
        if row is not None:
            conn.execute(f"DELETE FROM {TABLE} WHERE rowid = ?", (rowid,))
            lists.append(int(row[0]))
    resize(conn, lists, -1)
    return lists


def resize(conn: Any, lists: list[int], sign: int) -> None:
    conn.executemany(
        f"UPDATE {LISTS} SET size = size + ? WHERE list = ?",
        [(sign * n, j) for j, n in Counter(lists).items()],
    )


def members(conn: Any, lists: Lists, j: int, size: int) -> list[int]:
    """The rowids filed under list ``j``: a KNN query scoped to the list returns all of
    them (up to vec0's k limit; a larger list keeps the rest where they are)."""
    found = conn.execute(
        f"SELECT rowid FROM {TABLE} WHERE code MATCH vec_int8(?) AND k = ? AND list = ?",
        (lists.code(lists.centroids[j]).tobytes(), max(1, min(size, MAX_CANDIDATES)), j),
    )
    return [r[0] for r in found]


def split_grown(conn: Any) -> None:
    """Split the lists that inserts have grown past their ``split_at`` and past
    SPLIT_CAP times today's mean (new kinds of images crowding into one list).

    Their members go to their nearest centroid, new ones included; so do the members of
    the NEIGHBOURS lists nearest to each split one, the only others a new centroid can
    plausibly be nearer to (a full pass would read the whole index)."""
    sizes = dict(conn.execute(f"SELECT list, size FROM {LISTS}").fetchall())
    mean = max(1.0, sum(sizes.values()) / max(len(sizes), 1))
    grown = [
        int(j)
        for (j,) in conn.execute(
            f"SELECT list FROM {LISTS} WHERE size > split_at AND size > ?", (SPLIT_CAP * mean,)
        )
    ]
    if not grown:
        return
    lists = load(conn)
    assert lists is not None
    near: set[int] = set()
    for j in grown:
        d = lists.norms - 2 * (lists.centroids @ lists.centroids[j])
        near |= {int(i) for i in np.argsort(d)[: NEIGHBOURS + 1]}
    near -= set(grown)
    filed = [(r, j) for j in grown + sorted(near) for r in members(conn, lists, j, sizes[j])]
    filed.sort()
    rowids = np.array([r for r, _ in filed], dtype=np.int64)
    before = np.array([j for _, j in filed], dtype=np.int64)
    vectors = read_vectors(conn, rowids)
    after = before.copy()
    old = len(lists.centroids)
    centroids = kmeans.split_lists(
        lists.centroids.copy(), after, np.array(grown), vectors.__getitem__, mean
    )
    changed = np.array(grown + list(range(old, len(centroids))), dtype=np.int64)
    around = np.flatnonzero(np.isin(before, sorted(near)))
    after[around] = kmeans.refile(vectors[around], before[around], centroids, changed)
    conn.executemany(
        f"UPDATE {CENTROIDS} SET vector = ? WHERE list = ?",
        [(centroids[j].tobytes(), j) for j in grown],
    )
    conn.executemany(
        f"INSERT INTO {CENTROIDS} (list, vector) VALUES (?, ?)",
        [(j, centroids[j].tobytes()) for j in range(old, len(centroids))],
    )
    conn.executemany(
        f"INSERT INTO {LISTS} (list, size, split_at) VALUES (?, 0, 0)",
        [(j,) for j in range(old, len(centroids))],
    )
    moved = np.flatnonzero(after != before)
    forget_codes(conn, rowids[moved].tolist())
    conn.execute(f"UPDATE {STATE} SET build = ?", (uuid.uuid4().hex,))
    lists = load(conn)
    assert lists is not None
    file_codes(conn, lists, rowids[moved].tolist(), after[moved], vectors[moved])
    log.info(
        "inverted file: split %d lists of %d-%d vectors into %d; %d vectors moved",
        len(grown),
        min(sizes[j] for j in grown),
        max(sizes[j] for j in grown),
        len(grown) + len(centroids) - old,
        len(moved),
    )
    # Split again at SPLIT_CAP times the mean, or at twice the present size for a list
    # that splitting could not shrink (near-duplicates): not at every insert.
    conn.executemany(
        f"UPDATE {LISTS} SET split_at = max(?, 2 * size) WHERE list = ?",
        [(math.ceil(SPLIT_CAP * mean), int(j)) for j in changed],
    )


def read_vectors(conn: Any, rowids: np.ndarray) -> np.ndarray:
    """The vectors of ``rowids`` (ascending, all present), in that order."""
    blobs = []
    for lo in range(0, len(rowids), 500):  # SQLite's bound-parameter limit
        part = [int(r) for r in rowids[lo : lo + 500]]
        blobs += conn.execute(
            f"SELECT embedding FROM images WHERE rowid IN ({','.join('?' * len(part))}) "
            "ORDER BY rowid",
            part,
        ).fetchall()
    if len(blobs) != len(rowids):
        raise RuntimeError("rows vanished inside a write transaction")
    return np.frombuffer(b"".join(b[0] for b in blobs), dtype=np.float32).reshape(len(blobs), -1)
