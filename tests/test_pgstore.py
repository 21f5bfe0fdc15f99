"""What only the PostgreSQL store has: an HNSW index (rebuilt around bulk loads),
ef_search and exact search, a connection pool, errors that name the server.
The behaviour both stores share is in test_store_contract.py."""

from __future__ import annotations

import threading

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient

from imagefinder.config import Settings
from imagefinder.errors import ConfigError, StoreError
from imagefinder.server.app import create_app
from imagefinder.service import Service
from imagefinder.store import Item, display_location, open_store
from imagefinder.store.postgres import HNSW, PGStore


def identity(dim: int) -> dict[str, str]:
    return {"model": "toy", "weights": "w", "dim": str(dim), "preprocessing": "p"}


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def fill(store, vectors: np.ndarray) -> None:
    store.ensure_schema(identity(vectors.shape[1]))
    store.begin_bulk(len(vectors))
    store.upsert(Item(f"v{i:04d}", f"/p/{i}", "h", 1, 1, v) for i, v in enumerate(vectors))
    store.end_bulk()


def index_definition(url: str) -> str | None:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (HNSW,))
        found = row.fetchone()
    return found[0] if found else None


def plan(store: PGStore, query: np.ndarray, fetch: int = 3) -> str:
    """EXPLAIN of exactly what knn runs."""
    setup, sql, params = store.search_statements(query, fetch)
    with store._tx() as conn:
        for statement in setup:
            conn.execute(statement)
        return "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, params))


def test_open_store_dispatches_on_the_location(tmp_path, pg_url):
    assert open_store(pg_url).kind == "postgres"
    assert open_store(tmp_path / "index.db").kind == "sqlite"


@pytest.mark.parametrize(("dim", "opclass"), [(1280, "vector_l2_ops"), (2048, "halfvec_l2_ops")])
def test_searches_go_through_the_hnsw_index(pg_url, dim, opclass):
    """pgvector indexes at most 2000 dimensions of ``vector``: resnet50's 2048 are
    indexed as halfvec, and the candidates re-ranked by their exact float32 distance."""
    store = PGStore(pg_url)
    vectors = unit_vectors(300, dim)
    fill(store, vectors)
    assert opclass in index_definition(pg_url)
    assert f"Index Scan using {HNSW}" in plan(store, vectors[0])
    dist = np.sqrt(((vectors - vectors[42]) ** 2).sum(axis=1))
    got = store.knn(vectors[42], 5)
    assert got[0] == ("v0042", pytest.approx(0.0, abs=1e-6))
    for image_id, distance in got:
        assert distance == pytest.approx(float(dist[int(image_id[1:])]), abs=1e-5)
    store.close()


def test_exact_mode_scans_every_row_without_the_index(pg_url):
    vectors = unit_vectors(300, 64)
    fill(PGStore(pg_url), vectors)
    exact = PGStore(pg_url, exact=True)
    assert HNSW not in plan(exact, vectors[0])
    dist = np.sqrt(((vectors - vectors[7]) ** 2).sum(axis=1))
    assert [i for i, _ in exact.knn(vectors[7], 10)] == [
        f"v{i:04d}" for i in np.argsort(dist, kind="stable")[:10]
    ]


def test_a_small_ef_search_still_returns_k_results(pg_url):
    # An HNSW scan stops at ef_search rows; knn raises it to k for the query.
    store = PGStore(pg_url, ef_search=5)
    vectors = unit_vectors(400, 32)
    fill(store, vectors)
    setup, _, _ = store.search_statements(vectors[0], 50)
    assert "SET LOCAL hnsw.ef_search = 50" in setup
    assert len(store.knn(vectors[0], 50)) == 50
    assert len(store.knn(vectors[0], 3)) == 3


def test_settings_choose_ef_search_and_exact(pg_url):
    env = {"IMAGEFINDER_DB": pg_url, "IMAGEFINDER_EF_SEARCH": "77", "IMAGEFINDER_EXACT": "1"}
    settings = Settings.from_env(env)
    assert (settings.ef_search, settings.exact) == (77, True)
    assert Settings.from_env({"IMAGEFINDER_EXACT": "off"}).exact is False
    with pytest.raises(ConfigError, match="IMAGEFINDER_EXACT"):
        Settings.from_env({"IMAGEFINDER_EXACT": "sometimes"})
    service = Service(settings)
    assert (service.store.ef_search, service.store.exact) == (77, True)


