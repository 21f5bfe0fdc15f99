"""The coarse index that keeps KNN fast on large SQLite indexes, in SQL.

sqlite-vec's vec0 only scans, and an exact scan of 2048-d float vectors costs
~20 ms per 10k here. So large indexes also keep one bit per dimension per vector in
``vec_coarse`` (a ``bit[dim]`` vec0 table, 32x smaller): a search takes the
``candidates`` nearest by Hamming distance, then re-ranks them by exact L2 against
``images.embedding`` in the same statement (vec0 point lookups by rowid are slow).

The bits are ``vector - centre > 0``. CNN features are mostly non-negative
(post-ReLU pooling), so signs of the raw vectors would be almost all ones and carry
nothing. The centre is the per-dimension median, which splits every dimension
exactly in half: on the Caltech photos (efficientnet-lite0) 40 candidates then hold
the true 3 nearest 99.3% of the time, against 97.8% when centred on the mean. The
centre is computed when the table is built (from up to ``SAMPLE`` vectors) and
stored beside it; new vectors are coded with the same centre, and the table is
rebuilt when the index has doubled since, so the centre follows the catalogue.

Writers keep the table consistent in the same transaction as the rows it mirrors.
It exists exactly while the index holds at least ``min_rows`` vectors (dropped
again below half that); readers use it whenever it exists.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import keyset_pages

TABLE = "vec_coarse"
CENTRE = "coarse_centre"
SAMPLE = 20_000
# Below this many vectors an exact scan takes ~10 ms or less at 2048-d, so exact it
# stays (bench/bench.py measures both modes on both sides of it).
MIN_ROWS = 5_000
MODE_EXACT = "exact"
MODE_BINARY = "binary+rerank"

_CODE = f"vec_quantize_binary(vec_sub(?, (SELECT vector FROM {CENTRE})))"


def exists(conn: Any) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (CENTRE,)
        ).fetchone()
        is not None
    )


def add(conn: Any, rowid: int, blob: bytes, replacing: bool) -> None:
    """Mirror one upserted vector (call only while the table exists)."""
    if replacing:
        conn.execute(f"DELETE FROM {TABLE} WHERE rowid = ?", (rowid,))
    conn.execute(f"INSERT INTO {TABLE} (rowid, embedding) VALUES (?, {_CODE})", (rowid, blob))


def remove(conn: Any, rowid: int) -> None:
    conn.execute(f"DELETE FROM {TABLE} WHERE rowid = ?", (rowid,))


def sync(conn: Any, min_rows: int) -> None:
    """Build, rebuild or drop the table for the index's current size (inside a write)."""
    count = conn.execute("SELECT count(*) FROM images").fetchone()[0]
    if exists(conn):
        built_at = conn.execute(f"SELECT rows FROM {CENTRE}").fetchone()[0]
        if count < min_rows // 2:
            drop(conn)
        elif count >= 2 * max(built_at, 1):
            build(conn)
    elif count >= min_rows and count > 0:
        build(conn)


def drop(conn: Any) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.execute(f"DROP TABLE IF EXISTS {CENTRE}")


def build(conn: Any) -> None:
    """(Re)create the table from ``images``: the centre first, then every code in one statement."""
    dim = int(conn.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()[0])
    count = conn.execute("SELECT count(*) FROM images").fetchone()[0]
    step = max(1, count // SAMPLE)
    sample: list[bytes] = []
    seen = 0

    def fetch(after: int, limit: int) -> list[Any]:
        return conn.execute(
            "SELECT rowid, embedding FROM images WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (after, limit),
        ).fetchall()

    # Paged: memory is bounded by the sample, however large the index.
    for rows in keyset_pages(fetch, -1, 4096):
        sample += [r[1] for i, r in enumerate(rows, seen) if i % step == 0]
        seen += len(rows)
    vectors = np.frombuffer(b"".join(sample), dtype=np.float32).reshape(len(sample), dim)
    centre = np.median(vectors, axis=0).astype(np.float32)
    drop(conn)
    conn.execute(f"CREATE VIRTUAL TABLE {TABLE} USING vec0(embedding bit[{dim}])")
    conn.execute(
        f"CREATE TABLE {CENTRE} (id INTEGER PRIMARY KEY CHECK (id = 1), "
        "vector BLOB NOT NULL, rows INTEGER NOT NULL)"
    )
    conn.execute(f"INSERT INTO {CENTRE} VALUES (1, ?, ?)", (centre.tobytes(), count))
    conn.execute(
        f"INSERT INTO {TABLE} (rowid, embedding) "
        f"SELECT rowid, vec_quantize_binary(vec_sub(embedding, (SELECT vector FROM {CENTRE}))) "
        "FROM images"
    )


def search(conn: Any, blob: bytes, fetch: int, candidates: int) -> list[tuple[str, float]]:
    """``fetch`` nearest (id, L2 distance): Hamming pre-selection, exact re-rank."""
    return conn.execute(
        f"""WITH coarse AS (
                SELECT rowid FROM {TABLE}
                WHERE embedding MATCH vec_quantize_binary(
                    vec_sub(:q, (SELECT vector FROM {CENTRE})))
                AND k = :candidates
            )
            SELECT images.id, vec_distance_l2(images.embedding, :q) AS distance
            FROM coarse JOIN images ON images.rowid = coarse.rowid
            ORDER BY distance LIMIT :fetch""",
        {"q": blob, "candidates": max(candidates, fetch), "fetch": fetch},
    ).fetchall()
