"""KNN on large SQLite indexes: the inverted file re-ranked exactly (``ivf.py``).

Recall is measured against the store's own exact search, through the public ``knn``,
on 20k CNN-like vectors (a smaller dimension than ResNet's keeps the test fast; the
1M x 2048-d figures are in bench/bench_stores.py). Small thresholds stand in for the
production one where a test needs the switch to happen on a few thousand vectors.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from support import ROOT, clustered_vectors

from imagefinder.store import Item, ivf, kmeans
from imagefinder.store.sqlite import DEFAULT_CANDIDATES, DEFAULT_NPROBE, SQLiteStore

DIM = 256
N = 20_000
QUERIES = 60


def identity(dim: int = DIM) -> dict[str, str]:
    return {"model": "synthetic", "weights": "none", "dim": str(dim), "preprocessing": "none"}


def items(vectors: np.ndarray, start: int = 0, prefix: str = "img") -> list[Item]:
    return [
        Item(f"{prefix}{start + i}", f"/photos/{prefix}{start + i}.jpg", "0" * 64, 1, 1, v)
        for i, v in enumerate(vectors)
    ]


def ids(results: list[tuple[str, float]]) -> list[str]:
    return [i for i, _ in results]


def recall(fast: SQLiteStore, exact: SQLiteStore, queries: np.ndarray, k: int) -> float:
    hits = [len(set(ids(fast.knn(q, k))) & set(ids(exact.knn(q, k)))) / k for q in queries]
    return float(np.mean(hits))


def ivf_rowids(store: SQLiteStore) -> list[int]:
    return sorted(r[0] for r in store.conn.execute(f"SELECT rowid FROM {ivf.TABLE}"))


def image_rowids(store: SQLiteStore) -> list[int]:
    return sorted(r[0] for r in store.conn.execute("SELECT rowid FROM images"))


def list_sizes(store: SQLiteStore) -> dict[int, int]:
    """How many codes each list holds, counted in the codes table."""
    rows = store.conn.execute(f"SELECT list, count(*) FROM {ivf.TABLE} GROUP BY list")
    return {int(j): int(n) for j, n in rows}


def recorded_sizes(store: SQLiteStore) -> dict[int, int]:
    """The sizes the inverted file keeps for itself (to know when to split a list)."""
    rows = store.conn.execute(f"SELECT list, size FROM {ivf.LISTS} WHERE size > 0")
    return {int(j): int(n) for j, n in rows}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The index's vectors, 10% more added later, and queries: one draw, as they share
    the clusters."""
    vectors = clustered_vectors(N + N // 10 + QUERIES, DIM, seed=7)
    return vectors[:N], vectors[N : N + N // 10], vectors[N + N // 10 :]


@pytest.fixture(scope="module")
def large(tmp_path_factory, data) -> str:
    """20k vectors written as an extraction writes them, with the production threshold."""
    path = str(tmp_path_factory.mktemp("knn") / "large.db")
    store = SQLiteStore(path)
    store.ensure_schema(identity())
    vectors, _, _ = data
    store.begin_bulk(N)
    for start in range(0, N, 1000):
        store.upsert(items(vectors[start : start + 1000], start))
    store.end_bulk()
    store.close()
    return path


def test_a_large_index_searches_through_the_inverted_file(large):
    store = SQLiteStore(large)
    assert store.search_mode() == ivf.MODE_IVF
    assert SQLiteStore(large, exact=True).search_mode() == ivf.MODE_EXACT
    # Every vector is in exactly one list, and the kept sizes are the real ones.
    assert ivf_rowids(store) == image_rowids(store)
    assert recorded_sizes(store) == list_sizes(store)
    lists = store.conn.execute(f"SELECT count(*) FROM {ivf.CENTROIDS}").fetchone()[0]
    assert lists >= ivf.lists_for(N)


def test_hub_lists_are_split_at_build(tmp_path):
    """A probe costs the size of the lists it scans. With more classes than lists (as
    at 1M x 2048-d: 5,000 classes, 4,000 lists) plain k-means grows *hub* lists many
    times the mean, and nearly every query probes one; the build splits them."""
    n = 10_000
    vectors = clustered_vectors(n, 256, seed=3, per_class=10)  # 1,000 classes
    nlists = ivf.lists_for(n)
    sample = vectors[np.linspace(0, n - 1, ivf.SAMPLE_PER_LIST * nlists).astype(int)]
    centroids = kmeans.train(sample, nlists)
    plain = np.bincount(kmeans.nearest(vectors, centroids, (centroids**2).sum(axis=1)))
    assert plain.max() > 10 * n / nlists  # the data does grow hubs

    store = SQLiteStore(tmp_path / "hubs.db")
    store.ensure_schema(identity(256))
    store.begin_bulk(n)
    store.upsert(items(vectors))
    store.end_bulk()
    sizes = list_sizes(store)
    # (A split adds lists, so it lowers the mean the cap was checked against.)
    assert max(sizes.values()) <= (ivf.SPLIT_CAP + 1) * n / len(sizes)
    assert recorded_sizes(store) == sizes and sum(sizes.values()) == n
    # Vectors are filed under their nearest centroid, so probing the nearest list or
    # two finds a stored vector (a list split at the very end re-files only its
    # neighbourhood: a few vectors sit in their second-nearest list).
    for nprobe, share in ((1, 0.98), (2, 0.995), (ivf.lists_for(n), 1.0)):
        probe = SQLiteStore(store.path, nprobe=nprobe, ef_search=10)
        found = [ids(probe.knn(vectors[i], 1)) == [f"img{i}"] for i in range(0, n, 7)]
        assert np.mean(found) >= share, nprobe


def test_a_list_crowded_by_new_kinds_of_images_is_split(tmp_path, large, data):
    """Inserts of a kind of image the lists were not trained on all land in one or a
    few lists; past SPLIT_CAP times the mean such a list is split, in the same write,
    without retraining the others."""
    vectors, _, queries = data
    path = tmp_path / "crowded.db"
    SQLiteStore(large).conn.execute(f"VACUUM INTO '{path}'")
    store = SQLiteStore(path)
    trained = store.conn.execute(f"SELECT build, rows FROM {ivf.STATE}").fetchone()
    new_kind = clustered_vectors(2000, DIM, seed=99, per_class=400)  # 5 new classes
    new_kind = np.sqrt(new_kind)  # far from every trained centroid
    new_kind /= np.linalg.norm(new_kind, axis=1, keepdims=True)
    for start in range(0, len(new_kind), 250):
        store.upsert(items(new_kind[start : start + 250], start, prefix="new"))
    build, rows = store.conn.execute(f"SELECT build, rows FROM {ivf.STATE}").fetchone()
    assert rows == trained[1] and build != trained[0]  # split, not retrained
    sizes = list_sizes(store)
    assert max(sizes.values()) <= ivf.SPLIT_CAP * (N + len(new_kind)) / len(sizes) + 250
    assert recorded_sizes(store) == sizes
    assert ivf_rowids(store) == image_rowids(store)
    exact = SQLiteStore(path, exact=True)
    assert recall(store, exact, new_kind[::50], 10) >= 0.95
    assert recall(store, exact, queries, 10) >= 0.95


def test_recall_at_10_against_exact_search_on_20k_vectors(large, data):
    _, _, queries = data
    fast, exact = SQLiteStore(large), SQLiteStore(large, exact=True)
    assert recall(fast, exact, queries, 10) >= 0.95
    # Distances are the exact ones, not Hamming estimates, and nearest first.
    for q in queries[:10]:
        found = fast.knn(q, 10)
        assert [d for _, d in found] == sorted(d for _, d in found)
        exact_d = dict(exact.knn(q, 50))
        for image_id, distance in found:
            if image_id in exact_d:
                assert distance == pytest.approx(exact_d[image_id], abs=1e-5)


def test_a_deeper_page_probes_further_and_keeps_its_recall(large, data):
    """Asking for 100 scales the lists probed and the candidates re-ranked."""
    _, _, queries = data
    fast, exact = SQLiteStore(large, nprobe=2, ef_search=40), SQLiteStore(large, exact=True)
    assert recall(fast, exact, queries[:20], 100) >= 0.95


def test_exclude_leaves_out_the_query_itself(large, data):
    vectors, _, _ = data
    store = SQLiteStore(large)
    assert ids(store.knn(vectors[42], 3))[0] == "img42"
    found = store.knn(vectors[42], 3, exclude=["img42"])
    assert len(found) == 3 and "img42" not in ids(found)
    assert ids(found) == ids(SQLiteStore(large, exact=True).knn(vectors[42], 3, ["img42"]))


def test_recall_holds_after_adds_and_deletes_batch_by_batch(tmp_path, large, data):
    vectors, more, queries = data
    path = tmp_path / "grown.db"
    SQLiteStore(large).conn.execute(f"VACUUM INTO '{path}'")
    store = SQLiteStore(path)
    trained_at = store.conn.execute(f"SELECT rows FROM {ivf.STATE}").fetchone()
    for start in range(0, len(more), 250):  # 10% more, as extraction adds them
        store.upsert(items(more[start : start + 250], N + start))
    deleted = [f"img{i}" for i in range(0, N, 10)]  # and 10% gone
    for start in range(0, len(deleted), 500):
        store.delete(deleted[start : start + 500])
    assert store.count() == N + len(more) - len(deleted)
    # No retraining: the new vectors went into the lists they belong to.
    assert store.conn.execute(f"SELECT rows FROM {ivf.STATE}").fetchone() == trained_at
    assert ivf_rowids(store) == image_rowids(store)
    assert recorded_sizes(store) == list_sizes(store)
    exact = SQLiteStore(path, exact=True)
    assert recall(store, exact, queries, 10) >= 0.95
    # The added vectors are found, the deleted ones never are.
    assert ids(store.knn(more[5], 1)) == [f"img{N + 5}"]
    gone = set(deleted)
    assert not any(set(ids(store.knn(vectors[i], 10))) & gone for i in range(0, 500, 10))


def test_a_replaced_vector_moves_to_its_new_list(tmp_path, data):
    vectors, _, queries = data
    store = SQLiteStore(tmp_path / "index.db", fast_min_rows=1000)
    store.ensure_schema(identity())
    store.upsert(items(vectors[:1500]))
    assert store.search_mode() == ivf.MODE_IVF
    store.upsert([Item("img7", "/photos/img7.jpg", "1" * 64, 1, 2, queries[0])])
    assert store.knn(queries[0], 1) == [("img7", pytest.approx(0, abs=1e-6))]
    assert ivf_rowids(store) == image_rowids(store)  # one code per vector, none stale


def test_the_inverted_file_follows_the_index_size(tmp_path, data):
    vectors, _, queries = data
    store = SQLiteStore(tmp_path / "index.db", fast_min_rows=1000)
    store.ensure_schema(identity())
    store.upsert(items(vectors[:999]))
    assert store.search_mode() == ivf.MODE_EXACT
    store.upsert(items(vectors[999:1000], 999))
    assert store.search_mode() == ivf.MODE_IVF

    def state() -> tuple[str, int]:
        return store.conn.execute(f"SELECT build, rows FROM {ivf.STATE}").fetchone()

    first = state()
    assert first[1] == 1000
    # Doubling retrains, so the lists follow the catalogue.
    store.upsert(items(vectors[1000:2000], 1000))
    second = state()
    assert second[1] == 2000 and second[0] != first[0]
    assert store.conn.execute(f"SELECT count(*) FROM {ivf.CENTROIDS}").fetchone()[0] >= (
        ivf.lists_for(2000)
    )
    assert recorded_sizes(store) == list_sizes(store)
    # Dropped only below half the threshold, so an index near it does not flap.
    store.delete([f"img{i}" for i in range(1400)])
    assert store.search_mode() == ivf.MODE_IVF
    store.delete([f"img{i}" for i in range(1400, 1600)])
    assert store.search_mode() == ivf.MODE_EXACT
    assert store.knn(queries[0], 3) == SQLiteStore(store.path, exact=True).knn(queries[0], 3)


def test_a_bulk_load_builds_the_inverted_file_once_at_the_end(tmp_path, data):
    vectors, _, _ = data
    store = SQLiteStore(tmp_path / "index.db", fast_min_rows=1000)
    store.ensure_schema(identity())
    store.upsert(items(vectors[:1000]))
    assert store.search_mode() == ivf.MODE_IVF
    store.begin_bulk(3000)  # will more than double: dropped, searches exact meanwhile
    assert store.search_mode() == ivf.MODE_EXACT
    for start in range(1000, 4000, 500):
        store.upsert(items(vectors[start : start + 500], start))
        assert store.search_mode() == ivf.MODE_EXACT
    store.end_bulk()
    assert store.conn.execute(f"SELECT rows FROM {ivf.STATE}").fetchone()[0] == 4000
    # A bulk run that died before end_bulk: the next ordinary write builds it.
    store.begin_bulk(10_000)
    assert store.search_mode() == ivf.MODE_EXACT
    after_crash = SQLiteStore(store.path, fast_min_rows=1000)
    after_crash.upsert(items(vectors[4000:4010], 4000))
    assert after_crash.search_mode() == ivf.MODE_IVF


def test_a_reader_sees_a_rebuild_made_by_another_process(tmp_path, data):
    """Readers cache the centroids by build id: a rebuild elsewhere is picked up."""
    vectors, _, queries = data
    path = tmp_path / "index.db"
    writer = SQLiteStore(path, fast_min_rows=1000)
    writer.ensure_schema(identity())
    writer.upsert(items(vectors[:1000]))
    reader = SQLiteStore(path, nprobe=10_000)  # every list: exact answers if consistent
    exact = SQLiteStore(path, exact=True)
    assert reader.knn(queries[0], 5) == exact.knn(queries[0], 5)
    writer.upsert(items(vectors[1000:2500], 1000))  # doubled: new lists, new build id
    for q in queries[:5]:
        assert reader.knn(q, 5) == exact.knn(q, 5)


def test_a_version_2_index_is_migrated_to_the_inverted_file(tmp_path, data):
    vectors, _, queries = data
    path = tmp_path / "old.db"
    old = SQLiteStore(path, fast_min_rows=10**9)
    old.ensure_schema(identity())
    old.upsert(items(vectors[: ivf.MIN_ROWS]))
    # As version 2 left it: its Hamming table, no inverted file.
    conn = old.conn
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.execute(f"CREATE VIRTUAL TABLE vec_coarse USING vec0(embedding bit[{DIM}])")
    conn.execute("CREATE TABLE coarse_centre (id INTEGER PRIMARY KEY, vector BLOB, rows INT)")
    old.close()

    store = SQLiteStore(path)
    assert store.meta()["schema_version"] == str(SQLiteStore.schema_version())
    tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")}
    assert not {"vec_coarse", "coarse_centre"} & tables
    assert store.search_mode() == ivf.MODE_IVF
    assert ids(store.knn(vectors[3], 1)) == ["img3"]


def test_a_new_process_uses_the_inverted_file(large, data):
    vectors, _, _ = data
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
    assert answer["mode"] == ivf.MODE_IVF
    assert answer["ids"] == ids(SQLiteStore(large, exact=True).knn(vectors[5], 3))


def test_the_search_effort_is_configured_from_the_environment(tmp_path):
    from imagefinder.config import Settings
    from imagefinder.errors import ConfigError
    from imagefinder.store import open_store

    settings = Settings.from_env({"IMAGEFINDER_NPROBE": "3", "IMAGEFINDER_EF_SEARCH": "50"})
    store = open_store(str(tmp_path / "i.db"), ef_search=settings.ef_search, nprobe=settings.nprobe)
    assert isinstance(store, SQLiteStore) and (store.nprobe, store.ef_search) == (3, 50)
    defaults = open_store(str(tmp_path / "i.db"))
    assert isinstance(defaults, SQLiteStore)
    assert (defaults.nprobe, defaults.ef_search) == (DEFAULT_NPROBE, DEFAULT_CANDIDATES)
    for name in ("IMAGEFINDER_NPROBE", "IMAGEFINDER_EF_SEARCH"):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: "0"})


