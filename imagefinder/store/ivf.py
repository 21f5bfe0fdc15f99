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
- ``ivf_lists``: each list's size, and the size at which inserts split it;
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
rank almost exactly, so 20-40 candidates do; they cost 2 KB per vector (2 GB at 1M)
against 256 bytes.

A probe costs the size of the lists it reads, and plain k-means at 1M grew *hub* lists
of 50-80k vectors (median 250) that nearly every query probed. So a build splits every
list above BUILD_CAP times the mean (``kmeans.balance``), and writers split a list that
inserts crowd (``ivflists.split_grown``); ``ivf_lists`` keeps each list's size for that.

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
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import ivflists, kmeans
from .base import keyset_pages
from .ivflists import CENTROIDS, LISTS, MAX_CANDIDATES, SPLIT_CAP, STATE, TABLE, exists

log = logging.getLogger("imagefinder")

# Below this many vectors an exact scan takes ~10 ms or less at 2048-d, so exact it stays.
MIN_ROWS = 5_000
MODE_EXACT = "exact"
MODE_IVF = "ivf+rerank"
# k-means trains on this many vectors per list, at most SAMPLE_MAX in all: 16 per list
# kept the recall of 64 per list (100k clustered vectors, 1265 lists) at a quarter of
# the training time.
SAMPLE_PER_LIST = kmeans.SAMPLE_PER_LIST
SAMPLE_MAX = 65_536
# A build splits every list above BUILD_CAP times the mean size (inserts at
# ivflists.SPLIT_CAP). On clustered vectors a cap of 2 left the largest list at 2.5x
# the mean, and a search's scan within 10% of a balanced one.
BUILD_CAP = 2.0
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


# -- writes (inside the writer's transaction) ---------------------------------------


def add(conn: Any, rows: list[tuple[int, np.ndarray, bool]]) -> None:
    """Mirror upserted vectors: (rowid, vector, replacing) each. One matrix product for
    the batch: one vector against 4,000 centroids is a 32 MB read on its own. A list
    that has grown far above the mean is split before the transaction ends."""
    lists = ivflists.load(conn)
    if lists is None or not rows:
        return
    # An id twice in one batch: its last vector wins, and it had a code before the
    # batch only if its first occurrence was a replacement.
    latest: dict[int, tuple[np.ndarray, bool]] = {}
    for rowid, vector, replacing in rows:
        latest[rowid] = (vector, latest[rowid][1] if rowid in latest else replacing)
    ivflists.forget_codes(conn, [rowid for rowid, (_, replacing) in latest.items() if replacing])
    vectors = np.stack([np.asarray(v, dtype=np.float32) for v, _ in latest.values()])
    nearest = lists.nearest_list(vectors)
    ivflists.file_codes(conn, lists, list(latest), nearest, vectors)
    ivflists.split_grown(conn)


def remove(conn: Any, rowid: int) -> None:
    ivflists.forget_codes(conn, [rowid])


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


def _sample(conn: Any, size: int) -> np.ndarray:
    """Up to ``size`` vectors, evenly spread over the rowids. Reads only the sampled
    rows' vectors: at 1M the vectors are 8 GB. (``ORDER BY id`` reads the rowids from
    the id index; the table's own pages are mostly vector.)"""
    rowids = np.sort([r[0] for r in conn.execute("SELECT rowid FROM images ORDER BY id")])
    picked = rowids[np.linspace(0, len(rowids) - 1, min(size, len(rowids))).astype(np.int64)]
    return ivflists.read_vectors(conn, np.unique(picked))


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
        centroids,
        assigned,
        lambda at: ivflists.read_vectors(conn, rowids[at]),
        BUILD_CAP * mean,
        mean,
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
    lists = ivflists.load(conn)
    assert lists is not None
    for page_rowids, vectors in _pages(conn):
        at = np.searchsorted(rowids, page_rowids)
        assigned[at] = kmeans.refile(vectors, assigned[at], centroids, changed)
        ivflists.file_codes(conn, lists, page_rowids.tolist(), assigned[at], vectors, count=False)
    sizes = np.bincount(assigned, minlength=len(centroids))
    conn.executemany(
        f"INSERT INTO {LISTS} VALUES (?, ?, ?)",
        ((i, int(size), math.ceil(SPLIT_CAP * count / len(sizes))) for i, size in enumerate(sizes)),
    )
    write_s = lap()
    # Re-filing drew vectors to the new centroids, and can grow a list past the cap
    # that inserts keep: those few are split as an insert would split them.
    ivflists.split_grown(conn)
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
        lists = ivflists.load(conn)
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
        lists = ivflists.load(conn)
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
