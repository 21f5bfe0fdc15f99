"""Image metadata in a PostgreSQL index, in SQL.

Each image's metadata is a ``jsonb`` object in its own row (``imagefinder_images.metadata``,
schema version 2), so it leaves with the row and an upsert that does not name it keeps
it. A GIN index (``jsonb_path_ops``) answers containment, ``metadata @> '{"a": "x",
"b": "y"}'``, which is a filter's AND of pairs in one operator. Version 2 also indexes
``sha256`` (exact duplicates, query images recognised by content).

A filtered KNN runs through HNSW with pgvector's iterative scans (``hnsw.iterative_scan``,
pgvector 0.8): the scan goes on past ``ef_search`` until enough rows pass the filter.
The planner may prefer the GIN index and an exact sort when few rows match.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..metadata import Metadata, Where
from .pgnames import IMAGES

GIN = "imagefinder_images_metadata"
SHA256 = "imagefinder_images_sha256"


def migrate(conn: Any) -> None:
    """Schema version 1 -> 2: metadata, and lookups by content hash."""
    conn.execute(
        f"ALTER TABLE {IMAGES} ADD COLUMN IF NOT EXISTS metadata jsonb NOT NULL DEFAULT '{{}}'"
    )
    conn.execute(
        f"CREATE INDEX IF NOT EXISTS {GIN} ON {IMAGES} USING gin (metadata jsonb_path_ops)"
    )
    conn.execute(f"CREATE INDEX IF NOT EXISTS {SHA256} ON {IMAGES} (sha256)")


def containment(where: Where) -> str:
    """The jsonb a row's metadata must contain to match ``where``."""
    return json.dumps(dict(where), ensure_ascii=False)


def metadata_of(conn: Any, ids: Sequence[str]) -> dict[str, Metadata]:
    """Each id's metadata, columns in name order (as SQLite gives them)."""
    rows = conn.execute(
        f"SELECT id, metadata FROM {IMAGES} WHERE id = ANY(%s) AND metadata <> '{{}}'",
        (list(ids),),
    )
    return {i: dict(sorted(m.items())) for i, m in rows}


def set_metadata(conn: Any, rows: Iterable[tuple[str, Metadata]]) -> int:
    params = [(json.dumps(metadata, ensure_ascii=False), image_id) for image_id, metadata in rows]
    if not params:
        return 0
    with conn.cursor() as cur:
        cur.executemany(f"UPDATE {IMAGES} SET metadata = %s::jsonb WHERE id = %s", params)
        return int(cur.rowcount)  # psycopg 3 sums it over the batch


def count(conn: Any, where: Where) -> int:
    return int(
        conn.execute(
            f"SELECT count(*) FROM {IMAGES} WHERE metadata @> %s::jsonb", (containment(where),)
        ).fetchone()[0]
    )


def hashes_of(conn: Any, ids: Sequence[str]) -> dict[str, str]:
    rows = conn.execute(f"SELECT id, sha256 FROM {IMAGES} WHERE id = ANY(%s)", (list(ids),))
    return dict(rows.fetchall())


def ids_with_hashes(conn: Any, hashes: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    rows = conn.execute(
        f"SELECT sha256, id FROM {IMAGES} WHERE sha256 = ANY(%s) ORDER BY id", (list(hashes),)
    )
    for digest, image_id in rows:
        out.setdefault(digest, []).append(image_id)
    return out


def hash_groups(conn: Any) -> list[list[str]]:
    rows = conn.execute(
        f"""SELECT array_agg(id ORDER BY id) FROM {IMAGES}
            GROUP BY sha256 HAVING count(*) > 1"""
    )
    return sorted(list(r[0]) for r in rows)


class MetadataMixin:
    """``PGStore``'s metadata and content-hash reads and writes, through the functions
    above."""

    if TYPE_CHECKING:  # provided by PGStore
        from contextlib import AbstractContextManager

        import psycopg

        def _tx(self) -> AbstractContextManager[psycopg.Connection]: ...
        def meta(self) -> dict[str, str]: ...

    def _read(self, fn: Callable[..., Any], arg: Any = None) -> Any:
        with self._tx() as conn:
            return fn(conn) if arg is None else fn(conn, arg)

    def metadata_of(self, ids: Sequence[str]) -> dict[str, Metadata]:
        return self._read(metadata_of, ids) if ids and self.meta() else {}

    def set_metadata(self, rows: Iterable[tuple[str, Metadata]]) -> int:
        return int(self._read(set_metadata, rows)) if self.meta() else 0

    def hashes_of(self, ids: Sequence[str]) -> dict[str, str]:
        return self._read(hashes_of, ids) if ids and self.meta() else {}

    def ids_with_hashes(self, hashes: Sequence[str]) -> dict[str, list[str]]:
        return self._read(ids_with_hashes, hashes) if hashes and self.meta() else {}

    def hash_groups(self) -> list[list[str]]:
        return self._read(hash_groups) if self.meta() else []
