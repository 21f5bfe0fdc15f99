"""The contract every store keeps: each test runs on SQLite and on PostgreSQL
(``db_location`` is parametrized), through ``open_store`` only, so the code above the
store can never tell which one it has."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from support import image_bytes

from imagefinder.errors import IndexMismatch
from imagefinder.indexer import index_folder
from imagefinder.store import Item, open_store

DIM = 16
IDENTITY = {"model": "toy", "weights": "w1", "dim": str(DIM), "preprocessing": "p1"}


def unit_vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def items(vectors: np.ndarray, prefix: str = "img") -> list[Item]:
    return [
        Item(f"{prefix}{i:03d}", f"/photos/{prefix}{i:03d}.jpg", f"sha{i}", 1000 + i, 10**18 + i, v)
        for i, v in enumerate(vectors)
    ]


def brute_force(vectors: np.ndarray, ids: list[str], query: np.ndarray, k: int):
    dist = np.sqrt(((vectors - query) ** 2).sum(axis=1))
    order = np.argsort(dist, kind="stable")[:k]
    return [ids[i] for i in order], dist[order]


@pytest.fixture
def store(db_location):
    s = open_store(db_location)
    yield s
    s.close()


@pytest.fixture
def filled(store):
    vectors = unit_vectors(200)
    store.ensure_schema(IDENTITY)
    assert store.upsert(items(vectors)) == 200
    return store, vectors


def test_a_new_location_is_no_index_yet(store):
    assert store.meta() == {}
    assert store.count() == 0


def test_ensure_schema_records_the_identity_and_the_metric(store):
    store.ensure_schema(IDENTITY)
    meta = store.meta()
    assert {k: meta[k] for k in IDENTITY} == IDENTITY
    assert meta["metric"] == "l2" and meta["schema_version"] == str(store.schema_version())
    assert store.count() == 0 and store.file_states() == {}
    store.ensure_schema(IDENTITY)  # the same model again: accepted, nothing changes
    assert store.meta() == meta


@pytest.mark.parametrize("key", ["model", "weights", "dim", "preprocessing"])
def test_vectors_of_another_model_are_refused(store, key):
    store.ensure_schema(IDENTITY)
    with pytest.raises(IndexMismatch, match=key):
        store.ensure_schema({**IDENTITY, key: "other"})


def test_upsert_stores_vectors_bit_for_bit(filled):
    store, vectors = filled
    assert store.count() == 200
    got = store.vector_of("img007")
    assert got.dtype == np.float32 and got.tobytes() == vectors[7].tobytes()
    assert store.vector_of("nope") is None
    assert store.path_of("img007") == "/photos/img007.jpg"
    assert store.path_of("nope") is None


def test_file_states_hold_what_the_incremental_fast_path_compares(filled):
    store, _ = filled
    states = store.file_states()
    assert len(states) == 200
    state = states["img042"]
    assert (state.path, state.sha256, state.size, state.mtime_ns) == (
        "/photos/img042.jpg",
        "sha42",
        1042,
        10**18 + 42,  # nanosecond mtimes need 64 bits
    )
    assert store.file_state("img042") == state
    assert store.file_state("nope") is None


def test_upsert_replaces_a_row_with_the_same_id(filled):
    store, vectors = filled
    new = -vectors[3]
    store.upsert([Item("img003", "/moved/img003.png", "sha-new", 5, 6, new)])
    assert store.count() == 200
    assert store.vector_of("img003").tobytes() == new.tobytes()
    assert store.file_states()["img003"].sha256 == "sha-new"
    assert store.knn(new, 1) == [("img003", pytest.approx(0.0, abs=1e-6))]


def test_touch_changes_path_size_and_mtime_only(filled):
    store, vectors = filled
    store.touch("img009", "/renamed.jpg", 77, 88)
    state = store.file_states()["img009"]
    assert (state.path, state.sha256, state.size, state.mtime_ns) == (
        "/renamed.jpg",
        "sha9",
        77,
        88,
    )
    assert store.vector_of("img009").tobytes() == vectors[9].tobytes()


def test_delete_removes_rows_and_counts_only_real_ones(filled):
    store, vectors = filled
    assert store.delete(["img001", "img002", "never-there"]) == 2
    assert store.count() == 198
    assert store.vector_of("img001") is None
    found = [i for i, _ in store.knn(vectors[1], 5)]
    assert "img001" not in found
    assert store.delete([]) == 0


def test_knn_is_nearest_first_with_true_l2_distances(filled):
    store, vectors = filled
    ids = [f"img{i:03d}" for i in range(200)]
    for q in (0, 57, 199):
        want_ids, want_dist = brute_force(vectors, ids, vectors[q], 10)
        got = store.knn(vectors[q], 10)
        assert [i for i, _ in got] == want_ids
        assert [d for _, d in got] == pytest.approx(list(want_dist), abs=1e-5)


def test_knn_of_a_new_vector_matches_brute_force(filled):
    store, vectors = filled
    ids = [f"img{i:03d}" for i in range(200)]
    for query in unit_vectors(5, seed=9):
        want_ids, _ = brute_force(vectors, ids, query, 3)
        assert [i for i, _ in store.knn(query, 3)] == want_ids


def test_knn_exclude_drops_ids_and_still_returns_k(filled):
    store, vectors = filled
    first = [i for i, _ in store.knn(vectors[5], 6)]
    assert first[0] == "img005"
    got = [i for i, _ in store.knn(vectors[5], 5, exclude=("img005",))]
    assert got == first[1:]


def test_knn_asking_for_more_than_there_is_returns_everything(store):
    store.ensure_schema(IDENTITY)
    vectors = unit_vectors(4)
    store.upsert(items(vectors))
    assert sorted(i for i, _ in store.knn(vectors[0], 50)) == [f"img{i:03d}" for i in range(4)]


def test_iter_vectors_and_items_yield_every_row_once_in_batches(filled):
    store, vectors = filled
    batches = list(store.iter_vectors(batch=64))
    assert [len(b) for b in batches] == [64, 64, 64, 8]
    rows = {image_id: (path, v) for b in batches for image_id, path, v in b}
    assert len(rows) == 200
    assert rows["img150"][0] == "/photos/img150.jpg"
    assert rows["img150"][1].tobytes() == vectors[150].tobytes()
    whole = [it for b in store.iter_items(batch=90) for it in b]
    assert sorted(it.id for it in whole) == sorted(rows)
    it = next(x for x in whole if x.id == "img011")
    assert (it.sha256, it.size, it.mtime_ns) == ("sha11", 1011, 10**18 + 11)
    assert it.vector.tobytes() == vectors[11].tobytes()


def test_a_bulk_load_searches_the_same_before_and_after(store):
    """begin_bulk/end_bulk may drop and rebuild an ANN index; the answers stay right."""
    store.ensure_schema(IDENTITY)
    vectors = unit_vectors(300, seed=3)
    store.begin_bulk(300)
    store.upsert(items(vectors[:150]))
    during = store.knn(vectors[7], 5)
    store.upsert(items(vectors[150:], prefix="late"))
    store.end_bulk()
    assert store.count() == 300
    assert store.knn(vectors[7], 5)[:1] == during[:1]
    assert store.knn(vectors[200], 1)[0][0] == "late050"


def test_another_handle_on_the_same_location_sees_the_writes(filled, db_location):
    store, vectors = filled
    other = open_store(db_location)
    try:
        assert other.count() == 200
        assert other.vector_of("img100").tobytes() == vectors[100].tobytes()
        assert other.meta() == store.meta()
    finally:
        other.close()


def test_searches_from_many_threads_at_once(filled):
    store, vectors = filled

    def search(i: int):
        return store.knn(vectors[i], 1)[0][0]

    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(search, range(64)))
    assert found == [f"img{i:03d}" for i in range(64)]


def test_incremental_extraction_and_prune(db_location, tmp_path, model):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, color in [("a", (200, 30, 30)), ("b", (30, 200, 30)), ("c", (30, 30, 200))]:
        (folder / f"{name}.jpg").write_bytes(image_bytes((96, 80), color))
    store = open_store(db_location)
    try:
        first = index_folder(folder, store, model)
        assert (first.indexed, first.unchanged) == (3, 0)
        again = index_folder(folder, store, model)
        assert (again.indexed, again.unchanged) == (0, 3)

        (folder / "b.jpg").write_bytes(image_bytes((96, 80), (250, 250, 0)))
        os.utime(folder / "b.jpg", ns=(1, 10**9))
        (folder / "c.jpg").unlink()
        changed = index_folder(folder, store, model)
        assert (changed.indexed, changed.unchanged, changed.missing) == (1, 1, 1)
        assert store.count() == 3

        pruned = index_folder(folder, store, model, prune=True)
        assert pruned.pruned == 1
        assert sorted(store.file_states()) == ["a", "b"]
        assert store.file_states()["b"].mtime_ns == 10**9
        query = model.embed_batch([_open(folder / "b.jpg")])[0]
        assert store.knn(query, 1)[0][0] == "b"
    finally:
        store.close()


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")
