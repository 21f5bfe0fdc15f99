"""Metadata, filtered KNN and deep pages in the stores: each test runs on SQLite and on
a real PostgreSQL (``db_location``), through ``open_store`` only.

Recall is measured against the same store searching exactly (``exact=True``): the
approximate paths (SQLite's binary pre-selection, pgvector's HNSW) must find what an
exhaustive scan finds, on deep pages and under a filter that matches 1% of the index.
"""

from __future__ import annotations

import numpy as np
import pytest
from support import clustered_vectors

from imagefinder import query
from imagefinder.store import Item, open_store
from imagefinder.store import sqlite as sqlite_store

DIM = 256
IDENTITY = {"model": "toy", "weights": "w1", "dim": str(DIM), "preprocessing": "p1"}
N = 20_000


def items(vectors: np.ndarray, start: int = 0) -> list[Item]:
    return [
        Item(f"v{start + i:05d}", f"/p/{start + i}.jpg", f"sha{start + i}", 1, 1, v)
        for i, v in enumerate(vectors)
    ]


def category(i: int) -> str:
    """1% of images are 'rare', 60% 'common', the rest 'other'."""
    return "rare" if i % 100 == 7 else "common" if i % 10 < 6 else "other"


def fill(location: str, vectors: np.ndarray, **kw):
    store = open_store(location, **kw)
    store.ensure_schema(IDENTITY)
    store.begin_bulk(len(vectors))
    for start in range(0, len(vectors), 2000):
        store.upsert(items(vectors[start : start + 2000], start))
    store.end_bulk()
    store.set_metadata(
        (f"v{i:05d}", {"category": category(i), "shard": str(i % 2)}) for i in range(len(vectors))
    )
    return store


