"""The PostgreSQL store's writes: one transaction per batch, the row count kept in
``imagefinder_stats``, and compare-and-set on what the caller saw (``expected``).

A mixin of ``PGStore`` (``postgres.py``), which owns the pool and the schema.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Expected, FileState, Item
from .pgnames import IMAGES, STATS

# The API's per-id write lock (see write_lock).
WRITE_LOCK = "SELECT pg_advisory_lock(hashtext('imagefinder.write'), hashtext(%s))"
WRITE_UNLOCK = "SELECT pg_advisory_unlock(hashtext('imagefinder.write'), hashtext(%s))"


class Writes:
    """``upsert``, ``touch`` and ``delete``, for ``PGStore``."""

    if TYPE_CHECKING:  # provided by PGStore
        from contextlib import AbstractContextManager

        import psycopg

        def _tx(self) -> AbstractContextManager[psycopg.Connection]: ...
        def meta(self) -> dict[str, str]: ...

    def upsert(self, items: Iterable[Item], expected: Expected | None = None) -> int:
        """Add or replace ``items`` in one transaction. Returns how many were written
        (with ``expected``, rows another writer changed are left as they are)."""
        rows = [
            (it.id, it.path, it.sha256, it.size, it.mtime_ns, np.asarray(it.vector, np.float32))
            for it in items
        ]
        if not rows:
            return 0
        if expected is not None:
            return self._upsert_if_unchanged(rows, expected)
        with self._tx() as conn, conn.cursor() as cur:
            # xmax is 0 on a freshly inserted row version, set on one that replaced a row:
            # what really happened, even with another writer inserting the same id.
            cur.executemany(
                f"""INSERT INTO {IMAGES} (id, path, sha256, size, mtime_ns, embedding)
                    VALUES (%s, %s, %s, %s, %s, %b)
                    ON CONFLICT (id) DO UPDATE SET
                        path = EXCLUDED.path, sha256 = EXCLUDED.sha256, size = EXCLUDED.size,
                        mtime_ns = EXCLUDED.mtime_ns, embedding = EXCLUDED.embedding,
                        updated_at = now()
                    RETURNING xmax = 0""",
                rows,
                returning=True,
            )
            inserted = 0
            while True:
                inserted += sum(1 for (new,) in cur.fetchall() if new)
                if not cur.nextset():
                    break
            # Last, so the one shared row stays locked only until the commit.
            if inserted:
                cur.execute(f"UPDATE {STATS} SET rows = rows + %s", (inserted,))
        return len(rows)

    def _upsert_if_unchanged(self, rows: list[tuple[Any, ...]], expected: Expected) -> int:
        """Compare-and-set: a new id only if still absent (ON CONFLICT DO NOTHING), a known
        one only if its row still holds the expected state. Under READ COMMITTED, an
        UPDATE re-checks its WHERE against a row another transaction just changed."""
        inserted = updated = 0
        with self._tx() as conn, conn.cursor() as cur:
            for row in rows:
                state = expected.get(row[0])
                if state is None:
                    cur.execute(
                        f"""INSERT INTO {IMAGES} (id, path, sha256, size, mtime_ns, embedding)
                            VALUES (%s, %s, %s, %s, %s, %b) ON CONFLICT (id) DO NOTHING""",
                        row,
                    )
                    inserted += cur.rowcount
                else:
                    cur.execute(
                        f"""UPDATE {IMAGES} SET path = %s, sha256 = %s, size = %s,
                                mtime_ns = %s, embedding = %b, updated_at = now()
                            WHERE id = %s AND path = %s AND sha256 = %s AND size = %s
                                AND mtime_ns = %s""",
                        (*row[1:], row[0], state.path, state.sha256, state.size, state.mtime_ns),
                    )
                    updated += cur.rowcount
            if inserted:
                cur.execute(f"UPDATE {STATS} SET rows = rows + %s", (inserted,))
        return inserted + updated

    def touch(
        self,
        image_id: str,
        path: str,
        size: int,
        mtime_ns: int,
        expected: FileState | None = None,
    ) -> bool:
        """Record a new path/mtime for a file whose content did not change."""
        sql = f"UPDATE {IMAGES} SET path = %s, size = %s, mtime_ns = %s WHERE id = %s"
        params: tuple[Any, ...] = (path, size, mtime_ns, image_id)
        if expected is not None:
            sql += " AND path = %s AND sha256 = %s AND size = %s AND mtime_ns = %s"
            params += (expected.path, expected.sha256, expected.size, expected.mtime_ns)
        with self._tx() as conn:
            return conn.execute(sql, params).rowcount > 0

    def delete(self, ids: Iterable[str], expected: Expected | None = None) -> int:
        ids = list(ids)
        if not ids or not self.meta():
            return 0
        with self._tx() as conn:
            if expected is None:
                deleted = conn.execute(f"DELETE FROM {IMAGES} WHERE id = ANY(%s)", (ids,)).rowcount
            else:
                deleted = 0
                for image_id in ids:
                    state = expected.get(image_id)
                    if state is None:
                        continue  # expected absent: nothing to delete
                    deleted += conn.execute(
                        f"""DELETE FROM {IMAGES} WHERE id = %s AND path = %s AND sha256 = %s
                            AND size = %s AND mtime_ns = %s""",
                        (image_id, state.path, state.sha256, state.size, state.mtime_ns),
                    ).rowcount
            if deleted:
                conn.execute(f"UPDATE {STATS} SET rows = rows - %s", (deleted,))
        return deleted

    @contextmanager
    def write_lock(self, key: str) -> Iterator[None]:
        """A session advisory lock per key, held on a connection of its own: it excludes
        every process (and machine) sharing the database, and dies with its holder."""
        with self._tx() as conn:
            conn.execute(WRITE_LOCK, (key,))
            try:
                yield
            finally:
                conn.execute(WRITE_UNLOCK, (key,))
