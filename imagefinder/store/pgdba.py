"""Database-side augmentation in a PostgreSQL index: the augmented vectors, in SQL.

While an index has DBA on, ``imagefinder_dba`` holds one augmented vector per image,
by which searches re-rank their candidates (query.py). A trigger keeps it covering exactly the rows of ``imagefinder_images``, whichever process
writes: a new or replaced image enters with its raw vector (until ``augment.refresh``
gives it its neighbourhood), and a deleted one leaves by the foreign key's cascade.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .pgnames import IMAGES

TABLE = "imagefinder_dba"
TRIGGER = "imagefinder_dba_mirror"


def exists(conn: Any) -> bool:
    return conn.execute("SELECT to_regclass(%s)", (TABLE,)).fetchone()[0] is not None


def create(conn: Any, dim: int) -> None:
    """Create the table with every image's raw vector, and the trigger (under the schema
    lock)."""
    conn.execute(
        f"""CREATE TABLE {TABLE} (
            id text COLLATE "C" PRIMARY KEY REFERENCES {IMAGES} (id) ON DELETE CASCADE,
            embedding vector({dim}) NOT NULL
        )"""
    )
    conn.execute(f"INSERT INTO {TABLE} SELECT id, embedding FROM {IMAGES}")
    conn.execute(
        f"""CREATE OR REPLACE FUNCTION {TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO {TABLE} VALUES (NEW.id, NEW.embedding)
                ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding;
                RETURN NEW;
            END $$"""
    )
    conn.execute(
        f"CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OF embedding ON {IMAGES} "
        f"FOR EACH ROW EXECUTE FUNCTION {TRIGGER}()"
    )


def drop(conn: Any) -> None:
    conn.execute(f"DROP TRIGGER IF EXISTS {TRIGGER} ON {IMAGES}")
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.execute(f"DROP FUNCTION IF EXISTS {TRIGGER}()")


def write(conn: Any, rows: Iterable[tuple[str, np.ndarray]]) -> int:
    params = [(np.asarray(v, dtype=np.float32), i) for i, v in rows]
    if not params:
        return 0
    with conn.cursor() as cur:
        cur.executemany(f"UPDATE {TABLE} SET embedding = %b WHERE id = %s", params)
        return max(0, cur.rowcount)


def vectors(conn: Any, table: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
    rows = conn.execute(
        f"SELECT id, embedding FROM {table} WHERE id = ANY(%s)", (list(ids),), binary=True
    ).fetchall()
    return {i: np.asarray(v, dtype=np.float32) for i, v in rows}
