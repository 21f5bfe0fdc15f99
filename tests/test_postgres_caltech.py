"""PostgreSQL end to end on the real Caltech photos: two extraction shards running at
once into one database (the ``caltech_index_pg`` fixture), then two API workers
sharing that database answer the leave-one-out quality check over HTTP."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psycopg
import pytest
import requests
from support import LiveServer

from imagefinder.indexer import file_id, in_shard, scan
from imagefinder.store import open_store
from imagefinder.store.postgres import HNSW

pytestmark = pytest.mark.slow


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
    assert store.meta()["model"] == "efficientnet-lite0"
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


def test_two_api_workers_on_one_database_find_the_same_class(caltech_index_pg, caltech_dir):
    """`uvicorn main:app --workers 2` on the PostgreSQL index: leave-one-out precision@3
    over all 500 photos (each asks for its own neighbours, itself excluded), and one
    uploaded photo per class finds itself first."""
    photos = sorted(caltech_dir.glob("*/*.jpg"))
    env = {"IMAGEFINDER_DB": caltech_index_pg.url, "IMAGEFINDER_THREADS": "1"}
    with LiveServer(env, workers=2) as server:
        health = requests.get(server.url + "/health", timeout=10).json()
        assert (health["status"], health["vectors"], health["model"]) == (
            "ok",
            500,
            "efficientnet-lite0",
        )

        def similar(path):
            own = f"{path.parent.name}/{path.stem}"
            response = requests.get(f"{server.url}/images/{own}/similar", timeout=60)
            assert response.status_code == 200, response.text
            ids = [r["id"] for r in response.json()["results"]]
            assert len(ids) == 3 and own not in ids
            return ids

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
    precision = np.mean(
        [
            np.mean([n.split("/")[0] == path.parent.name for n in ids])
            for path, ids in zip(photos, found, strict=True)
        ]
    )
    assert precision >= 0.80, f"precision@3 = {precision:.3f}"
