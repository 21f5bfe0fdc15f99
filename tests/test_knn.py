"""KNN on large SQLite indexes: the binary pre-selection re-ranked exactly (``coarse.py``).

Small thresholds stand in for the production one (``coarse.MIN_ROWS``) so the switch
happens on a few thousand vectors; everything else is the real store on real files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from support import ROOT, clustered_vectors

from imagefinder.store import Item, coarse
from imagefinder.store.sqlite import SQLiteStore

DIM = 1280  # efficientnet-lite0's
N = 3000
QUERIES = 150


def identity(dim: int = DIM) -> dict[str, str]:
    return {"model": "synthetic", "weights": "none", "dim": str(dim), "preprocessing": "none"}


def items(vectors: np.ndarray, start: int = 0, prefix: str = "img") -> list[Item]:
    return [
        Item(f"{prefix}{start + i}", f"/photos/{prefix}{start + i}.jpg", "0" * 64, 1, 1, v)
        for i, v in enumerate(vectors)
    ]


def ids(results: list[tuple[str, float]]) -> list[str]:
    return [i for i, _ in results]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    vectors = clustered_vectors(N + QUERIES, DIM, seed=7)
    return vectors[:N], vectors[N:]


@pytest.fixture(scope="module")
def large(tmp_path_factory, data) -> str:
    """An index of N vectors that crossed a threshold of 1000 while it was filled."""
    path = str(tmp_path_factory.mktemp("knn") / "large.db")
    store = SQLiteStore(path, fast_min_rows=1000)
    store.ensure_schema(identity())
    vectors, _ = data
    for start in range(0, N, 500):
        store.upsert(items(vectors[start : start + 500], start))
    store.close()
    return path


def test_large_index_searches_through_the_coarse_table(large):
    assert SQLiteStore(large).search_mode() == coarse.MODE_BINARY
    assert SQLiteStore(large, exact=True).search_mode() == coarse.MODE_EXACT


def test_fast_search_finds_what_exact_search_finds(large, data):
    _, queries = data
    fast, exact = SQLiteStore(large), SQLiteStore(large, exact=True)
    recalls = []
    for q in queries:
        truth = exact.knn(q, 3)
        found = fast.knn(q, 3)
        recalls.append(len(set(ids(truth)) & set(ids(found))) / 3)
        # Re-ranked distances are the exact ones, not Hamming estimates.
        exact_d = dict(exact.knn(q, 50))
        for image_id, distance in found:
            if image_id in exact_d:
                assert distance == pytest.approx(exact_d[image_id], abs=1e-5)
    assert np.mean(recalls) >= 0.99


def test_signs_are_taken_about_the_median(large, data):
    """Raw signs of positive features are all ones: every code would be the same."""
    vectors, _ = data
    assert (vectors > 0).all()
    store = SQLiteStore(large)
    blob, built_at = store.conn.execute(f"SELECT vector, rows FROM {coarse.CENTRE}").fetchone()
    # The per-dimension median of the vectors there were at the last (re)build.
    np.testing.assert_allclose(
        np.frombuffer(blob, np.float32), np.median(vectors[:built_at], axis=0), atol=1e-6
    )
    codes = store.conn.execute(f"SELECT embedding FROM {coarse.TABLE} LIMIT 200").fetchall()
    ones = np.unpackbits(np.frombuffer(b"".join(c[0] for c in codes), np.uint8)).mean()
    assert 0.45 < ones < 0.55


def test_exclude_leaves_out_the_query_itself(large, data):
    vectors, _ = data
    store = SQLiteStore(large)
    assert ids(store.knn(vectors[42], 3))[0] == "img42"
    found = store.knn(vectors[42], 3, exclude=["img42"])
    assert len(found) == 3
    assert "img42" not in ids(found)
    assert ids(found) == ids(SQLiteStore(large, exact=True).knn(vectors[42], 3, ["img42"]))


def test_deletes_and_replacements_reach_the_coarse_table(tmp_path, data):
    vectors, queries = data
    store = SQLiteStore(tmp_path / "index.db", fast_min_rows=1000)
    store.ensure_schema(identity())
    store.upsert(items(vectors[:1500]))
    assert store.search_mode() == coarse.MODE_BINARY
    target = queries[0]
    nearest = ids(store.knn(target, 1))[0]

    store.delete([nearest])
    assert nearest not in ids(store.knn(target, 3))

    # Replace another id's vector with the query itself: it must now come first, at 0.
    store.upsert([Item("img7", "/photos/img7.jpg", "1" * 64, 1, 2, target)])
    first_id, first_distance = store.knn(target, 1)[0]
    assert (first_id, first_distance) == ("img7", pytest.approx(0, abs=1e-6))
    # One code per vector, no stale ones left behind.
    coarse_rows = store.conn.execute(f"SELECT count(*) FROM {coarse.TABLE}").fetchone()[0]
    assert coarse_rows == store.count() == 1499


def test_threshold_switches_both_ways(tmp_path, data):
    vectors, queries = data
    store = SQLiteStore(tmp_path / "index.db", fast_min_rows=1000)
    store.ensure_schema(identity())
    store.upsert(items(vectors[:999]))
    assert store.search_mode() == coarse.MODE_EXACT
    store.upsert(items(vectors[999:1000], 999))
    assert store.search_mode() == coarse.MODE_BINARY
    built = store.conn.execute(f"SELECT rows FROM {coarse.CENTRE}").fetchone()[0]
    assert built == 1000

    # Doubling rebuilds, so the centre follows the catalogue.
    store.upsert(items(vectors[1000:2000], 1000))
    rebuilt = store.conn.execute(f"SELECT rows FROM {coarse.CENTRE}").fetchone()[0]
    assert rebuilt == 2000

    # Dropped only below half the threshold, so an index near it does not flap.
    store.delete([f"img{i}" for i in range(1400)])
    assert store.count() == 600
    assert store.search_mode() == coarse.MODE_BINARY
    store.delete([f"img{i}" for i in range(1400, 1600)])
    assert store.search_mode() == coarse.MODE_EXACT
    remaining = SQLiteStore(store.path, exact=True)
    assert store.knn(queries[0], 3) == remaining.knn(queries[0], 3)


def test_an_existing_index_gets_the_coarse_table_on_its_next_extraction(tmp_path, data):
    vectors, _ = data
    path = tmp_path / "index.db"
    old = SQLiteStore(path, fast_min_rows=10**9)  # as if built before the coarse table
    old.ensure_schema(identity())
    old.upsert(items(vectors[:1200]))
    assert old.search_mode() == coarse.MODE_EXACT
    store = SQLiteStore(path, fast_min_rows=1000)
    store.begin_bulk(0)
    store.end_bulk()
    assert store.search_mode() == coarse.MODE_BINARY


def test_a_new_process_uses_the_coarse_table(large, data):
    vectors, _ = data
    script = textwrap.dedent(
        f"""
        import json, numpy as np
        from imagefinder.store import open_store
        store = open_store({large!r})
        q = np.frombuffer(bytes.fromhex({vectors[5].tobytes().hex()!r}), dtype=np.float32)
        print(json.dumps({{"mode": store.search_mode(), "ids": [i for i, _ in store.knn(q, 3)]}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    answer = json.loads(out.stdout)
    assert answer["mode"] == coarse.MODE_BINARY
    assert answer["ids"] == ids(SQLiteStore(large, exact=True).knn(vectors[5], 3))
