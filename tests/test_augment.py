"""αQE and DBA: the maths, the augmented vectors every store keeps beside the raw ones,
and how they stay correct as images come and go (extract, API writes, a crash).

Store tests run on SQLite and on a real PostgreSQL (``db_location``)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from support import clustered_vectors, image_bytes

from imagefinder import augment, query
from imagefinder.config import Settings
from imagefinder.evaluate import MatrixIndex
from imagefinder.indexer import index_folder
from imagefinder.server.app import create_app
from imagefinder.store import Item, open_store

DIM = 16
IDENTITY = {"model": "toy", "weights": "w1", "dim": str(DIM), "preprocessing": "none"}


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def items(vectors, prefix="v"):
    return [Item(f"{prefix}{i:03d}", f"/p/{i}", "h", 1, 1, v) for i, v in enumerate(vectors)]


@pytest.fixture
def store(db_location):
    s = open_store(db_location)
    s.ensure_schema(IDENTITY)
    yield s
    s.close()


def augmented_matrix(store, ids):
    found = store.augmented_of(ids)
    return np.stack([found[i] for i in ids])


# -- the maths --------------------------------------------------------------------------


def test_weighted_sum_pulls_the_query_toward_close_neighbours_only():
    q = unit(np.array([1.0, 0.0, 0.0]))
    near = unit(np.array([0.9, 0.1, 0.0]))
    far = unit(np.array([0.0, 0.0, 1.0]))  # orthogonal: weight 0
    moved = augment.weighted_sum(q, np.stack([near, far]), alpha=3.0)
    assert np.linalg.norm(moved) == pytest.approx(1.0)
    expected = unit(q + (near @ q) ** 3 * near)
    np.testing.assert_allclose(moved, expected, atol=1e-6)


def test_augment_uses_each_vectors_n_nearest_others_exactly():
    matrix = clustered_vectors(300, DIM, seed=3)
    out = augment.augment(matrix, n=2, alpha=3.0)
    for row in (0, 17, 299):
        sims = matrix @ matrix[row]
        sims[row] = -np.inf
        nearest = np.argsort(-sims)[:2]
        expected = augment.weighted_sum(matrix[row], matrix[nearest], 3.0)
        np.testing.assert_allclose(out[row], expected, atol=1e-5)


def test_copies_of_the_query_lead_and_expansion_looks_past_them():
    base = clustered_vectors(40, DIM, seed=5)
    ids = [f"i{n}" for n in range(41)]
    matrix = np.vstack([base, base[:1]])  # i40 is a copy of i0
    results = query.run(MatrixIndex(ids, matrix, dba=False), matrix[0], 6, True, ("i0",))
    assert results[0] == ("i40", pytest.approx(0.0, abs=1e-6))
    sims = base @ base[0]
    sims[0] = -np.inf
    nearest = np.argsort(-sims)[:2]  # the copy is not one of them
    moved = augment.weighted_sum(base[0], base[nearest], 3.0)
    dist = ((base - moved) ** 2).sum(axis=1)
    dist[0] = np.inf
    expected = [f"i{n}" for n in np.argsort(dist, kind="stable")[:5]]
    assert [i for i, _ in results[1:]] == expected
    for image_id, distance in results:
        raw = matrix[ids.index(image_id)]
        assert distance == pytest.approx(float(np.linalg.norm(raw - base[0])), abs=1e-5)


# -- the store keeps augmented vectors beside the raw ones ------------------------------


def test_dba_on_computes_every_augmented_vector_and_ranks_by_them(store):
    vectors = clustered_vectors(60, DIM, seed=1)
    store.upsert(items(vectors))
    assert store.dba() is None and store.augmented_of(["v000"]) == {}
    assert augment.set_enabled(store, True)
    assert store.dba() == "n=2,alpha=3"
    ids = [f"v{i:03d}" for i in range(60)]
    expected = augment.augment(vectors)
    np.testing.assert_allclose(augmented_matrix(store, ids), expected, atol=1e-5)
    # Raw vectors are untouched: exact lookups and distances use them.
    np.testing.assert_allclose(store.vector_of("v007"), vectors[7], atol=1e-6)
    q = vectors[7]
    by_augmented = [i for i, _ in query._rank(store, q, 5, (), True)]
    order = np.argsort(((expected - q) ** 2).sum(axis=1), kind="stable")[:5]
    assert by_augmented == [ids[n] for n in order]


def test_a_search_reports_raw_distances_in_the_reranked_order(store):
    vectors = clustered_vectors(60, DIM, seed=2)
    store.upsert(items(vectors))
    augment.set_enabled(store, True)
    results = query.run(store, vectors[3], 5, expand=True)
    assert results[0] == ("v003", pytest.approx(0.0, abs=1e-5))  # itself, at distance 0
    for image_id, distance in results:
        raw = store.vector_of(image_id)
        assert distance == pytest.approx(float(np.linalg.norm(raw - vectors[3])), abs=1e-5)


def test_writes_keep_the_augmented_table_covering_every_image(store):
    vectors = clustered_vectors(30, DIM, seed=4)
    store.upsert(items(vectors[:20]))
    augment.set_enabled(store, True)
    store.upsert(items(vectors[20:], prefix="w"))  # enter with their raw vectors
    new = store.augmented_of(["w000", "w009"])
    np.testing.assert_allclose(new["w000"], vectors[20], atol=1e-6)
    store.delete(["v000", "w009"])
    assert set(store.augmented_of(["v000", "w009", "v001"])) == {"v001"}
    hits = {i for i, _ in query._rank(store, vectors[0], 30, (), True)}
    assert len(hits) == 28 and "v000" not in hits and "w009" not in hits


def test_dba_off_drops_the_augmented_vectors(store):
    store.upsert(items(clustered_vectors(10, DIM, seed=6)))
    augment.set_enabled(store, True)
    assert augment.set_enabled(store, False)
    assert store.dba() is None and store.augmented_of(["v001"]) == {}
    assert not augment.set_enabled(store, False)  # already off: nothing to do
    # Ranking by augmented vectors falls back to the raw ones.
    assert query._rank(store, store.vector_of("v001"), 1, (), True)[0][0] == "v001"


def test_repair_after_single_writes_matches_a_full_recompute(store):
    vectors = clustered_vectors(80, DIM, seed=7)
    store.upsert(items(vectors[:70]))
    augment.set_enabled(store, True)
    added = items(vectors[70:], prefix="w")
    for item in added:  # as the API adds images: one at a time, each then repaired
        store.upsert([item])
        near = augment.neighbourhood(store, [item.vector])
        augment.repair(store, near | {item.id})
    gone = store.vector_of("v005")
    near = augment.neighbourhood(store, [gone])
    store.delete(["v005"])
    augment.repair(store, near - {"v005"})
    ids = [i for chunk in store.iter_vectors() for i, _, _ in chunk]
    raw = np.stack([store.vector_of(i) for i in ids])
    np.testing.assert_allclose(augmented_matrix(store, ids), augment.augment(raw), atol=1e-5)


# -- extract and crashes ----------------------------------------------------------------


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        colour = (20 * i, 255 - 20 * i, (70 * i) % 256)
        (folder / f"p{i:02d}.png").write_bytes(image_bytes((40, 32), colour, "PNG"))
    return folder


def full_recompute_matches(store):
    ids = [i for chunk in store.iter_vectors() for i, _, _ in chunk]
    raw = np.stack([store.vector_of(i) for i in ids])
    return np.allclose(augmented_matrix(store, ids), augment.augment(raw), atol=1e-5)


def test_extract_recomputes_dba_at_the_end_of_every_run_that_changed_something(
    db_location, photos, model
):
    store = open_store(db_location)
    summary = index_folder(photos, store, model, dba=True)
    assert summary.indexed == 12 and summary.augmented == 12
    assert full_recompute_matches(store) and not augment.is_stale(store)
    (photos / "p03.png").unlink()
    (photos / "new.png").write_bytes(image_bytes((40, 32), (1, 2, 3), "PNG"))
    again = index_folder(photos, store, model, prune=True)
    assert (again.indexed, again.pruned, again.augmented) == (1, 1, 12)
    assert full_recompute_matches(store)
    idle = index_folder(photos, store, model)
    assert (idle.indexed, idle.augmented) == (0, 0)  # nothing changed: nothing recomputed
    store.close()


def test_a_run_that_died_before_the_recompute_leaves_a_mark_the_next_run_clears(
    db_location, photos, model
):
    store = open_store(db_location)
    index_folder(photos, store, model, dba=True)
    # A run that wrote its rows and died: rows in, augmented vectors not recomputed.
    augment.mark_stale(store)
    store.upsert([Item("late", str(photos / "p00.png"), "h", 1, 1, store.vector_of("p01"))])
    assert not full_recompute_matches(store)
    store.delete(["late"])
    assert augment.is_stale(store)
    summary = index_folder(photos, store, model)  # nothing new to index, yet it recomputes
    assert summary.augmented == 12 and full_recompute_matches(store)
    store.close()


def test_extract_can_switch_dba_off_and_on(db_location, photos, model):
    store = open_store(db_location)
    index_folder(photos, store, model, dba=True)
    index_folder(photos, store, model, dba=False)
    assert store.dba() is None
    summary = index_folder(photos, store, model, dba=True)
    assert summary.augmented == 12 and full_recompute_matches(store)
    store.close()


@pytest.mark.sqlite_only
def test_api_writes_keep_dba_correct(tmp_path, photos, model):
    db = tmp_path / "index.db"
    store = open_store(str(db))
    index_folder(photos, store, model, dba=True)
    settings = Settings(db=str(db), images_dir=str(tmp_path / "images"), api_token="t")
    auth = {"Authorization": "Bearer t"}
    with TestClient(create_app(settings)) as client:
        for i in range(3):
            data = image_bytes((40, 32), (200, 40 * i, 90), "PNG")
            response = client.post(
                "/images", files={"file": ("x.png", data)}, data={"id": f"api{i}"}, headers=auth
            )
            assert response.status_code == 201, response.text
        assert client.delete("/images/p04", headers=auth).status_code == 200
    assert full_recompute_matches(store)
    store.close()


@pytest.mark.sqlite_only
def test_the_first_api_write_creates_an_index_with_the_dba_setting(tmp_path, model):
    import fake_model

    for dba in (True, False):
        db = tmp_path / f"{dba}.db"
        settings = Settings(
            db=str(db),
            images_dir=str(tmp_path / "i"),
            api_token="t",
            model=fake_model.NAME,
            dba=dba,
        )
        with TestClient(create_app(settings)) as client:
            response = client.post(
                "/images",
                files={"file": ("x.png", image_bytes(fmt="PNG"))},
                data={"id": "one"},
                headers={"Authorization": "Bearer t"},
            )
            assert response.status_code == 201, response.text
            assert client.get("/health").json()["dba"] is dba
