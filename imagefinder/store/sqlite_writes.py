"""The SQLite store's writes: each batch one transaction, with the inverted file kept
in step (``ivf.py``), and compare-and-set on what the caller saw (``expected``).

A mixin of ``SQLiteStore`` (``sqlite.py``), which owns the connection and the schema.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import ivf
from .base import Expected, FileState, Item, state_matches


def as_blob(vector: np.ndarray) -> bytes:
    """A vector as sqlite-vec's float32 blob."""
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


class Writes:
    """``upsert``, ``touch``, ``delete`` and bulk loads, for ``SQLiteStore``."""

    if TYPE_CHECKING:  # provided by SQLiteStore
        fast_min_rows: int
        _bulk: bool

        def transaction(self) -> Any: ...
        def meta(self) -> dict[str, str]: ...
        def count(self) -> int: ...

    def upsert(self, items: Iterable[Item], expected: Expected | None = None) -> int:
        """Add or replace ``items`` in one transaction. Returns how many were written
        (with ``expected``, rows another writer changed are left as they are)."""
        n = 0
        now = time.time()
        with self.transaction() as conn:
            mirrored: list[tuple[int, np.ndarray, bool]] | None = [] if ivf.exists(conn) else None
            for it in items:
                blob = as_blob(it.vector)
                row = conn.execute(
                    "SELECT rowid, path, sha256, size, mtime_ns FROM images WHERE id = ?",
                    (it.id,),
                ).fetchone()
                if expected is not None and not state_matches(_state(row), expected, it.id):
                    continue
                if row:
                    rowid = row[0]
                    conn.execute(
                        "UPDATE images SET path=?, sha256=?, size=?, mtime_ns=?, embedding=?, "
                        "updated_at=? WHERE rowid=?",
                        (it.path, it.sha256, it.size, it.mtime_ns, blob, now, rowid),
                    )
                    conn.execute("DELETE FROM vec_images WHERE rowid = ?", (rowid,))
                else:
                    rowid = conn.execute(
                        "INSERT INTO images (id, path, sha256, size, mtime_ns, embedding, "
                        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (it.id, it.path, it.sha256, it.size, it.mtime_ns, blob, now),
                    ).lastrowid
                conn.execute(
                    "INSERT INTO vec_images (rowid, embedding) VALUES (?, ?)", (rowid, blob)
                )
                if mirrored is not None:
                    mirrored.append((rowid, it.vector, row is not None))
                n += 1
            if mirrored:
                ivf.add(conn, mirrored)
            if n and not self._bulk:
                ivf.sync(conn, self.fast_min_rows)
        return n

    def begin_bulk(self, expected: int) -> None:
        """A load that at least doubles the index drops the inverted file and builds it
        once in ``end_bulk``, rather than at every doubling on the way (searches meanwhile
        are exact). A crash in between leaves no inverted file: the next write builds it."""
        self._bulk = False
        if not self.meta() or expected < max(self.count(), 1):
            return
        self._bulk = True
        with self.transaction() as conn:
            ivf.drop(conn)

    def end_bulk(self) -> None:
        # Also gives an index built before the inverted file existed (or by a writer
        # with another threshold) its inverted file.
        self._bulk = False
        if self.meta():
            with self.transaction() as conn:
                ivf.sync(conn, self.fast_min_rows)

    def touch(
        self,
        image_id: str,
        path: str,
        size: int,
        mtime_ns: int,
        expected: FileState | None = None,
    ) -> bool:
        """Record a new path/mtime for a file whose content did not change."""
        with self.transaction() as conn:
            if expected is not None:
                row = conn.execute(
                    "SELECT 0, path, sha256, size, mtime_ns FROM images WHERE id = ?", (image_id,)
                ).fetchone()
                if _state(row) != expected:
                    return False
            conn.execute(
                "UPDATE images SET path=?, size=?, mtime_ns=? WHERE id=?",
                (path, size, mtime_ns, image_id),
            )
        return True

    def delete(self, ids: Iterable[str], expected: Expected | None = None) -> int:
        n = 0
        with self.transaction() as conn:
            mirrored = ivf.exists(conn)
            for image_id in ids:
                row = conn.execute(
                    "SELECT rowid, path, sha256, size, mtime_ns FROM images WHERE id = ?",
                    (image_id,),
                ).fetchone()
                if expected is not None and not state_matches(_state(row), expected, image_id):
                    continue
                if row:
                    conn.execute("DELETE FROM vec_images WHERE rowid = ?", (row[0],))
                    conn.execute("DELETE FROM images WHERE rowid = ?", (row[0],))
                    if mirrored:
                        ivf.remove(conn, row[0])
                    n += 1
            if n and not self._bulk:
                ivf.sync(conn, self.fast_min_rows)
        return n


def _state(row: Any) -> FileState | None:
    """A (rowid, path, sha256, size, mtime_ns) row as a FileState."""
    return FileState(*row[1:]) if row else None
