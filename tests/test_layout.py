"""The package's own contracts: every error code has one HTTP status, and the index
schema migrates forward, in one place, on both stores."""

from __future__ import annotations

import pytest

from imagefinder import errors
from imagefinder.server.app import STATUS
from imagefinder.store import open_store

IDENTITY = {"model": "toy", "weights": "w1", "dim": "4", "preprocessing": "none"}


def all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from all_subclasses(sub)


def test_every_error_code_has_an_http_status():
    codes = {cls.code for cls in all_subclasses(errors.ImageFinderError)}
    # Codes given per instance rather than by class.
    codes |= {"invalid_id", "index_empty", "file_missing", "unknown_job", "too_many_rows"}
    assert codes <= set(STATUS), codes - set(STATUS)
    assert all(400 <= status < 600 for status in STATUS.values())


def with_migration(store):
    """``store`` as a newer ImageFinder would open it: one migration more."""
    calls = []

    def add_tags(conn):
        calls.append(1)
        table = "images" if store.kind == "sqlite" else "imagefinder_images"
        conn.execute(f"ALTER TABLE {table} ADD COLUMN tags TEXT")

    migrations = (*type(store).migrations, add_tags)
    newer = type(f"Newer{type(store).__name__}", (type(store),), {"migrations": migrations})
    store.__class__ = newer
    return store, calls


def columns(store) -> set[str]:
    if store.kind == "sqlite":
        return {r[1] for r in store.conn.execute("PRAGMA table_info(images)")}
    with store._tx() as conn:
        rows = conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'imagefinder_images'"
        )
        return {r[0] for r in rows}


def test_a_new_index_is_created_through_every_migration(db_location):
    store, calls = with_migration(open_store(db_location))
    current = type(store).schema_version()
    store.ensure_schema(IDENTITY)
    assert store.meta()["schema_version"] == str(current)
    assert "tags" in columns(store) and calls == [1]
    store.close()


def test_an_older_index_is_migrated_once_when_opened(db_location):
    old = open_store(db_location)
    old.ensure_schema(IDENTITY)
    previous = type(old).schema_version()
    assert old.meta()["schema_version"] == str(previous)
    old.close()
    store, calls = with_migration(open_store(db_location))
    assert store.meta()["schema_version"] == str(previous + 1)
    store.ensure_schema(IDENTITY)  # already migrated: nothing runs twice
    assert calls == [1] and "tags" in columns(store)
    store.close()


def test_an_index_from_a_newer_imagefinder_is_refused(db_location):
    store, _ = with_migration(open_store(db_location))
    store.ensure_schema(IDENTITY)
    store.close()
    older = open_store(db_location)
    current = type(older).schema_version()
    with pytest.raises(
        errors.StoreError,
        match=f"schema version {current + 1}, this ImageFinder reads version {current}",
    ):
        older.meta()
    older.close()
