"""Opening a SQLite index file: sqlite-vec loaded, and the pragmas every caller relies
on (WAL, a busy timeout, mmap for scans)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from ..errors import StoreError


def _driver() -> Any:
    """The stdlib sqlite3 if it can load extensions, else sqlean.py."""
    probe = sqlite3.connect(":memory:")
    try:
        if hasattr(probe, "enable_load_extension"):
            return sqlite3
    finally:
        probe.close()
    try:
        import sqlean
    except ImportError:
        raise StoreError(
            "this Python's sqlite3 cannot load extensions, which sqlite-vec needs; "
            "install the drop-in replacement with: pip install sqlean.py"
        ) from None
    return sqlean


_DRIVER = None


def connect(path: str | Path) -> sqlite3.Connection:
    """Open ``path`` with sqlite-vec loaded and the pragmas every caller relies on."""
    global _DRIVER
    if _DRIVER is None:
        _DRIVER = _driver()
    import sqlite_vec

    conn = _DRIVER.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    try:
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
    except Exception as e:
        conn.close()
        raise StoreError(f"cannot load the sqlite-vec extension: {e}") from e
    # WAL lets searches read while an extraction writes; busy_timeout makes
    # writers queue instead of failing with "database is locked".
    conn.execute("PRAGMA busy_timeout = 30000")
    _wal(conn)
    conn.execute("PRAGMA synchronous = NORMAL")
    # KNN scans read every vector: through mmap they skip the page-cache copy, which
    # halves an exact scan (SQLite clamps this to its compile-time maximum).
    conn.execute(f"PRAGMA mmap_size = {1 << 32}")
    return conn


def _wal(conn: Any, wait: float = 30.0) -> None:
    """Switch to WAL. On a new file, while another process holds the write lock creating
    the index, SQLite answers "database is locked" at once (no busy handler for a
    journal-mode change): wait for it like any other writer."""
    deadline = time.monotonic() + wait
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except Exception as e:  # sqlite3 or sqlean's OperationalError
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