def test_a_big_load_drops_the_index_and_builds_it_once_at_the_end(pg_url):
    store = PGStore(pg_url)
    store.bulk_min = 100
    store.ensure_schema(identity(16))
    store.upsert(Item(f"a{i}", "/p", "h", 1, 1, v) for i, v in enumerate(unit_vectors(50, 16)))
    assert index_definition(pg_url) is not None

    store.begin_bulk(20)  # small next to the table: the index stays
    assert index_definition(pg_url) is not None
    store.begin_bulk(500)  # a big load: dropped, and searches still answer meanwhile
    assert index_definition(pg_url) is None
    vectors = unit_vectors(500, 16, seed=1)
    store.upsert(Item(f"b{i}", "/p", "h", 1, 1, v) for i, v in enumerate(vectors))
    assert store.knn(vectors[3], 1)[0][0] == "b3"
    store.end_bulk()
    assert index_definition(pg_url) is not None
    assert store.knn(vectors[3], 1)[0][0] == "b3"
    store.end_bulk()  # nothing to rebuild: a no-op


def test_concurrent_schema_creation_is_race_free(pg_url):
    """Shards starting at once each call ensure_schema on an empty database."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def create():
        store = PGStore(pg_url)
        try:
            barrier.wait()
            store.ensure_schema(identity(8))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            store.close()

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM imagefinder_meta").fetchone()[0] == len(
            PGStore(pg_url).meta()
        )


def test_the_row_count_stays_exact_under_concurrent_writers(pg_url):
    """count() is kept in a row of its own (count(*) scans the table); writers that
    insert the same ids at once must not count them twice."""
    store = PGStore(pg_url)
    store.ensure_schema(identity(8))
    vectors = unit_vectors(60, 8)

    def write(n: int) -> None:
        shared = [Item(f"shared{i:02d}", "/p", "h", 1, 1, vectors[i]) for i in range(30)]
        own = [Item(f"own{n}_{i:02d}", "/p", "h", 1, 1, vectors[30 + i]) for i in range(30)]
        for lo in range(0, 30, 10):
            store.upsert(shared[lo : lo + 10] + own[lo : lo + 10])

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count() == 30 + 4 * 30
    assert store.delete([f"shared{i:02d}" for i in range(30)] + ["never"]) == 30
    with psycopg.connect(pg_url) as conn:
        real = conn.execute("SELECT count(*) FROM imagefinder_images").fetchone()[0]
    assert store.count() == real == 4 * 30
    store.close()


def test_a_user_who_may_not_create_pgvector_is_told_who_can(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'finder'").fetchone()
        if not exists:
            conn.execute("CREATE ROLE finder LOGIN")
    url = pg_url.replace("postgres:@", "finder:@")
    with pytest.raises(StoreError, match=r"ask an administrator to run: CREATE EXTENSION vector"):
        PGStore(url).ensure_schema(identity(8))


def test_an_unreachable_server_is_a_one_line_store_error(pg_server):
    url = pg_server.get_uri("no_such_database")
    store = open_store(url)
    with pytest.raises(StoreError, match="no_such_database") as info:
        store.meta()
    assert "\n" not in str(info.value)


def test_the_api_answers_503_not_500_when_the_database_is_gone(pg_server):
    settings = Settings(db=pg_server.get_uri("no_such_database"))
    with TestClient(create_app(settings)) as client:
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "error"
        search = client.post("/similarity-search", files={"file": ("a.jpg", b"x")})
        assert search.status_code == 503
        assert search.json()["error"]["code"] == "index_unusable"


def test_passwords_never_leave_in_locations():
    url = "postgresql://finder:s3cret@db.internal:5432/images"
    assert display_location(url) == "postgresql://finder:***@db.internal:5432/images"
    assert "s3cret" not in PGStore(url).location
    assert display_location("/data/index.db") == "/data/index.db"
