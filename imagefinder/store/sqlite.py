"""The SQLite index: one ``connect()``, a versioned schema, and KNN in SQL.

Layout (schema version 3):

- ``meta(key, value)``: schema version, model, weights, dim, metric, preprocessing.
- ``images``: one row per id with its file path, content hash, size, mtime and a
  float32 copy of the vector (cheap exact re-ranking without vec0 point lookups).
- ``vec_images``: a sqlite-vec ``vec0`` table of the vectors, searched with
  ``embedding MATCH ? AND k = ?`` under L2 distance.
- ``images_dba``: while DBA is on, the augmented vectors (see ``dba.py``).
- ``image_metadata``: each image's metadata columns (schema version 2, see
  ``sqlite_metadata.py``), and an index on ``images.sha256``.
- ``vec_ivf`` + ``ivf_centroids`` + ``ivf_lists`` + ``ivf_state``: from ``ivf.MIN_ROWS``
  vectors on, an inverted-file index: k-means lists, an int8 code per vector, the
  nearest lists' nearest codes re-ranked exactly (see ``ivf.py``).

Schema version 3 replaced the earlier ``vec_coarse`` (one Hamming pass over every
vector, recall@10 0.44 at 1M) with the inverted file.

Every write goes through one transaction per batch, so a killed run leaves the
index consistent and the next run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexNotReady, StoreError
from ..metadata import Metadata, Where, matches
from . import dba, ivf
from . import sqlite_metadata as md
from .base import (
    DBA_KEY,
    FileState,
    Item,
    Store,
    keyset_pages,
    new_meta,
)
from .jobtable import JobTable, create_sql
from .sqlite_connect import connect
from .sqlite_writes import Writes
from .sqlite_writes import as_blob as _blob

# For up to 10 results: the nearest int8 codes re-ranked exactly
# (IMAGEFINDER_EF_SEARCH), from the nearest lists (IMAGEFINDER_NPROBE). Chosen from the
# 1M sweep (bench/results/stores-1000000.json): 8 lists and 20 candidates kept
# recall@10 at 0.992 (16 and 40: 0.9925) at p50 11 ms against 66. Each candidate is a
# random 8 KB read of the file, so the candidates cost more than the lists.
DEFAULT_CANDIDATES = 20
DEFAULT_NPROBE = 8
# The inverted file serves a search down to this depth; a deeper one (a page far down)
# scans exactly. Approximate candidates thin out with depth (the earlier Hamming
# pre-selection kept only 0.55 of the page at offset 190 on 20k clustered vectors), while
# an exact scan of 20k vectors costs no more than a deep approximate search
# (bench/paging.py; tests/test_filters_and_paging.py checks offsets 90 and 500).
APPROXIMATE_DEPTH = 100
# A filter matching at most this many images is answered by an exact scan of their
# vectors (~25 ms at 2048-d); a broader one by approximate candidates, kept if they
# match, in a pool that grows until it holds enough (bench/paging.py).
FILTER_SCAN_ROWS = 10_000
FILTER_POOL_GROWTH = 4
# Vectors per vec0 chunk blob. Each insert rewrites part of its chunk by walking the
# blob's overflow pages, so the default 1024 (8 MB at 2048-d) costs ~2 ms per row;
# 256 costs ~0.03 ms and scans as fast.
VEC_CHUNK = 256


def _inverted_file_replaces_coarse(conn: Any) -> None:
    """Version 3: the inverted file replaces the earlier Hamming table. The version bump
    also keeps older ImageFinders out: they would search a Hamming table nobody keeps
    up to date any more, and miss neighbours without a word."""
    conn.execute("DROP TABLE IF EXISTS vec_coarse")
    conn.execute("DROP TABLE IF EXISTS coarse_centre")
    ivf.sync(conn, ivf.MIN_ROWS)


JOBS = "jobs"


def _add_jobs(conn: Any) -> None:
    """Version 4: ingestion jobs (jobtable.py)."""
    for statement in create_sql(JOBS, "REAL"):
        conn.execute(statement)


class SQLiteStore(Writes, Store):
    """The index file. Safe to share across threads: each thread gets its own connection."""

    kind = "sqlite"
    rebuild_hint = "rebuild it with a new --db path"
    # Version 2: image metadata and the content-hash index. Version 3: the inverted file
    # replaces the Hamming pre-selection. Version 4: ingestion jobs.
    migrations = (md.migrate, _inverted_file_replaces_coarse, _add_jobs)

    def __init__(
        self,
        path: str | Path,
        *,
        ef_search: int = DEFAULT_CANDIDATES,
        exact: bool = False,
        fast_min_rows: int = ivf.MIN_ROWS,
        nprobe: int = DEFAULT_NPROBE,
        create: bool = True,
    ):
        self.path = Path(path)
        # False for commands that only read: a mistyped path must not leave an empty
        # index file (and its folder) behind.
        self.create = create
        # Search: ``ef_search`` candidates from the ``nprobe`` nearest lists are
        # re-ranked exactly; ``exact`` always scans every float vector. Writes: the
        # inverted file exists while the index holds at least ``fast_min_rows`` vectors.
        self.ef_search = ef_search
        self.nprobe = nprobe
        self.exact = exact
        self.fast_min_rows = fast_min_rows
        # Set between begin_bulk and end_bulk: the inverted file is built once, at the end.
        self._bulk = False
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self._check_path()
            if not self.create and not self.path.exists():
                raise IndexNotReady(f"there is no index at {self.path}")
            if not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path)
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                with contextlib.suppress(Exception):
                    conn.close()
            self._conns.clear()
        self._local = threading.local()

    # -- schema and meta -------------------------------------------------

    def _check_path(self) -> None:
        if self.path.is_dir():
            raise StoreError(
                f"{self.path} is a folder, not an index file; "
                f"name the file, for example {self.path / 'imagefinder.db'}"
            )

    def meta(self) -> dict[str, str]:
        self._check_path()
        if not self.path.is_file():
            return {}
        meta = self._read_meta()
        if meta and self.pending_migrations(meta):
            with self.transaction() as conn:  # a reader of an older index upgrades it once
                meta = self._migrate(conn, self._read_meta(conn))
        return meta

    def _read_meta(self, conn: Any = None) -> dict[str, str]:
        try:
            return dict((conn or self.conn).execute("SELECT key, value FROM meta"))
        except Exception as e:  # sqlite3 or sqlean's OperationalError/DatabaseError
            if "no such table" in str(e):
                return {}
            raise StoreError(f"{self.path} is not an ImageFinder index: {e}") from e

    def ensure_schema(self, identity: dict[str, str]) -> None:
        """Create the index for ``identity`` (model meta), or check it matches.

        Both happen in one write transaction: two writers starting on a new index
        cannot each create it for their own model."""
        with self.transaction() as conn:
            existing = self._read_meta(conn)
            if existing:
                self.check_existing(existing, identity)
                self._migrate(conn, existing)
                return
            self._create(conn, int(identity["dim"]))
            meta = new_meta(identity, 1)
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())
            self._migrate(conn, meta)

    @staticmethod
    def _create(conn: Any, dim: int) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute(
            """CREATE TABLE IF NOT EXISTS images (
                rowid INTEGER PRIMARY KEY,
                id TEXT NOT NULL UNIQUE,
                path TEXT NOT NULL,
                sha256 TEXT NOT NULL,
                size INTEGER NOT NULL,
                mtime_ns INTEGER NOT NULL,
                embedding BLOB NOT NULL,
                updated_at REAL NOT NULL
            )"""
        )
        conn.execute(
            f"CREATE VIRTUAL TABLE IF NOT EXISTS vec_images USING vec0("
            f"embedding float[{dim}] distance_metric=l2, chunk_size={VEC_CHUNK})"
        )

    def _migrate(self, conn: Any, meta: dict[str, str]) -> dict[str, str]:
        """Apply the migrations ``meta``'s version lacks (inside a write transaction)."""
        pending = self.pending_migrations(meta)
        for migration in pending:
            migration(conn)
        if pending:
            version = str(self.schema_version())
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
            meta = {**meta, "schema_version": version}
        return meta

    # -- transactions ------------------------------------------------------

    class _Tx:
        def __init__(self, conn: Any):
            self.conn = conn

        def __enter__(self) -> Any:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")

    def transaction(self) -> _Tx:
        return self._Tx(self.conn)

    # -- reads -------------------------------------------------------------

    def count(self) -> int:
        if not self.meta():
            return 0
        return int(self.conn.execute("SELECT count(*) FROM images").fetchone()[0])

    def file_states(self) -> dict[str, FileState]:
        rows = self.conn.execute("SELECT id, path, sha256, size, mtime_ns FROM images")
        return {r[0]: FileState(*r[1:]) for r in rows}

    def file_state(self, image_id: str) -> FileState | None:
        row = self.conn.execute(
            "SELECT path, sha256, size, mtime_ns FROM images WHERE id = ?", (image_id,)
        ).fetchone()
        return FileState(*row) if row else None

    def vector_of(self, image_id: str) -> np.ndarray | None:
        row = self.conn.execute("SELECT embedding FROM images WHERE id = ?", (image_id,)).fetchone()
        return np.frombuffer(row[0], dtype=np.float32).copy() if row else None

    def _item_pages(self, batch: int) -> Iterator[list[Item]]:
        def fetch(after: int, limit: int) -> list[Any]:
            return self.conn.execute(
                "SELECT rowid, id, path, sha256, size, mtime_ns, embedding FROM images "
                "WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after, limit),
            ).fetchall()

        for rows in keyset_pages(fetch, -1, batch):
            yield [
                Item(r[1], r[2], r[3], r[4], r[5], np.frombuffer(r[6], dtype=np.float32))
                for r in rows
            ]

    def _nearest(self, vector: np.ndarray, fetch: int) -> list[tuple[str, float]]:
        # A search deeper than the inverted file serves (a page far down) scans exactly.
        if not self.exact and self._preselects(fetch):
            found = ivf.search(self.conn, vector, fetch, self.nprobe, self.ef_search)
            if found is not None:
                return found
        rows = self.conn.execute(
            """WITH knn AS (
                   SELECT rowid, distance FROM vec_images
                   WHERE embedding MATCH ? AND k = ?
               )
               SELECT images.id, knn.distance FROM knn
               JOIN images ON images.rowid = knn.rowid
               ORDER BY knn.distance""",
            (_blob(vector), fetch),
        ).fetchall()
        return [(i, float(d)) for i, d in rows]

    def _preselects(self, fetch: int) -> bool:
        """Whether the inverted file serves a search for ``fetch`` results."""
        return fetch <= APPROXIMATE_DEPTH

    def _nearest_where(
        self, vector: np.ndarray, fetch: int, where: Where
    ) -> list[tuple[str, float]]:
        """Few matches, or an exact index: scan the matching vectors exactly. Many: grow a
        pool of approximate candidates until ``fetch`` of them match (a pool of 1/s times
        what is asked, s the share of images that match, then ``FILTER_POOL_GROWTH``
        times more each round); a pool deeper than the pre-selection serves falls back to
        the exact scan, so a search never comes back short while enough images match."""
        if not self.meta():
            return []
        blob = _blob(vector)
        matching = md.count(self.conn, where)
        if matching == 0:
            return []
        if self.search_mode() == ivf.MODE_EXACT or matching <= FILTER_SCAN_ROWS:
            return md.scan(self.conn, blob, fetch, where)
        share = matching / max(1, self.count())
        pool = math.ceil(2 * fetch / share)
        while self._preselects(pool):
            found = self._nearest(vector, pool)
            metadata = self.metadata_of([i for i, _ in found])
            kept = [(i, d) for i, d in found if matches(metadata.get(i, {}), where)]
            if len(kept) >= min(fetch, matching) or len(found) < pool:
                return kept[:fetch]
            pool *= FILTER_POOL_GROWTH
        return md.scan(self.conn, blob, fetch, where)

    def augmented_of(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return dba.vectors(self.conn, ids) if dba.exists(self.conn) else {}

    # -- metadata and content hashes (sqlite_metadata.py) -----------------------

    def metadata_of(self, ids: Sequence[str]) -> dict[str, Metadata]:
        return md.metadata_of(self.conn, ids) if ids and self.meta() else {}

    def set_metadata(self, rows: Iterable[tuple[str, Metadata]]) -> int:
        if not self.meta():
            return 0
        with self.transaction() as conn:
            return md.set_metadata(conn, rows)

    def hashes_of(self, ids: Sequence[str]) -> dict[str, str]:
        return md.hashes_of(self.conn, ids) if ids and self.meta() else {}

    def ids_with_hashes(self, hashes: Sequence[str]) -> dict[str, list[str]]:
        return md.ids_with_hashes(self.conn, hashes) if hashes and self.meta() else {}

    def hash_groups(self) -> list[list[str]]:
        return md.hash_groups(self.conn) if self.meta() else []

    def set_dba(self, spec: str | None) -> None:
        with self.transaction() as conn:
            meta = self._read_meta(conn)
            if not meta:
                raise StoreError(f"{self.path} is not an index yet")
            dba.drop(conn)
            if spec is None:
                conn.execute("DELETE FROM meta WHERE key = ?", (DBA_KEY,))
            else:
                dba.create(conn, int(meta["dim"]))
                conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (DBA_KEY, spec))

    def write_augmented(self, rows: Iterable[tuple[str, np.ndarray]]) -> int:
        with self.transaction() as conn:
            if not dba.exists(conn):
                return 0
            return dba.write(conn, ((i, _blob(v)) for i, v in rows))

    def set_meta(self, key: str, value: str | None) -> None:
        with self.transaction() as conn:
            if value is None:
                conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def warm(self) -> int:
        """The inverted file's centroids and codes (2 GB at 1M x 2048-d), through a
        connection of its own: a server warms in the background while it answers."""
        if not self.path.is_file():
            return 0
        conn = connect(self.path)
        try:
            return ivf.preload(conn)
        finally:
            conn.close()

    def search_mode(self) -> str:
        """How ``knn`` searches now: ``exact`` or ``ivf+rerank`` (large indexes)."""
        if self.exact or not self.meta() or not ivf.exists(self.conn):
            return ivf.MODE_EXACT
        return ivf.MODE_IVF

    def jobs(self) -> JobTable:
        return JobTable(
            JOBS,
            self.transaction,
            lambda: contextlib.nullcontext(self.conn),
            lambda: bool(self.meta()),
            "?",
        )

    def lock_file(self) -> Path:
        """The API's write lock, beside the index."""
        return Path(f"{self.path}.writes-lock")
