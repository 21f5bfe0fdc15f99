"""Database-side augmentation in a SQLite index: the augmented vectors, in SQL.

While an index has DBA on, ``vec_dba`` (a vec0 table keyed by ``images.rowid``) holds
one ranking vector per image, and searches that ask for it rank by those; the raw
vectors stay in ``images.embedding`` and ``vec_images`` for exact lookups, distances
and re-computing. Triggers keep the table covering exactly the rows of ``images``, in
the writer's own transaction and whichever ImageFinder writes (an older one included):
a new or replaced image enters with its raw vector, until ``augment.refresh`` or
``augment.repair`` gives it its neighbourhood, and a deleted one leaves. The table and
its triggers exist exactly while the meta has ``dba``; all change in one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

TABLE = "vec_dba"
CHUNK = 256  # as vec_images (sqlite.VEC_CHUNK)
TRIGGERS = {
    "vec_dba_insert": f"""AFTER INSERT ON images BEGIN
        INSERT INTO {TABLE} (rowid, embedding) VALUES (new.rowid, new.embedding); END""",
    "vec_dba_update": f"""AFTER UPDATE OF embedding ON images BEGIN
        DELETE FROM {TABLE} WHERE rowid = old.rowid;
        INSERT INTO {TABLE} (rowid, embedding) VALUES (new.rowid, new.embedding); END""",
    "vec_dba_delete": f"""AFTER DELETE ON images BEGIN
        DELETE FROM {TABLE} WHERE rowid = old.rowid; END""",
}


def exists(conn: Any) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
        ).fetchone()
        is not None
    )


def create(conn: Any, dim: int) -> None:
    """Create the table with every image's raw vector (inside a write)."""
    conn.execute(
        f"CREATE VIRTUAL TABLE IF NOT EXISTS {TABLE} USING vec0("
        f"embedding float[{dim}] distance_metric=l2, chunk_size={CHUNK})"
    )
    conn.execute(f"INSERT INTO {TABLE} (rowid, embedding) SELECT rowid, embedding FROM images")
    for name, body in TRIGGERS.items():
        conn.execute(f"CREATE TRIGGER {name} {body}")


def drop(conn: Any) -> None:
    for name in TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")


def write(conn: Any, rows: Iterable[tuple[str, bytes]]) -> int:
    """Replace the augmented vectors of existing ids; ids gone meanwhile are skipped."""
    n = 0
    for image_id, blob in rows:
        row = conn.execute("SELECT rowid FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            continue
        conn.execute(f"DELETE FROM {TABLE} WHERE rowid = ?", (row[0],))
        conn.execute(f"INSERT INTO {TABLE} (rowid, embedding) VALUES (?, ?)", (row[0], blob))
        n += 1
    return n


def vectors(conn: Any, ids: Sequence[str]) -> dict[str, np.ndarray]:
    out = {}
    for image_id in ids:
        row = conn.execute(
            f"SELECT d.embedding FROM images JOIN {TABLE} d ON d.rowid = images.rowid "
            "WHERE images.id = ?",
            (image_id,),
        ).fetchone()
        if row:
            out[image_id] = np.frombuffer(row[0], dtype=np.float32).copy()
    return out


def nearest(conn: Any, blob: bytes, fetch: int) -> list[tuple[str, float]]:
    """The ``fetch`` nearest (id, L2 distance to the augmented vector): an exact scan."""
    rows = conn.execute(
        f"""WITH knn AS (
               SELECT rowid, distance FROM {TABLE} WHERE embedding MATCH ? AND k = ?
           )
           SELECT images.id, knn.distance FROM knn
           JOIN images ON images.rowid = knn.rowid
           ORDER BY knn.distance""",
        (blob, fetch),
    ).fetchall()
    return [(i, float(d)) for i, d in rows]
