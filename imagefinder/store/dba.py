"""Database-side augmentation in a SQLite index: the augmented vectors, in SQL.

While an index has DBA on, ``images_dba`` (keyed by ``images.rowid``) holds one
augmented vector per image; searches re-rank their candidates by them (query.py). The
raw vectors stay in ``images.embedding`` and ``vec_images`` for the search itself, exact
lookups, distances and re-computing. Triggers keep the table covering exactly the rows of ``images``, in
the writer's own transaction and whichever ImageFinder writes (an older one included):
a new or replaced image enters with its raw vector, until ``augment.refresh`` or
``augment.repair`` gives it its neighbourhood, and a deleted one leaves. The table and
its triggers exist exactly while the meta has ``dba``; all change in one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

TABLE = "images_dba"
TRIGGERS = {
    "images_dba_insert": f"""AFTER INSERT ON images BEGIN
        INSERT INTO {TABLE} (rowid, embedding) VALUES (new.rowid, new.embedding); END""",
    "images_dba_update": f"""AFTER UPDATE OF embedding ON images BEGIN
        INSERT OR REPLACE INTO {TABLE} (rowid, embedding) VALUES (new.rowid, new.embedding);
        END""",
    "images_dba_delete": f"""AFTER DELETE ON images BEGIN
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
        f"CREATE TABLE IF NOT EXISTS {TABLE} (rowid INTEGER PRIMARY KEY, embedding BLOB NOT NULL)"
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
        conn.execute(f"UPDATE {TABLE} SET embedding = ? WHERE rowid = ?", (blob, row[0]))
        n += 1
    return n


def vectors(conn: Any, ids: Sequence[str]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
        chunk = list(ids[start : start + 500])
        rows = conn.execute(
            f"SELECT images.id, d.embedding FROM images JOIN {TABLE} d "
            f"ON d.rowid = images.rowid WHERE images.id IN ({', '.join('?' * len(chunk))})",
            chunk,
        )
        out.update((i, np.frombuffer(blob, dtype=np.float32).copy()) for i, blob in rows)
    return out
