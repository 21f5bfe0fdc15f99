"""Ingestion jobs, kept in the index itself (``jobs`` in SQLite, ``imagefinder_jobs`` in
PostgreSQL): a restarted server finds its finished jobs, and the ones it was running.

One table, the same SQL on both stores (written with ``?``; PostgreSQL gets ``%s``).
Every state change is a compare-and-set on the row (``WHERE id = ? AND state = ?`` or
``AND owner = ?``): two servers on one database never both claim a job, and a runner
that lost its job (re-queued as stale by another server) stops writing to it.

A job's life: ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``cancelled``.
A ``running`` job whose owner is gone (a process on this host that no longer exists,
or no heartbeat for ``STALE_AFTER`` seconds) is claimed again and re-run from the
start: its finished images are found by their content hash, not redone.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
# How many failures a job keeps (the first ones): the API shows them all.
MAX_ERRORS = 100
# Seconds without a heartbeat after which another server may take a running job over.
STALE_AFTER = 60.0

COLUMNS = (
    "id, kind, state, total, done, skipped, failed, errors, created_at, started_at, "
    "finished_at, cancel, owner, heartbeat"
)


def create_sql(table: str, real: str) -> list[str]:
    """The statements that create the jobs table (``real``: the float type's name)."""
    return [
        f"""CREATE TABLE IF NOT EXISTS {table} (
            id text PRIMARY KEY,
            kind text NOT NULL,
            state text NOT NULL,
            source text NOT NULL,
            total bigint NOT NULL DEFAULT 0,
            done bigint NOT NULL DEFAULT 0,
            skipped bigint NOT NULL DEFAULT 0,
            failed bigint NOT NULL DEFAULT 0,
            errors text NOT NULL DEFAULT '[]',
            created_at text NOT NULL,
            started_at text,
            finished_at text,
            cancel integer NOT NULL DEFAULT 0,
            owner text NOT NULL DEFAULT '',
            heartbeat {real} NOT NULL DEFAULT 0
        )""",
        f"CREATE INDEX IF NOT EXISTS {table}_state ON {table} (state, created_at)",
    ]


def now_text() -> str:
    """Now, as the API shows times: UTC, ISO 8601, to the millisecond."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


# This process's incarnation: a restarted container may reuse the PID of the server it
# replaces (often 1), and must not take that server's jobs for its own.
_INCARNATION = uuid.uuid4().hex[:12]


def this_owner() -> str:
    """Who runs a job: this process (host, PID, incarnation), named so that another on the
    same host can tell whether it still exists."""
    return f"{socket.gethostname()}:{os.getpid()}:{_INCARNATION}"


def owner_gone(owner: str) -> bool:
    """Whether ``owner`` is a process of this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid, _, incarnation = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return incarnation != _INCARNATION  # this PID, but another (earlier) process
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Job:
    id: str
    kind: str  # csv | files
    state: str = "queued"
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    created_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    cancel: bool = False
    owner: str = ""
    heartbeat: float = 0.0

    def public(self) -> dict[str, Any]:
        """The job as ``GET /jobs/{id}`` answers."""
        return {
            "id": self.id,
            "state": self.state,
            "total": self.total,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "errors": self.errors[:MAX_ERRORS],
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }

    @classmethod
    def from_row(cls, row: Any) -> Job:
        values = list(row)
        values[7] = json.loads(values[7] or "[]")
        values[11] = bool(values[11])
        return cls(*values)


Connect = Callable[[], AbstractContextManager[Any]]


class JobTable:
    """The jobs of one index. ``tx`` opens a write transaction, ``read`` a connection
    to read with (both yield the connection); ``exists`` says whether the index (and so
    this table) exists yet."""

    def __init__(
        self,
        table: str,
        tx: Connect,
        read: Connect,
        exists: Callable[[], bool],
        placeholder: str,
    ):
        self.table = table
        self._tx = tx
        self._read = read
        self._exists = exists
        self._ph = placeholder

    def _sql(self, text: str) -> str:
        return text.replace("?", self._ph)

    def _run(self, conn: Any, text: str, params: tuple[Any, ...] = ()) -> Any:
        return conn.execute(self._sql(text), params)

    def _one(self, conn: Any, job_id: str) -> Job | None:
        row = self._run(
            conn, f"SELECT {COLUMNS} FROM {self.table} WHERE id = ?", (job_id,)
        ).fetchone()
        return Job.from_row(row) if row else None

    # -- reads -----------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        if not self._exists():
            return None
        with self._read() as conn:
            return self._one(conn, job_id)

    def recent(self, limit: int = 50) -> list[Job]:
        """The ``limit`` newest jobs, newest first."""
        if not self._exists():
            return []
        with self._read() as conn:
            rows = self._run(
                conn,
                f"SELECT {COLUMNS} FROM {self.table} ORDER BY created_at DESC, id LIMIT ?",
                (limit,),
            ).fetchall()
        return [Job.from_row(r) for r in rows]

    def source(self, job_id: str) -> str:
        with self._read() as conn:
            row = self._run(
                conn, f"SELECT source FROM {self.table} WHERE id = ?", (job_id,)
            ).fetchone()
        return str(row[0]) if row else ""

    def waiting(self) -> int:
        """How many jobs are queued or running."""
        if not self._exists():
            return 0
        with self._read() as conn:
            row = self._run(
                conn,
                f"SELECT count(*) FROM {self.table} WHERE state IN ('queued', 'running')",
            ).fetchone()
        return int(row[0])

    # -- writes ----------------------------------------------------------

    def create(self, job: Job, source: str) -> None:
        with self._tx() as conn:
            self._run(
                conn,
                f"INSERT INTO {self.table} (id, kind, state, source, total, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job.id, job.kind, job.state, source, job.total, job.created_at),
            )

    def claim(self, owner: str, stale_after: float = STALE_AFTER) -> Job | None:
        """Take the oldest job that is queued, or running for an owner that is gone;
        None if there is none. A job taken over starts again with zero counts."""
        if not self._exists():
            return None
        with self._read() as conn:
            rows = self._run(
                conn,
                f"SELECT {COLUMNS} FROM {self.table} WHERE state IN ('queued', 'running') "
                "ORDER BY created_at, id",
            ).fetchall()
        for job in (Job.from_row(r) for r in rows):
            if job.state == "running" and not (
                owner_gone(job.owner) or time.time() - job.heartbeat > stale_after
            ):
                continue
            if job.state == "running" and job.owner == owner:
                continue  # this process's own: still being run by its runner
            with self._tx() as conn:
                taken = self._run(
                    conn,
                    f"UPDATE {self.table} SET state = 'running', owner = ?, heartbeat = ?, "
                    "started_at = COALESCE(started_at, ?), done = 0, skipped = 0, "
                    "failed = 0, errors = '[]' WHERE id = ? AND state = ? AND owner = ?",
                    (owner, time.time(), now_text(), job.id, job.state, job.owner),
                ).rowcount
                if taken == 1:
                    return self._one(conn, job.id)
        return None

    def progress(self, job: Job) -> bool:
        """Record ``job``'s counts (and a heartbeat). False once the job is no longer
        this runner's to run: cancelled, or taken over."""
        with self._tx() as conn:
            updated = self._run(
                conn,
                f"UPDATE {self.table} SET total = ?, done = ?, skipped = ?, failed = ?, "
                "errors = ?, heartbeat = ? WHERE id = ? AND owner = ? AND state = 'running'",
                (
                    job.total,
                    job.done,
                    job.skipped,
                    job.failed,
                    json.dumps(job.errors[:MAX_ERRORS]),
                    time.time(),
                    job.id,
                    job.owner,
                ),
            ).rowcount
            current = self._one(conn, job.id)
        return bool(updated) and current is not None and not current.cancel

    def finish(self, job: Job, state: str) -> None:
        """End a job this runner owns (``done``, ``failed`` or ``cancelled``)."""
        assert state in FINISHED
        job.state, job.finished_at = state, now_text()
        with self._tx() as conn:
            self._run(
                conn,
                f"UPDATE {self.table} SET state = ?, total = ?, done = ?, skipped = ?, "
                "failed = ?, errors = ?, finished_at = ? "
                "WHERE id = ? AND owner = ? AND state = 'running'",
                (
                    state,
                    job.total,
                    job.done,
                    job.skipped,
                    job.failed,
                    json.dumps(job.errors[:MAX_ERRORS]),
                    job.finished_at,
                    job.id,
                    job.owner,
                ),
            )

    def release(self, job: Job) -> None:
        """Give a running job back to the queue (this server is shutting down)."""
        with self._tx() as conn:
            self._run(
                conn,
                f"UPDATE {self.table} SET state = 'queued', owner = '' "
                "WHERE id = ? AND owner = ? AND state = 'running'",
                (job.id, job.owner),
            )

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a job: a queued one at once, a running one when its runner next looks
        (between batches). Finished jobs are returned unchanged; None if unknown."""
        if not self._exists():
            return None
        with self._tx() as conn:
            job = self._one(conn, job_id)
            if job is None or job.state in FINISHED:
                return job
            if job.state == "queued":
                self._run(
                    conn,
                    f"UPDATE {self.table} SET state = 'cancelled', finished_at = ? "
                    "WHERE id = ? AND state = 'queued'",
                    (now_text(), job_id),
                )
            else:
                self._run(conn, f"UPDATE {self.table} SET cancel = 1 WHERE id = ?", (job_id,))
            return self._one(conn, job_id)

    def ids(self) -> Iterator[str]:
        """Every job's id (tests, maintenance)."""
        if not self._exists():
            return iter(())
        with self._read() as conn:
            rows = self._run(conn, f"SELECT id FROM {self.table} ORDER BY created_at").fetchall()
        return iter([r[0] for r in rows])
