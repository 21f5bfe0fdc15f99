"""PostgreSQL end to end on the real Caltech photos: two extraction shards running at
once into one database (the ``caltech_index_pg`` fixture, with the tests' fake model),
then two API workers sharing that database answer every photo's neighbour query over
HTTP exactly as an in-process search that scans every vector does."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import fake_model
import psycopg
import pytest
import requests
from support import LiveServer

from imagefinder.config import Settings
from imagefinder.indexer import file_id, in_shard, scan
from imagefinder.query import SearchOptions
from imagefinder.service import Service
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


def exact_answers(url: str, ids: list[str], k: int) -> dict[str, list[tuple[str, float]]]:
    """Each image's ``k`` similar images as the service answers in-process when told to
    scan every vector (``exact``) instead of asking the HNSW index for candidates; the
    server's other defaults (DBA, αQE) alike."""
    service = Service(Settings(db=url, exact=True))
    try:
        return {own: service.search_id(own, SearchOptions(k=k)).results for own in ids}
    finally:
        service.close()


def test_two_api_workers_on_one_database_answer_as_an_exact_search(caltech_index_pg, caltech_dir):
    """`uvicorn main:app --workers 2` on the PostgreSQL index, through its HNSW index:
    every photo's 3 similar images (itself excluded), asked 4 at a time of whichever
    worker takes the request, are the ones an exact in-process search finds, in the same
    order; and one uploaded photo per class finds itself first."""
    photos = sorted(caltech_dir.glob("*/*.jpg"))
    exact = exact_answers(caltech_index_pg.url, [f"{p.parent.name}/{p.stem}" for p in photos], 3)
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
        assert [i for i, _ in results] == [i for i, _ in exact[own]], own
        assert [d for _, d in results] == pytest.approx([d for _, d in exact[own]], abs=1e-5)
