"""The inverted-file index that keeps KNN fast on large SQLite indexes, inside the file.

An exact ``vec0`` scan costs ~2.6 us per 2048-d vector here (2.6 s at 1M), and one
Hamming pass over every vector does not separate neighbours at that density (recall@10
0.44 at 1M). So from ``MIN_ROWS`` vectors on, the index also keeps:

- ``ivf_centroids``: k-means centroids (``kmeans.py``), 4 sqrt(n) of them; each
  vector belongs to the list of its nearest centroid;
- ``vec_ivf``: an int8 code per vector (``(vector - centre) * scale``, the centre the
  per-dimension median, one scale for all dimensions so code distances rank like
  vector distances), in a ``vec0`` table whose partition key is the list: a list's
  codes sit together in a few chunk blobs, read in one go;
- ``ivf_state``: the centre, the scale, the row count it was trained at, and a build
  id that readers key their in-memory copy of the centroids on.

A search ranks the centroids in numpy, takes the ``candidates`` nearest codes of the
``nprobe`` nearest lists in one statement, and re-ranks them by exact L2 against
``images.embedding`` in the same statement: distances returned are always exact, of
rows that exist. Both counts grow with the number of results asked for, so deep pages
keep their recall.

Why int8 and not one bit per dimension: bits rank so loosely that 200-400 candidates
must be re-ranked for recall@10 >= 0.99, each a random 8 KB read from the 17 GB file of
a 1M index (bench/results/stores-1000000-bitcodes.json: p50 108-195 ms). int8 codes
rank almost exactly, so 40 candidates do; they cost 2 KB per vector (2 GB at 1M)
against 256 bytes. At 1M on clustered data a few lists still grow to 50-80k vectors
(hubs), and a probe of one scans it whole: bounding list sizes there is still to do.

SQLite stays the source of truth: writers keep ``vec_ivf`` in the same transaction as
the rows it mirrors, and a (re)build is one transaction, so a crash leaves either the
old structure or the new one, never a mix. Readers read the build id and search in one
read transaction. The structure is (re)built when the index first reaches ``MIN_ROWS``
and whenever it has doubled since, so the lists follow the catalogue; it is dropped
below half of ``MIN_ROWS``, where an exact scan is as fast.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import kmeans
from .base import keyset_pages

log = logging.getLogger("imagefinder")

TABLE = "vec_ivf"
CENTROIDS = "ivf_centroids"
LISTS = "ivf_lists"
STATE = "ivf_state"
# Below this many vectors an exact scan takes ~10 ms or less at 2048-d, so exact it stays.
MIN_ROWS = 5_000
MODE_EXACT = "exact"
MODE_IVF = "ivf+rerank"
# k-means trains on this many vectors per list, at most SAMPLE_MAX in all: 16 per list
# kept the recall of 64 per list (100k clustered vectors, 1265 lists) at a quarter of
# the training time.
SAMPLE_PER_LIST = kmeans.SAMPLE_PER_LIST
SAMPLE_MAX = 65_536
# A build splits every list above BUILD_CAP times the mean size; inserts split a list
# once it passes SPLIT_CAP times the mean. (On clustered vectors a cap of 2 left the
# largest list at 2.5x the mean, and a search's scan within 10% of a balanced one.)
BUILD_CAP = 2.0
SPLIT_CAP = 3.0
# A split list's new centroids can also be nearer to members of the lists around it:
# those of this many nearest lists are re-filed too.
NEIGHBOURS = 32
# vec0 refuses larger k.
MAX_CANDIDATES = 4096
# One SELECT per probed list, and SQLite compounds at most 500 (12% of the lists at 1M).
MAX_PROBES = 500
# The defaults are per RESULTS_PER_PROBE results asked for: a search for 100 probes ten
# times the lists and re-ranks ten times the candidates of a search for 10.
RESULTS_PER_PROBE = 10
PAGE = 4096
# Codes per vec0 chunk (256 KB of int8 at 2048-d): lists hold ~sqrt(n)/4 vectors (250
# at 1M), and every list has at least one chunk, so vec0's default of 1024 would be
# mostly empty space.
CHUNK = 128


def lists_for(rows: int) -> int:
    """How many lists an index of ``rows`` vectors is split into: 4 sqrt(n), the low
    end of faiss's guideline, and lists of at least 32 vectors. Fewer lists than the
    data has natural clusters merge clusters, and a merged centroid sits nearer to
    everything: at 100k clustered vectors 316 lists grew one list of 10k (10% of the
    index scanned by every probe that touches it), where 1265 lists stay within 1.5x
    of their mean size."""
    return max(1, min(rows // 32, round(4 * math.sqrt(rows))))


@dataclass(frozen=True)
class _Lists:
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
_CACHE: OrderedDict[str, _Lists] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def exists(conn: Any) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (STATE,)
        ).fetchone()
        is not None
    )


def _lists(conn: Any) -> _Lists | None:
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
    lists = _Lists(
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


def add(conn: Any, rows: list[tuple[int, np.ndarray, bool]]) -> None:
    """Mirror upserted vectors: (rowid, vector, replacing) each. One matrix product for
    the batch: one vector against 4,000 centroids is a 32 MB read on its own. A list
    that has grown far above the mean is split before the transaction ends."""
    lists = _lists(conn)
    if lists is None or not rows:
        return
    # An id twice in one batch: its last vector wins, and it had a code before the
    # batch only if its first occurrence was a replacement.
    latest: dict[int, tuple[np.ndarray, bool]] = {}
    for rowid, vector, replacing in rows:
        latest[rowid] = (vector, latest[rowid][1] if rowid in latest else replacing)
    _forget(conn, [rowid for rowid, (_, replacing) in latest.items() if replacing])
    vectors = np.stack([np.asarray(v, dtype=np.float32) for v, _ in latest.values()])
    nearest = lists.nearest_list(vectors)
    _file(conn, lists, list(latest), nearest, vectors)
    _split_grown(conn)


def remove(conn: Any, rowid: int) -> None:
    _forget(conn, [rowid])


def _file(
    conn: Any,
    lists: _Lists,
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
        _count(conn, into.tolist(), +1)


def _forget(conn: Any, rowids: list[int]) -> list[int]:
    """Delete the codes of ``rowids`` (those that have one); returns their lists."""
    lists = []
    for rowid in rowids:
        row = conn.execute(f"SELECT list FROM {TABLE} WHERE rowid = ?", (rowid,)).fetchone()
        if row is not None:
            conn.execute(f"DELETE FROM {TABLE} WHERE rowid = ?", (rowid,))
            lists.append(int(row[0]))
    _count(conn, lists, -1)
    return lists


def _count(conn: Any, lists: list[int], sign: int) -> None:
    conn.executemany(
        f"UPDATE {LISTS} SET size = size + ? WHERE list = ?",
        [(sign * n, j) for j, n in Counter(lists).items()],
    )


def _members(conn: Any, lists: _Lists, j: int, size: int) -> list[int]:
    """The rowids filed under list ``j``: a KNN query scoped to the list returns all of
    them (up to vec0's k limit; a larger list keeps the rest where they are)."""
    found = conn.execute(
        f"SELECT rowid FROM {TABLE} WHERE code MATCH vec_int8(?) AND k = ? AND list = ?",
        (lists.code(lists.centroids[j]).tobytes(), max(1, min(size, MAX_CANDIDATES)), j),
    )
    return [r[0] for r in found]


def _split_grown(conn: Any) -> None:
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
    lists = _lists(conn)
    assert lists is not None
    near: set[int] = set()
    for j in grown:
        d = lists.norms - 2 * (lists.centroids @ lists.centroids[j])
        near |= {int(i) for i in np.argsort(d)[: NEIGHBOURS + 1]}
    near -= set(grown)
    filed = [(r, j) for j in grown + sorted(near) for r in _members(conn, lists, j, sizes[j])]
    filed.sort()
    rowids = np.array([r for r, _ in filed], dtype=np.int64)
    before = np.array([j for _, j in filed], dtype=np.int64)
    vectors = _vectors(conn, rowids)
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
    _forget(conn, rowids[moved].tolist())
    conn.execute(f"UPDATE {STATE} SET build = ?", (uuid.uuid4().hex,))
    lists = _lists(conn)
    assert lists is not None
    _file(conn, lists, rowids[moved].tolist(), after[moved], vectors[moved])
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


def sync(conn: Any, min_rows: int) -> None:
    """Build, rebuild or drop the structure for the index's current size (inside a write)."""
    count = conn.execute("SELECT count(*) FROM images").fetchone()[0]
    if exists(conn):
        built_at = conn.execute(f"SELECT rows FROM {STATE}").fetchone()[0]
        if count < min_rows // 2:
            drop(conn)
        elif count >= 2 * max(built_at, 1):
            build(conn)
    elif count >= min_rows and count > 0:
        build(conn)


def drop(conn: Any) -> None:
    for table in (TABLE, CENTROIDS, LISTS, STATE):
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def _index_partitions(conn: Any) -> None:
    """Index vec0's chunk table by partition. sqlite-vec 0.1.9 finds a partition's
    chunks by scanning every chunk row: with 4,000 lists each probe and each insert
    read them all (0.30 ms per probe, 2 ms per insert at 4,000 lists; 0.03 ms and
    0.06 ms with this index). The shadow table is sqlite-vec's own layout, so a version
    that names it otherwise only loses the speed-up, never a row."""
    columns = {r[1] for r in conn.execute(f"PRAGMA table_info({TABLE}_chunks)")}
    if "partition00" in columns:
        conn.execute(
            f"CREATE INDEX IF NOT EXISTS {TABLE}_chunks_list ON {TABLE}_chunks(partition00)"
        )


def _vectors(conn: Any, rowids: np.ndarray) -> np.ndarray:
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


def _sample(conn: Any, size: int) -> np.ndarray:
    """Up to ``size`` vectors, evenly spread over the rowids. Reads only the sampled
    rows' vectors: at 1M the vectors are 8 GB. (``ORDER BY id`` reads the rowids from
    the id index; the table's own pages are mostly vector.)"""
    rowids = np.sort([r[0] for r in conn.execute("SELECT rowid FROM images ORDER BY id")])
    picked = rowids[np.linspace(0, len(rowids) - 1, min(size, len(rowids))).astype(np.int64)]
    return _vectors(conn, np.unique(picked))


def _pages(conn: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every (rowids, vectors), a page at a time, in rowid order."""

    def fetch(after: int, limit: int) -> list[Any]:
        return conn.execute(
            "SELECT rowid, embedding FROM images WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (after, limit),
        ).fetchall()

    for rows in keyset_pages(fetch, -1, PAGE):
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
        yield np.array([r[0] for r in rows], dtype=np.int64), vectors.reshape(len(rows), -1)


def build(conn: Any) -> None:
    """(Re)create the structure from ``images`` in the caller's transaction: train the
    centroids on a sample, file every vector under its nearest, split the lists that
    came out far above the mean, then write the codes, a page at a time."""
    dim = int(conn.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()[0])
    count = conn.execute("SELECT count(*) FROM images").fetchone()[0]
    nlists = lists_for(count)
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    sample = _sample(conn, min(SAMPLE_MAX, SAMPLE_PER_LIST * nlists))
    centroids = kmeans.train(sample, nlists)
    centre = np.median(sample, axis=0).astype(np.float32)
    # The sample's largest deviation maps to 127: the rare larger one is clipped.
    scale = 127.0 / max(float(np.abs(sample - centre).max()), 1e-12)
    del sample
    train_s = lap()
    norms = (centroids * centroids).sum(axis=1)
    pages = [(r, kmeans.nearest(v, centroids, norms)) for r, v in _pages(conn)]
    rowids = np.concatenate([r for r, _ in pages]) if pages else np.empty(0, np.int64)
    assigned = np.concatenate([a for _, a in pages]) if pages else np.empty(0, np.int64)
    del pages
    assign_s = lap()
    mean = count / nlists
    centroids, changed = kmeans.balance(
        centroids, assigned, lambda at: _vectors(conn, rowids[at]), BUILD_CAP * mean, mean
    )
    balance_s = lap()
    drop(conn)
    conn.execute(
        f"CREATE VIRTUAL TABLE {TABLE} USING vec0("
        f"list integer partition key, code int8[{dim}], chunk_size={CHUNK})"
    )
    _index_partitions(conn)
    conn.execute(f"CREATE TABLE {CENTROIDS} (list INTEGER PRIMARY KEY, vector BLOB NOT NULL)")
    conn.execute(
        f"CREATE TABLE {LISTS} (list INTEGER PRIMARY KEY, size INTEGER NOT NULL, "
        "split_at INTEGER NOT NULL)"
    )
    conn.execute(
        f"CREATE TABLE {STATE} (id INTEGER PRIMARY KEY CHECK (id = 1), build TEXT NOT NULL, "
        "rows INTEGER NOT NULL, centre BLOB NOT NULL, scale REAL NOT NULL)"
    )
    conn.executemany(
        f"INSERT INTO {CENTROIDS} VALUES (?, ?)",
        ((i, c.tobytes()) for i, c in enumerate(centroids)),
    )
    conn.execute(
        f"INSERT INTO {STATE} VALUES (1, ?, ?, ?, ?)",
        (uuid.uuid4().hex, count, centre.tobytes(), scale),
    )
    lists = _lists(conn)
    assert lists is not None
    for page_rowids, vectors in _pages(conn):
        at = np.searchsorted(rowids, page_rowids)
        assigned[at] = kmeans.refile(vectors, assigned[at], centroids, changed)
        _file(conn, lists, page_rowids.tolist(), assigned[at], vectors, count=False)
    sizes = np.bincount(assigned, minlength=len(centroids))
    conn.executemany(
        f"INSERT INTO {LISTS} VALUES (?, ?, ?)",
        ((i, int(size), math.ceil(SPLIT_CAP * count / len(sizes))) for i, size in enumerate(sizes)),
    )
    write_s = lap()
    # Re-filing drew vectors to the new centroids, and can grow a list past the cap
    # that inserts keep: those few are split as an insert would split them.
    _split_grown(conn)
    log.info(
        "inverted file built: %d vectors, %d lists (%d from splits), largest %d; "
        "train %.1f s, assign %.1f s, split %.1f s, write %.1f s, last splits %.1f s",
        count,
        len(centroids),
        len(centroids) - nlists,
        int(sizes.max(initial=0)),
        train_s,
        assign_s,
        balance_s,
        write_s,
        lap(),
    )


def preload(conn: Any) -> int:
    """Load the centroids into this process's cache and read every code once, so that
    the page cache holds them (2 GB at 1M): a probe then costs no disk reads but the
    re-rank's. Returns the bytes read (0 without an inverted file). vec0 keeps each
    list's codes in chunk blobs of its shadow table."""
    conn.execute("BEGIN")
    try:
        lists = _lists(conn)
        if lists is None:
            return 0
        read = lists.centroids.nbytes
        try:
            # Fetched, not summed in SQL: length() of a blob reads only its header.
            for (blob,) in conn.execute(f"SELECT vectors FROM {TABLE}_vector_chunks00"):
                read += len(blob)
        except Exception as e:  # a vec0 with another layout: the centroids only
            if "no such table" not in str(e):
                raise
        return read
    finally:
        conn.execute("COMMIT")


# -- search ----------------------------------------------------------------------------


def search(
    conn: Any, vector: np.ndarray, fetch: int, nprobe: int, candidates: int
) -> list[tuple[str, float]] | None:
    """The ``fetch`` nearest (id, exact L2 distance), or None if there is no structure.

    ``nprobe`` lists and ``candidates`` codes are for up to ``RESULTS_PER_PROBE``
    results; deeper requests scale both."""
    vector = np.asarray(vector, dtype=np.float32)
    scale = max(1.0, fetch / RESULTS_PER_PROBE)
    # The centroids and the lists they index come from one snapshot.
    conn.execute("BEGIN")
    try:
        lists = _lists(conn)
        if lists is None:
            return None
        nlists = len(lists.centroids)
        probes = min(nlists, MAX_PROBES, math.ceil(nprobe * scale))
        distances = lists.norms - 2 * (lists.centroids @ vector)
        if probes < nlists:
            chosen = np.argpartition(distances, probes - 1)[:probes]
        else:
            chosen = np.arange(nlists)
        wanted = min(MAX_CANDIDATES, max(fetch, math.ceil(candidates * scale)))
        # One vec0 query per list, in one statement: vec0 (0.1.9) answers an IN on the
        # partition key 4x slower than these (and with k per partition anyway). The
        # ORDER BY ... LIMIT keeps the overall nearest codes; MATERIALIZED keeps SQLite
        # from handing that LIMIT to vec0 as well, which it refuses beside k.
        per_list = " UNION ALL ".join(
            f"SELECT rowid, distance FROM {TABLE} "
            f"WHERE code MATCH vec_int8(:code) AND k = :wanted AND list = :l{i}"
            for i in range(len(chosen))
        )
        params: dict[str, Any] = {f"l{i}": int(c) for i, c in enumerate(chosen)}
        params.update(code=lists.code(vector).tobytes(), wanted=wanted, q=vector.tobytes())
        rows = conn.execute(
            f"""WITH hits AS MATERIALIZED ({per_list}),
                best AS (SELECT rowid FROM hits ORDER BY distance LIMIT :wanted)
                SELECT images.id, vec_distance_l2(images.embedding, :q) AS distance
                FROM best JOIN images ON images.rowid = best.rowid
                ORDER BY distance LIMIT :fetch""",
            {**params, "fetch": fetch},
        ).fetchall()
        return [(i, float(d)) for i, d in rows]
    finally:
        conn.execute("COMMIT")