def test_an_id_twice_in_one_batch_keeps_its_last_vector(tmp_path, data):
    vectors, _, queries = data
    store = SQLiteStore(tmp_path / "index.db", fast_min_rows=1000)
    store.ensure_schema(identity())
    store.upsert(items(vectors[:1000]))
    twice = [
        Item("new", "/a", "0" * 64, 1, 1, queries[0]),
        Item("new", "/b", "1" * 64, 1, 1, queries[1]),
    ]
    store.upsert([*twice, Item("img3", "/c", "2" * 64, 1, 1, queries[2]), twice[1]])
    assert store.knn(queries[1], 1) == [("new", pytest.approx(0, abs=1e-6))]
    assert store.knn(queries[2], 1) == [("img3", pytest.approx(0, abs=1e-6))]
    assert ivf_rowids(store) == image_rowids(store)


def test_warming_reads_the_inverted_file(tmp_path, large):
    """What a server reads at start-up: every code (and the centroids), nothing
    without an inverted file, and no file created for a path that has none."""
    assert SQLiteStore(large).warm() >= N * DIM  # one int8 byte per dimension
    small = SQLiteStore(tmp_path / "small.db")
    small.ensure_schema(identity())
    small.upsert(items(clustered_vectors(10, DIM)))
    assert small.warm() == 0
    assert SQLiteStore(tmp_path / "none.db").warm() == 0
    assert not (tmp_path / "none.db").exists()


def test_a_server_warms_its_index_in_the_background(large, caplog):
    import time

    from fastapi.testclient import TestClient

    from imagefinder.config import Settings
    from imagefinder.server.app import create_app

    caplog.set_level(logging.INFO, logger="imagefinder")
    with TestClient(create_app(Settings(db=large))) as client:
        assert client.get("/health").status_code == 200  # answered at once
        deadline = time.monotonic() + 30
        while "warm:" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "index 'default' warm:" in caplog.text
