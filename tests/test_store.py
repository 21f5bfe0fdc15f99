"""The SQLite index file: connect() with sqlite-vec and WAL, a versioned schema with meta,
one transaction per batch."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from imagefinder.errors import StoreError
from imagefinder.store import Item
from imagefinder.store.sqlite import SQLiteStore, connect

DIM = 8
IDENTITY = {"model": "toy", "weights": "w1", "dim": str(DIM), "preprocessing": "none"}


def unit(*values: float) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


def item(image_id: str, vector: np.ndarray, path: str | None = None) -> Item:
    return Item(image_id, path or f"/images/{image_id}.jpg", "sha-" + image_id, 10, 1, vector)


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "index.db")
    s.ensure_schema(IDENTITY)
    yield s
    s.close()


# -- the connection ------------------------------------------------------------


def test_connect_uses_stdlib_sqlite3_when_it_can_load_extensions_else_sqlean(tmp_path):
    conn = connect(tmp_path / "x.db")
    can_load = hasattr(sqlite3.connect(":memory:"), "enable_load_extension")
    expected = "sqlite3" if can_load else "sqlean"
    assert type(conn).__module__.split(".")[0] == expected
    conn.close()


def test_a_connection_has_sqlite_vec_and_wal(tmp_path):
    conn = connect(tmp_path / "x.db")
    (version,) = conn.execute("SELECT vec_version()").fetchone()
    assert version.startswith("v0.")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    conn.close()


def test_reading_while_a_write_transaction_is_open(tmp_path):
    # WAL: a search never waits for an extraction's open transaction.
    path = tmp_path / "x.db"
    writer, reader = SQLiteStore(path), SQLiteStore(path)
    writer.ensure_schema(IDENTITY)
    writer.upsert([item("a", unit(1))])
    with writer.transaction() as conn:
        conn.execute("DELETE FROM images")
        assert reader.count() == 1
    assert reader.count() == 0
    writer.close()
    reader.close()


# -- schema and meta -------------------------------------------------------------


def test_a_new_index_records_what_its_vectors_mean(store):
    meta = store.meta()
    assert meta["schema_version"] == str(SQLiteStore.schema_version())
    assert meta["metric"] == "l2"
    assert {k: meta[k] for k in IDENTITY} == IDENTITY
    assert store.count() == 0


def test_an_index_from_another_schema_version_is_refused(tmp_path):
    path = tmp_path / "old.db"
    s = SQLiteStore(path)
    s.ensure_schema(IDENTITY)
    s.conn.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 0.*rebuild it with a new --db path"):
        s.ensure_schema(IDENTITY)
    s.close()


def test_a_file_that_is_not_an_index_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database " * 100)
    with pytest.raises(StoreError, match="is not an ImageFinder index"):
        SQLiteStore(path).meta()


# -- writes ------------------------------------------------------------------------
# (What every store must do, SQLite and PostgreSQL alike, is in test_store_contract.py.)


def test_a_batch_that_fails_midway_leaves_nothing_behind(store):
    store.upsert([item("a", unit(1))])
    wrong_size = np.ones(DIM + 1, dtype=np.float32)
    with pytest.raises(Exception, match="(?i)dimension"):
        store.upsert([item("b", unit(0, 1)), item("c", wrong_size)])
    assert store.count() == 1
    assert [i for i, _ in store.knn(unit(0, 1), 5)] == ["a"]