def recall(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> float:
    return len({i for i, _ in got} & {i for i, _ in want}) / len(want)


@pytest.fixture
def small(db_location):
    vectors = clustered_vectors(300, DIM, seed=3)
    store = fill(db_location, vectors)
    yield store, vectors
    store.close()


def test_metadata_is_stored_replaced_and_leaves_with_the_image(small):
    store, vectors = small
    assert store.metadata_of(["v00007", "v00008"]) == {
        "v00007": {"category": "rare", "shard": "1"},
        "v00008": {"category": "other", "shard": "0"},
    }
    assert store.set_metadata([("v00007", {"brand": "Acme ünïcode"}), ("nobody", {"a": "b"})]) == 1
    assert store.metadata_of(["v00007", "nobody"]) == {"v00007": {"brand": "Acme ünïcode"}}
    # A re-embedded image (an upsert that says nothing of metadata) keeps its metadata.
    store.upsert(items(vectors[7:8] * 0.5 + vectors[9:10] * 0.5, 7))
    assert store.metadata_of(["v00007"]) == {"v00007": {"brand": "Acme ünïcode"}}
    store.set_metadata([("v00007", {})])
    assert store.metadata_of(["v00007"]) == {}
    store.delete(["v00008"])
    store.upsert(items(vectors[8:9], 8))  # the same id again: a new image, no metadata
    assert store.metadata_of(["v00008"]) == {}


def test_content_hashes_find_copies(small):
    store, vectors = small
    store.upsert([Item("copy-of-3", "/p/c.jpg", "sha3", 1, 1, vectors[3])])
    assert store.hashes_of(["v00003", "copy-of-3", "nobody"]) == {
        "v00003": "sha3",
        "copy-of-3": "sha3",
    }
    assert store.ids_with_hashes(["sha3", "sha4", "nothing"]) == {
        "sha3": ["copy-of-3", "v00003"],
        "sha4": ["v00004"],
    }
    assert store.hash_groups() == [["copy-of-3", "v00003"]]


def test_an_index_from_before_metadata_gains_it_when_opened(db_location):
    """An index at schema version 1 (no metadata, no content-hash index), with images
    in it, opened by this version: migrated once, every vector kept, metadata and
    filters and exact duplicates work on it."""
    vectors = clustered_vectors(40, DIM, seed=5)
    old = open_store(db_location)
    old.__class__ = type(f"V1{type(old).__name__}", (type(old),), {"migrations": ()})
    old.ensure_schema(IDENTITY)
    assert old.meta()["schema_version"] == "1"
    old.upsert(items(vectors))
    old.upsert([Item("twin", "/p/twin.jpg", "sha3", 1, 1, vectors[3])])
    old.close()

    store = open_store(db_location)
    assert store.meta()["schema_version"] == str(type(store).schema_version()) != "1"
    assert store.count() == 41
    np.testing.assert_allclose(store.vector_of("v00007"), vectors[7], atol=1e-6)
    assert store.metadata_of(["v00001", "twin"]) == {}
    assert store.set_metadata([("v00001", {"category": "rare"})]) == 1
    assert store.knn(vectors[0], 3, where=(("category", "rare"),))[0][0] == "v00001"
    assert len(store.knn(vectors[0], 3, where=(("category", "rare"),))) == 1
    assert store.hash_groups() == [["twin", "v00003"]]
    store.close()


def test_a_filter_is_applied_inside_the_knn(small):
    store, vectors = small
    q = vectors[50]
    where = (("category", "rare"),)
    got = store.knn(q, 5, where=where)
    rare = [i for i in range(len(vectors)) if category(i) == "rare"]  # 3 of 300
    dist = np.linalg.norm(vectors[rare] - q, axis=1)
    assert [i for i, _ in got] == [f"v{rare[j]:05d}" for j in np.argsort(dist)]
    np.testing.assert_allclose([d for _, d in got], np.sort(dist), atol=1e-5)
    # Pairs are ANDed; a value nobody has matches nothing; exclusion still applies.
    both = store.knn(q, 300, where=(("category", "common"), ("shard", "1")))
    assert len(both) == sum(category(i) == "common" and i % 2 == 1 for i in range(300))
    assert store.knn(q, 3, where=(("category", "missing"),)) == []
    assert f"v{rare[0]:05d}" not in [i for i, _ in store.knn(q, 5, (f"v{rare[0]:05d}",), where)]


def test_pages_continue_one_ranking_and_max_distance_cuts_it(small):
    store, vectors = small
    q = vectors[11]
    whole = query.run(store, q, 60, expand=False)
    pages = [query.run(store, q, 20, expand=False, offset=o) for o in (0, 20, 40)]
    assert sum(pages, []) == whole
    cut = whole[30][1]
    near = query.run(store, q, 50, expand=False, max_distance=cut)
    assert near == [r for r in whole[:50] if r[1] <= cut] and len(near) == 31
    assert query.SearchOptions(k=20, offset=20).next_offset(more=True) == 40
    assert query.SearchOptions(k=20, offset=20).next_offset(more=False) is None
    assert query.SearchOptions(k=20, offset=980).next_offset(more=True) is None  # MAX_DEPTH
    assert query.SearchOptions(k=20, offset=980).lookahead == 20


def test_paging_is_consistent_with_the_reranked_order(small):
    """αQE (and DBA) re-rank: pages are slices of that order, not of the raw one."""
    store, vectors = small
    q = vectors[21] * 0.9 + vectors[22] * 0.1
    whole = query.run(store, q, 45, expand=True)
    pages = [query.run(store, q, 15, expand=True, offset=o) for o in (0, 15, 30)]
    assert sum(pages, []) == whole
    plain = query.run(store, q, 45, expand=False)
    assert [i for i, _ in whole] != [i for i, _ in plain]  # the re-ranking did something


def test_filtered_and_paged_search_run_together(small):
    store, vectors = small
    where = (("category", "common"),)
    whole = query.run(store, vectors[0], 40, expand=False, where=where)
    assert len(whole) == 40
    md = store.metadata_of([i for i, _ in whole])
    assert all(md[i]["category"] == "common" for i, _ in whole)
    assert query.run(store, vectors[0], 20, expand=False, where=where, offset=20) == whole[20:]


# -- recall on a 20k-vector index -------------------------------------------------------


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    vectors = clustered_vectors(N + 30, DIM, seed=21)
    return vectors[:N], vectors[N:]


@pytest.fixture
def large(db_location, data):
    """20k vectors in an approximate index (SQLite from 5,000: the inverted file;
    PostgreSQL: HNSW), and the same index searched exactly."""
    vectors, _ = data
    store = fill(db_location, vectors)
    exact = open_store(db_location, exact=True)
    if store.kind == "sqlite":
        assert store.search_mode() == "ivf+rerank"
    yield store, exact
    store.close()
    exact.close()


def test_deep_pages_keep_their_recall(large, data):
    """A page at offset 90 comes from SQLite's inverted file with its lists and
    candidates grown with the depth (a fixed 100 candidates could not even hold the 100 results
    down to it); at offset 500 both stores are past what their approximate index serves
    and scan exactly. Measured against the exact search: the ranking down to the page,
    and the page itself (which a miss higher up shifts, so it is held less strictly
    where the search is approximate)."""
    store, exact = large
    _, queries = data
    for offset in (90, 500):
        approximate = store.kind == "sqlite" and store._preselects(offset + 10)
        assert approximate == (store.kind == "sqlite" and offset == 90)
        pages, rankings = [], []
        for q in queries:
            page = query.run(store, q, 10, expand=False, offset=offset)
            assert len(page) == 10
            pages.append(recall(page, query.run(exact, q, 10, expand=False, offset=offset)))
            rankings.append(recall(store.knn(q, offset + 10), exact.knn(q, offset + 10)))
        assert np.mean(rankings) >= 0.95, (offset, rankings)
        assert np.mean(pages) >= (0.75 if approximate else 0.95), (offset, pages)


def test_a_one_percent_filter_keeps_its_recall_and_fills_the_page(large, data):
    store, exact = large
    _, queries = data
    where = (("category", "rare"),)  # 200 of 20,000
    found = []
    for q in queries:
        got = store.knn(q, 20, where=where)
        truth = exact.knn(q, 20, where=where)
        assert len(got) == 20
        found.append(recall(got, truth))
    assert np.mean(found) >= 0.99, found


def test_a_broad_filter_goes_through_the_approximate_path(large, data, monkeypatch):
    """60% of the index matches: SQLite grows a pool of approximate candidates (here
    even for a narrower filter, with the exact-scan bound lowered), PostgreSQL scans
    HNSW iteratively."""
    store, exact = large
    _, queries = data
    monkeypatch.setattr(sqlite_store, "FILTER_SCAN_ROWS", 100)
    found = []
    for where in ((("category", "common"),), (("category", "rare"), ("shard", "1"))):
        for q in queries[:15]:
            got = store.knn(q, 10, where=where)
            truth = exact.knn(q, 10, where=where)
            assert len(got) == 10
            found.append(recall(got, truth))
    assert np.mean(found) >= 0.95, found
