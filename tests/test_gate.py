"""The gate: decoding and embedding run at most IMAGEFINDER_MAX_CONCURRENCY at a time,
IMAGEFINDER_MAX_QUEUE more wait, and anything beyond is a fast 503 ``busy`` with
``Retry-After``. /health never waits behind any of it.
"""

from __future__ import annotations

import threading
import time

import anyio
import pytest
import requests
from fastapi.testclient import TestClient
from support import LiveServer, assert_error, image_bytes

from imagefinder.config import Settings
from imagefinder.errors import Busy
from imagefinder.indexer import index_folder
from imagefinder.server.app import create_app
from imagefinder.server.gate import Gate
from imagefinder.service import Service
from imagefinder.store import open_store


def test_the_gate_admits_slots_plus_queue_and_refuses_the_rest():
    gate = Gate(slots=1, queue=1)
    release = threading.Event()
    started = threading.Event()

    def job() -> str:
        started.set()
        release.wait(10)
        return "done"

    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(gate.call(job)))
    first.start()
    assert started.wait(5)
    second = threading.Thread(target=lambda: results.append(gate.call(lambda: "queued")))
    second.start()
    while gate.admitted < 2:
        time.sleep(0.01)
    with pytest.raises(Busy) as refused:
        gate.call(lambda: "third")
    assert 1 <= refused.value.retry_after <= 60
    release.set()
    first.join(5)
    second.join(5)
    assert sorted(results) == ["done", "queued"]
    assert gate.admitted == 0
    assert gate.call(lambda: "again") == "again"  # places are given back
    gate.close()


@pytest.fixture
def indexed_settings(tmp_path, model):
    folder = tmp_path / "catalogue"
    folder.mkdir()
    for i in range(3):
        (folder / f"c{i}.jpg").write_bytes(image_bytes((64, 48), (60 * i, 90, 200)))
    store = open_store(tmp_path / "index.db")
    index_folder(folder, store, model)
    store.close()
    return Settings(db=str(tmp_path / "index.db"), images_dir=str(folder))


@pytest.mark.sqlite_only
def test_health_answers_while_the_request_thread_pool_is_full(indexed_settings, model):
    """Every worker thread of the shared pool is stuck in a slow request; /health still
    answers, from a thread of its own."""
    service = Service(indexed_settings)
    service.embedder = model
    stuck = threading.Event()
    release = threading.Event()
    original = service.search_id

    def slow_search_id(image_id: str, k: int):
        stuck.set()
        release.wait(30)
        return original(image_id, k)

    service.search_id = slow_search_id  # type: ignore[method-assign]
    with TestClient(create_app(service=service)) as client:

        def shrink_pool() -> None:
            anyio.to_thread.current_default_thread_limiter().total_tokens = 2

        client.portal.call(shrink_pool)
        blockers = [
            threading.Thread(target=client.get, args=("/images/c0/similar",)) for _ in range(2)
        ]
        for t in blockers:
            t.start()
        assert stuck.wait(10)
        time.sleep(0.2)  # both pool threads are taken now
        answered: list[int] = []
        probe = threading.Thread(target=lambda: answered.append(client.get("/health").status_code))
        probe.start()
        probe.join(10)
        still_blocked = probe.is_alive()
        release.set()
        for t in blockers:
            t.join(30)
        probe.join(10)
    service.close()
    assert not still_blocked, "/health waited for the request pool"
    assert answered == [200]


@pytest.mark.sqlite_only
def test_a_full_server_answers_busy_at_once_and_health_stays_up(indexed_settings, tmp_path):
    """One slot, one place in the queue: of four slow uploads at once, two are refused
    with 503 busy and Retry-After while the others are still decoding."""
    env = {
        "IMAGEFINDER_DB": indexed_settings.db,
        "IMAGEFINDER_IMAGES_DIR": indexed_settings.images_dir,
        "IMAGEFINDER_MAX_CONCURRENCY": "1",
        "IMAGEFINDER_MAX_QUEUE": "1",
    }
    # A 36 MP PNG: about a second of decoding each, in a few hundred KB.
    slow = image_bytes((6000, 6000), (10, 200, 30), fmt="PNG", compress_level=1)
    with LiveServer(env, fake_model=True, log=tmp_path / "server.log") as server:
        outcomes: list[tuple[float, int, dict]] = []
        lock = threading.Lock()
        start = time.monotonic()

        def upload() -> None:
            r = requests.post(
                server.url + "/similarity-search", files={"file": ("big.png", slow)}, timeout=120
            )
            with lock:
                outcomes.append((time.monotonic() - start, r.status_code, dict(r.headers)))
                if r.status_code == 503:
                    assert_error(r, 503, "busy")

        threads = [threading.Thread(target=upload) for _ in range(4)]
        for t in threads:
            t.start()
        while not outcomes:
            time.sleep(0.01)
        health = requests.get(server.url + "/health", timeout=10)
        for t in threads:
            t.join(120)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    statuses = sorted(code for _, code, _ in outcomes)
    assert statuses == [200, 200, 503, 503], outcomes
    refused = [(at, headers) for at, code, headers in outcomes if code == 503]
    served = [at for at, code, _ in outcomes if code == 200]
    assert max(at for at, _ in refused) < min(served)  # refused before any was served
    assert all(int(h["retry-after"]) >= 1 for _, h in refused)
