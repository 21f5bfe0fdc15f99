"""PostgreSQL end to end on the real Caltech photos: two extraction shards running at
once into one database (the ``caltech_index_pg`` fixture, with the tests' fake model),
then two API workers sharing that database answer every photo's neighbour query over
HTTP exactly as a brute-force search over the stored vectors does."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import fake_model
import numpy as np
import psycopg
import pytest
import requests
from support import LiveServer

from imagefinder.indexer import file_id, in_shard, scan
from imagefinder.store import open_store
from imagefinder.store.postgres import HNSW


def test_two_shards_at_once_index_every_image_exactly_once(caltech_index_pg, caltech_dir):
    for run in caltech_index_pg.runs:
        assert run.returncode == 0, run.stderr
    candidates, refused = scan(caltech_dir)
    assert refused == []
    expected = {file_id(c.path, caltech_dir.resolve()) for c in candidates}
    assert len(expected) == 500

    store = open_store(caltech_index_pg.url)
    assert set(store.file_states()) == expected
    assert store.count() == 500
    assert store.meta()["model"] == fake_model.NAME
    store.close()

    # Each process embedded exactly its own shard, so no image was embedded twice.
    indexed = [
        int(re.search(r"(\d+) indexed", run.stdout).group(1)) for run in caltech_index_pg.runs
    ]
    assert indexed == [sum(in_shard(i, (s, 2)) for i in expected) for s in range(2)]
    assert all(n > 0 for n in indexed)
    with psycopg.connect(caltech_index_pg.url) as conn:
        found = conn.execute("SELECT 1 FROM pg_indexes WHERE indexname = %s", (HNSW,))
        assert found.fetchone(), "the HNSW index is built once the shards are done"


def exact_neighbours(url: str, k: int) -> dict[str, list[tuple[str, float]]]:
    """Each image's ``k`` nearest others by brute force over its stored vectors, in
    float64 here in the test: what an exact search must answer."""
    store = open_store(url)
    try:
        rows = [(i, v) for chunk in store.iter_vectors() for i, _, v in chunk]
    finally:
        store.close()
    ids = [i for i, _ in rows]
    vectors = np.stack([v for _, v in rows]).astype(np.float64)
    squared = (vectors**2).sum(1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None] - 2 * vectors @ vectors.T, 0))
    np.fill_diagonal(distances, np.inf)
    out = {}
    for row, own in enumerate(ids):
        order = sorted(range(len(ids)), key=lambda j: (distances[row, j], ids[j]))[:k]
        out[own] = [(ids[j], float(distances[row, j])) for j in order]
    return out


def test_two_api_workers_on_one_database_answer_as_an_exact_search(caltech_index_pg, caltech_dir):
    """`uvicorn main:app --workers 2` on the PostgreSQL index, through its HNSW index:
    every photo's 3 neighbours (itself excluded), asked 4 at a time of whichever worker
    takes the request, are the ones an exact search over the stored vectors finds; and
    one uploaded photo per class finds itself first."""
    photos = sorted(caltech_dir.glob("*/*.jpg"))
    exact = exact_neighbours(caltech_index_pg.url, 3)
    env = {"IMAGEFINDER_DB": caltech_index_pg.url, "IMAGEFINDER_THREADS": "1"}
    with LiveServer(env, workers=2, fake_model=True) as server:
        health = requests.get(server.url + "/health", timeout=10).json()
        assert (health["status"], health["vectors"], health["model"]) == (
            "ok",
            500,
            fake_model.NAME,
        )

        def similar(path):
            own = f"{path.parent.name}/{path.stem}"
            response = requests.get(f"{server.url}/images/{own}/similar", timeout=60)
            assert response.status_code == 200, response.text
            return own, [(r["id"], r["distance"]) for r in response.json()["results"]]

        def upload(path):
            response = requests.post(
                server.url + "/similarity-search",
                files={"file": (path.name, path.read_bytes(), "image/jpeg")},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            return response.json()["results"][0]["id"]

        with ThreadPoolExecutor(4) as pool:
            found = list(pool.map(similar, photos))
            first_of_class = [
                min(d.glob("*.jpg")) for d in sorted(caltech_dir.iterdir()) if d.is_dir()
            ]
            assert len(first_of_class) == 25
            top = list(pool.map(upload, first_of_class))
    assert top == [f"{p.parent.name}/{p.stem}" for p in first_of_class]
    assert len(found) == 500
    for own, results in found:
        expected = exact[own]
        assert [d for _, d in results] == pytest.approx([d for _, d in expected], abs=1e-5), own
        # The same ids, in the same order; only a tie (equal in float32) may swap two.
        for (got, got_d), (want, want_d) in zip(results, expected, strict=True):
            assert got == want or got_d == pytest.approx(want_d, abs=1e-5), (own, results)
