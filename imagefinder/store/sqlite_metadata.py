"""Image metadata in a SQLite index, and KNN restricted to a filter, in SQL.

``image_metadata(image, key, value)`` holds one row per column of an image, keyed by
``images.rowid`` (an upsert keeps the rowid, so re-embedding an image keeps its
metadata); an index on ``(key, value)`` finds the images matching a pair without a
scan. A trigger removes an image's metadata with its row, in the deleting transaction,
whichever process deletes. Schema version 2 (``migrate``) adds the table, the trigger and
an index on ``images.sha256`` (exact duplicates, query images recognised by content).

A filtered KNN (``SQLiteStore._nearest_where``) either scans the matching images'
vectors exactly (``scan``: few matches, or an exact index) or takes a growing pool of
approximate candidates and keeps the matching ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ..metadata import Metadata, Where

TABLE = "image_metadata"
# SQLite's bound-parameter limit is 999 in older builds.
CHUNK = 500


def migrate(conn: Any) -> None:
    """Schema version 1 -> 2: metadata, and lookups by content hash."""
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {TABLE} (
            image INTEGER NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (image, key)
        ) WITHOUT ROWID"""
    )
    conn.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_value ON {TABLE} (key, value)")
    conn.execute(
        f"""CREATE TRIGGER IF NOT EXISTS {TABLE}_delete AFTER DELETE ON images BEGIN
            DELETE FROM {TABLE} WHERE image = old.rowid; END"""
    )
    conn.execute("CREATE INDEX IF NOT EXISTS images_sha256 ON images (sha256)")


def chunks(ids: Sequence[str]) -> Iterator[list[str]]:
    for start in range(0, len(ids), CHUNK):
        yield list(ids[start : start + CHUNK])


def marks(n: int) -> str:
    return ", ".join("?" * n)


def metadata_of(conn: Any, ids: Sequence[str]) -> dict[str, Metadata]:
    out: dict[str, Metadata] = {}
    for chunk in chunks(list(dict.fromkeys(ids))):
        rows = conn.execute(
            f"SELECT images.id, m.key, m.value FROM images JOIN {TABLE} m "
            f"ON m.image = images.rowid WHERE images.id IN ({marks(len(chunk))}) "
            "ORDER BY images.id, m.key",
            chunk,
        )
        for image_id, key, value in rows:
            out.setdefault(image_id, {})[key] = value
    return out


def set_metadata(conn: Any, rows: Iterable[tuple[str, Metadata]]) -> int:
    """Inside a write transaction: replace each existing id's metadata."""
    n = 0
    for image_id, metadata in rows:
        row = conn.execute("SELECT rowid FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            continue
        conn.execute(f"DELETE FROM {TABLE} WHERE image = ?", (row[0],))
        conn.executemany(
            f"INSERT INTO {TABLE} (image, key, value) VALUES (?, ?, ?)",
            [(row[0], key, value) for key, value in metadata.items()],
        )
        n += 1
    return n


def matching(where: Where) -> tuple[str, list[str]]:
    """SQL selecting the rowids (``image``) of the images matching every pair."""
    parts = [f"SELECT image FROM {TABLE} WHERE key = ? AND value = ?"] * len(where)
    return " INTERSECT ".join(parts), [x for pair in where for x in pair]


def count(conn: Any, where: Where) -> int:
    sql, params = matching(where)
    return int(conn.execute(f"SELECT count(*) FROM ({sql})", params).fetchone()[0])


def scan(conn: Any, blob: bytes, fetch: int, where: Where) -> list[tuple[str, float]]:
    """Exact: the ``fetch`` nearest of the matching images, each distance computed."""
    sql, params = matching(where)
    rows = conn.execute(
        f"""WITH m AS ({sql})
            SELECT images.id, vec_distance_l2(images.embedding, ?) AS distance
            FROM m JOIN images ON images.rowid = m.image
            ORDER BY distance, images.id LIMIT ?""",
        [*params, blob, fetch],
    ).fetchall()
    return [(i, float(d)) for i, d in rows]


# -- content hashes -------------------------------------------------------------------


def hashes_of(conn: Any, ids: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for chunk in chunks(list(dict.fromkeys(ids))):
        out.update(
            conn.execute(
                f"SELECT id, sha256 FROM images WHERE id IN ({marks(len(chunk))})", chunk
            ).fetchall()
        )
    return out


def ids_with_hashes(conn: Any, hashes: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for chunk in chunks(list(dict.fromkeys(hashes))):
        rows = conn.execute(
            f"SELECT sha256, id FROM images WHERE sha256 IN ({marks(len(chunk))}) ORDER BY id",
            chunk,
        )
        for digest, image_id in rows:
            out.setdefault(digest, []).append(image_id)
    return out


def hash_groups(conn: Any) -> list[list[str]]:
    rows = conn.execute(
        """SELECT sha256, id FROM images WHERE sha256 IN (
               SELECT sha256 FROM images GROUP BY sha256 HAVING count(*) > 1
           ) ORDER BY sha256, id"""
    )
    groups: dict[str, list[str]] = {}
    for digest, image_id in rows:
        groups.setdefault(digest, []).append(image_id)
    return sorted(groups.values())
