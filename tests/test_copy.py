"""`imagefinder copy SRC DST` moves an index between stores, in either direction,
with vectors (bit for bit), file states and meta unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from imagefinder.cli import cli
from imagefinder.store import Item, open_store

DIM = 24
IDENTITY = {"model": "toy", "weights": "w1", "dim": str(DIM), "preprocessing": "p1"}


def build(location: str, n: int = 250, identity: dict = IDENTITY) -> None:
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    # Values a text round trip would bend: a subnormal, a negative zero, odd mantissas.
    vectors[0, :3] = [np.float32(1e-41), np.float32(-0.0), np.float32(1 / 3)]
    store = open_store(location)
    store.ensure_schema(identity)
    store.upsert(
        Item(f"cls{i % 7}/img{i:04d}", f"/photos/{i}.jpg", f"{i:064x}", 100 + i, 10**18 + i, v)
        for i, v in enumerate(vectors)
    )
    store.close()


def rows(location: str) -> dict[str, tuple]:
    store = open_store(location)
    try:
        return {
            it.id: (it.path, it.sha256, it.size, it.mtime_ns, it.vector.tobytes())
            for batch in store.iter_items(batch=64)
            for it in batch
        }
    finally:
        store.close()


def meta(location: str) -> dict[str, str]:
    """The index's meta, less its schema version, which is each store's own."""
    store = open_store(location)
    try:
        found = store.meta()
        assert found.pop("schema_version") == str(store.schema_version())
        return found
    finally:
        store.close()


def copy(src: str, dst: str, *args: str):
    return CliRunner().invoke(cli, ["copy", src, dst, *args])


def test_sqlite_to_postgres_and_back_is_exact(tmp_path, pg_url):
    src, back = str(tmp_path / "src.db"), str(tmp_path / "back.db")
    build(src)
    there = copy(src, pg_url, "--batch-size", "100")
    assert there.exit_code == 0, there.output
    assert "250 images copied" in there.output
    again = copy(pg_url, back)
    assert again.exit_code == 0, again.output

    original = rows(src)
    assert len(original) == 250
    assert rows(pg_url) == original
    assert rows(back) == original
    assert meta(pg_url) == meta(src) == meta(back)  # created_at included


def test_sqlite_to_sqlite(tmp_path):
    src, dst = str(tmp_path / "a.db"), str(tmp_path / "sub" / "b.db")
    build(src, n=30)
    result = copy(src, dst)
    assert result.exit_code == 0, result.output
    assert rows(dst) == rows(src) and meta(dst) == meta(src)


def test_a_copy_searches_like_the_original(tmp_path, pg_url):
    src = str(tmp_path / "src.db")
    build(src)
    assert copy(src, pg_url).exit_code == 0
    a, b = open_store(src), open_store(pg_url)
    query = np.random.default_rng(1).standard_normal(DIM).astype(np.float32)
    got_a, got_b = a.knn(query, 5), b.knn(query, 5)
    assert [i for i, _ in got_a] == [i for i, _ in got_b]
    assert [d for _, d in got_a] == pytest.approx([d for _, d in got_b], abs=1e-5)
    a.close()
    b.close()


def test_running_an_interrupted_copy_again_completes_it(tmp_path, pg_url):
    src = str(tmp_path / "src.db")
    build(src)
    # What a copy killed after its first batches leaves: some rows, the meta.
    store = open_store(pg_url)
    store.ensure_schema(meta(src))
    store.upsert([it for batch in open_store(src).iter_items(batch=100) for it in batch][:100])
    store.close()
    result = copy(src, pg_url)
    assert result.exit_code == 0, result.output
    assert rows(pg_url) == rows(src)


def test_copying_into_an_index_of_another_model_is_refused(tmp_path, pg_url):
    src = str(tmp_path / "src.db")
    build(src, n=10)
    build(pg_url, n=10, identity={**IDENTITY, "model": "other"})
    result = copy(src, pg_url)
    assert result.exit_code != 0
    assert "model='other'" in result.output and "Traceback" not in result.output
    assert len(rows(pg_url)) == 10


def test_copying_what_is_not_an_index_names_it(tmp_path):
    missing = str(tmp_path / "missing.db")
    result = copy(missing, str(tmp_path / "out.db"))
    assert result.exit_code != 0
    assert f"{missing} is not an index" in result.output


def test_copying_an_index_onto_itself_is_refused(tmp_path):
    src = str(tmp_path / "src.db")
    build(src, n=5)
    result = copy(src, src)
    assert result.exit_code != 0
    assert "both the source and the destination" in result.output
