"""The PostgreSQL index: pgvector behind the same interface as ``SQLiteStore``.

Layout (schema version 1, in the connection's current schema):

- ``imagefinder_meta(key, value)``: the same keys as the SQLite index.
- ``imagefinder_images``: one row per id with path, content hash, size, mtime and a
  ``vector(D)`` column, exact float32.
- ``imagefinder_stats(rows)``: the row count, kept up to date by every write.
- ``imagefinder_images.metadata`` (jsonb) with a GIN index, and an index on ``sha256``
  (schema version 2, see ``pg_metadata.py``).
- ``imagefinder_images_hnsw``: an HNSW index under L2. pgvector indexes ``vector``
  columns of at most 2000 dimensions, so wider vectors (resnet50's 2048) are indexed
  as ``halfvec`` (16-bit) and the candidates re-ranked by their exact float32 distance.

Connections come from a pool, so one process serves concurrent requests and several
processes (API workers, extraction shards) share one database. psycopg is imported
here only: SQLite users never need it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import StoreError
from ..metadata import Where
from . import pg_metadata as md
from . import pgdba, pgsearch
from .base import (
    DBA_KEY,
    FileState,
    Item,
    Store,
    display_location,
    keyset_pages,
    new_meta,
)
from .jobtable import JobTable, create_sql
from .pg_writes import Writes
from .pgnames import HNSW, IMAGES, META, STATS
from .pgvector import register_vector

# Candidates HNSW hands to the exact re-rank, unless IMAGEFINDER_EF_SEARCH says otherwise:
# at 200 it stays near 19 ms with recall 1.0 at 100k, where 40 reached 0.975
# (bench/bench_stores.py).
DEFAULT_EF_SEARCH = 200
# One advisory lock serialises schema changes (CREATE EXTENSION/TABLE/INDEX, DROP INDEX)
# across every process sharing the database: two shards starting at once race otherwise.
SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('imagefinder.schema'))"
TABLE_EXISTS = (
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
    "ON n.oid = c.relnamespace WHERE c.relname = %s AND n.nspname = ANY (current_schemas(false)))"
)


JOBS = "imagefinder_jobs"


def _add_jobs(conn: psycopg.Connection) -> None:
    """Version 3: ingestion jobs (jobtable.py)."""
    for statement in create_sql(JOBS, "double precision"):
        conn.execute(statement)


def _scalar(conn: psycopg.Connection, sql: Any, params: Any = None) -> Any:
    """The one value a one-row query returns."""
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class PGStore(Writes, md.MetadataMixin, Store):
    """An index in a PostgreSQL database. Safe to share across threads."""

    kind = "postgres"
    rebuild_hint = "rebuild it into a new database"
    # Version 2: image metadata and the content-hash index. Version 3: ingestion jobs.
    migrations = (md.migrate, _add_jobs)
    # A run into an empty table, or one that at least doubles the table and writes this
    # many rows, drops the HNSW index first and builds it once at the end: far faster
    # than inserting row by row (a few ms per 2048-d row).
    bulk_min = 10_000
    # Memory for building the HNSW index; a graph that does not fit is built on disk, slowly.
    build_memory = "1GB"

    def __init__(
        self,
        url: str,
        *,
        ef_search: int = DEFAULT_EF_SEARCH,
        exact: bool = False,
        pool_size: int = 8,
    ):
        self.url = url
        self.ef_search = ef_search
        self.exact = exact
        self.pool_size = pool_size
        self._pool: ConnectionPool | None = None
        self._pool_lock = threading.Lock()
        self._meta: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"PGStore({self.location!r})"

    @property
    def location(self) -> str:
        return display_location(self.url)

    # -- connections -------------------------------------------------------

    def _get_pool(self) -> ConnectionPool:
        if self._pool is not None:
            return self._pool
        with self._pool_lock:
            if self._pool is None:
                # One direct connection first: the pool only says "timed out", this
                # says "database does not exist" or "connection refused".
                try:
                    psycopg.connect(self.url, connect_timeout=10).close()
                except psycopg.Error as e:
                    raise StoreError(f"cannot connect to {self.location}: {_one_line(e)}") from e
                pool = ConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=self.pool_size,
                    timeout=30,
                    kwargs={"connect_timeout": 10},
                    # A server restart leaves dead connections in the pool: test each on
                    # checkout (one round trip) rather than fail a request with it.
                    check=ConnectionPool.check_connection,
                    name="imagefinder",
                    open=True,
                )
                # Close with the process even when nobody calls close().
                weakref.finalize(self, pool.close)
                self._pool = pool
        return self._pool

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in one transaction: committed on success, rolled back on error."""
        pool = self._get_pool()
        try:
            with pool.connection() as conn:
                register_vector(conn)
                yield conn
        except PoolTimeout as e:
            raise StoreError(f"no connection to {self.location}: {_one_line(e)}") from e
        except psycopg.Error as e:
            raise StoreError(f"{self.location}: {_one_line(e)}") from e

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    # -- schema and meta -------------------------------------------------

    def _read_meta(self, conn: psycopg.Connection) -> dict[str, str]:
        # pg_class read as a table, not through to_regclass: to_regclass takes no lock, so
        # it may answer from a stale cache entry saying "no such table" after another
        # process created the index while this one waited for SCHEMA_LOCK (two shards
        # starting at once then both created it: duplicate key in imagefinder_meta).
        if not _scalar(conn, TABLE_EXISTS, (META,)):
            return {}
        return dict(conn.execute(f"SELECT key, value FROM {META}").fetchall())

    def meta(self) -> dict[str, str]:
        # An index's meta never changes once written: read it once, then serve it from
        # memory (the API reads it on every search).
        if not self._meta:
            with self._tx() as conn:
                meta = self._read_meta(conn)
                if meta and self.pending_migrations(meta):
                    conn.execute(SCHEMA_LOCK)  # a reader of an older index upgrades it once
                    meta = self._migrate(conn, self._read_meta(conn))
                self._meta = meta
        return dict(self._meta)

    def ensure_schema(self, identity: dict[str, str]) -> None:
        """Create the index for ``identity`` (model meta), or check it matches."""
        with self._tx() as conn:
            conn.execute(SCHEMA_LOCK)
            existing = self._read_meta(conn)
            if existing:
                self.check_existing(existing, identity)
                self._meta = self._migrate(conn, existing)
                return
            self._create_extension(conn)
            dim = int(identity["dim"])
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {META} (key text PRIMARY KEY, value text NOT NULL)"
            )
            conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {IMAGES} (
                    id text COLLATE "C" PRIMARY KEY,
                    path text NOT NULL,
                    sha256 text NOT NULL,
                    size bigint NOT NULL,
                    mtime_ns bigint NOT NULL,
                    embedding vector({dim}) NOT NULL,
                    updated_at timestamptz NOT NULL DEFAULT now()
                )"""
            )
            conn.execute(self._create_index_sql(dim))
            conn.execute(f"CREATE TABLE IF NOT EXISTS {STATS} (rows bigint NOT NULL)")
            conn.execute(f"INSERT INTO {STATS} SELECT count(*) FROM {IMAGES}")
            meta = new_meta(identity, 1)
            with conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {META} VALUES (%s, %s)", list(meta.items()))
            meta = self._migrate(conn, meta)
        self._meta = meta

    def _create_extension(self, conn: psycopg.Connection) -> None:
        found = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
        if found:
            return
        try:
            with conn.transaction():
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.errors.InsufficientPrivilege as e:
            db = conn.info.dbname
            raise StoreError(
                f"{self.location} has no pgvector extension and this user may not create "
                f"it; ask an administrator to run: CREATE EXTENSION vector; "
                f"(in database {db}). {_one_line(e)}"
            ) from e
        except psycopg.errors.UndefinedFile as e:
            raise StoreError(
                f"{self.location}: pgvector is not installed on the server "
                f"(https://github.com/pgvector/pgvector#installation): {_one_line(e)}"
            ) from e
        register_vector(conn)

    def _migrate(self, conn: psycopg.Connection, meta: dict[str, str]) -> dict[str, str]:
        """Apply the migrations ``meta``'s version lacks (under the schema lock)."""
        pending = self.pending_migrations(meta)
        for migration in pending:
            migration(conn)
        if pending:
            version = str(self.schema_version())
            conn.execute(f"UPDATE {META} SET value = %s WHERE key = 'schema_version'", (version,))
            meta = {**meta, "schema_version": version}
        return meta

    def _dim(self) -> int:
        meta = self.meta()
        if not meta:
            raise StoreError(f"{self.location} is not an index yet")
        return int(meta["dim"])

    def _create_index_sql(self, dim: int) -> str:
        ops = "vector_l2_ops" if dim <= pgsearch.MAX_VECTOR_INDEX_DIM else "halfvec_l2_ops"
        expr = pgsearch.indexed(dim, "embedding")
        return f"CREATE INDEX IF NOT EXISTS {HNSW} ON {IMAGES} USING hnsw (({expr}) {ops})"

    # -- reads -------------------------------------------------------------

    def count(self) -> int:
        if not self.meta():
            return 0
        with self._tx() as conn:
            return int(_scalar(conn, f"SELECT rows FROM {STATS}"))

    def file_states(self) -> dict[str, FileState]:
        if not self.meta():
            return {}
        with self._tx() as conn:
            rows = conn.execute(f"SELECT id, path, sha256, size, mtime_ns FROM {IMAGES}")
            return {r[0]: FileState(*r[1:]) for r in rows}

    def file_state(self, image_id: str) -> FileState | None:
        if not self.meta():
            return None
        with self._tx() as conn:
            row = conn.execute(
                f"SELECT path, sha256, size, mtime_ns FROM {IMAGES} WHERE id = %s", (image_id,)
            ).fetchone()
        return FileState(*row) if row else None

    def vector_of(self, image_id: str) -> np.ndarray | None:
        if not self.meta():
            return None
        with self._tx() as conn:
            row = conn.execute(
                f"SELECT embedding FROM {IMAGES} WHERE id = %s", (image_id,), binary=True
            ).fetchone()
        return row[0] if row else None

    def _item_pages(self, batch: int) -> Iterator[list[Item]]:
        """Rows in id order, one short transaction per page (keyset pagination)."""

        def fetch(after: str, limit: int) -> list[Any]:
            with self._tx() as conn:
                return conn.execute(
                    f"SELECT id, path, sha256, size, mtime_ns, embedding FROM {IMAGES} "
                    "WHERE id > %s ORDER BY id LIMIT %s",
                    (after, limit),
                    binary=True,
                ).fetchall()

        for rows in keyset_pages(fetch, "", batch):
            yield [Item(*r) for r in rows]

    def _nearest(self, vector: np.ndarray, fetch: int) -> list[tuple[str, float]]:
        return self._run_search(vector, fetch, ())

    def _nearest_where(
        self, vector: np.ndarray, fetch: int, where: Where
    ) -> list[tuple[str, float]]:
        """Through HNSW with an iterative scan; if that scan stops short (it visits at
        most MAX_SCAN_TUPLES rows) while more images match, exactly over the matches."""
        if not self.meta():
            return []
        found = self._run_search(vector, fetch, where)
        if len(found) < fetch and not self.exact:
            with self._tx() as conn:
                matching = md.count(conn, where)
            if matching > len(found):
                return self._run_search(vector, fetch, where, exact=True)
        return found

    def _run_search(
        self, vector: np.ndarray, fetch: int, where: Where, exact: bool = False
    ) -> list[tuple[str, float]]:
        query = np.ascontiguousarray(vector, dtype=np.float32)
        setup, sql, params = self.search_statements(query, fetch, where, exact)
        with self._tx() as conn:
            for statement in setup:
                conn.execute(statement)
            rows = conn.execute(sql, params).fetchall()
        return [(i, float(d)) for i, d in rows]

    def search_statements(
        self, query: np.ndarray, fetch: int, where: Where = (), exact: bool = False
    ) -> tuple[list[str], str, dict[str, Any]]:
        """What ``knn`` runs in its transaction (see ``pgsearch.statements``)."""
        if self.exact or exact:
            return pgsearch.statements(query, fetch, where)
        return pgsearch.statements(query, fetch, where, self._dim(), self.ef_search)

    def jobs(self) -> JobTable:
        return JobTable(JOBS, self._tx, self._tx, lambda: bool(self.meta()), "%s")

    # -- meta and DBA (see pgdba.py) ----------------------------------------

    def set_meta(self, key: str, value: str | None) -> None:
        with self._tx() as conn:
            self._set_meta(conn, key, value)

    def _set_meta(self, conn: psycopg.Connection, key: str, value: str | None) -> None:
        if value is None:
            conn.execute(f"DELETE FROM {META} WHERE key = %s", (key,))
        else:
            conn.execute(
                f"INSERT INTO {META} VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (key, value),
            )
        # Other processes keep the meta they read (it names the vectors, which never
        # change): a server sees another process switch DBA on when it restarts.
        self._meta = self._read_meta(conn)

    def set_dba(self, spec: str | None) -> None:
        dim = self._dim()
        with self._tx() as conn:
            conn.execute(SCHEMA_LOCK)
            pgdba.drop(conn)
            if spec is not None:
                pgdba.create(conn, dim)
            self._set_meta(conn, DBA_KEY, spec)

    def write_augmented(self, rows: Iterable[tuple[str, np.ndarray]]) -> int:
        with self._tx() as conn:
            return pgdba.write(conn, rows) if pgdba.exists(conn) else 0

    def augmented_of(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        with self._tx() as conn:
            return pgdba.vectors(conn, pgdba.TABLE, ids) if pgdba.exists(conn) else {}

    def begin_bulk(self, expected: int) -> None:
        """Drop the HNSW index before a load into an empty table or one that at least
        doubles it. Searches meanwhile scan the table: exact, slower."""
        count = self.count()
        if count and (expected < self.bulk_min or expected < count):
            return
        with self._tx() as conn:
            conn.execute(SCHEMA_LOCK)
            conn.execute(f"DROP INDEX IF EXISTS {HNSW}")

    def end_bulk(self) -> None:
        """Build the HNSW index if a bulk load (or a crashed one) left it missing."""
        if not self.meta():
            return
        with self._tx() as conn:
            conn.execute(SCHEMA_LOCK)
            if _scalar(conn, TABLE_EXISTS, (HNSW,)):
                return
            conn.execute(f"SET LOCAL maintenance_work_mem = '{self.build_memory}'")
            conn.execute(self._create_index_sql(self._dim()))
            # Row count for the planner, so it picks the index; sampling ids is enough.
            conn.execute(f"ANALYZE {IMAGES} (id)")
