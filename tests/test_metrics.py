"""Day two: ``GET /metrics`` in the Prometheus text format, read back with
prometheus_client's own parser, and one log line per request with its id.

The fake model stands in for a CNN: what is counted does not depend on the model.
"""

from __future__ import annotations

import json
import re
import uuid

import fake_model
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from support import LiveServer, assert_error, image_bytes

from imagefinder.config import Settings
from imagefinder.indexer import index_folder
from imagefinder.model.embedder import load_embedder
from imagefinder.server.app import create_app
from imagefinder.service import Service
from imagefinder.store import open_store

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
TOKEN = "metrics-test-token"
pytestmark = pytest.mark.sqlite_only


@pytest.fixture
def folder(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate(COLOURS):
        (photos / f"p{i}.jpg").write_bytes(image_bytes((64, 48), colour))
    return photos


@pytest.fixture
def indexed(tmp_path, folder):
    """The five photos indexed with the fake model; returns the index's path."""
    db = tmp_path / "index.db"
    store = open_store(str(db))
    index_folder(folder, store, load_embedder(fake_model.NAME))
    store.close()
    return db


def client_for(db, **settings) -> TestClient:
    service = Service(Settings(db=str(db), **settings))
    # A model of its own, so its batch counts are this test's alone.
    service.embedder = load_embedder(fake_model.NAME)
    return TestClient(create_app(service=service), raise_server_exceptions=False)


def scrape(client: TestClient, **headers) -> dict:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def sample(families: dict, metric: str, **labels) -> float:
    """The value of the one sample of ``metric`` with exactly these labels (0 if none)."""
    family = families[re.sub(r"_(total|count|sum|bucket)$", "", metric)]
    found = [s.value for s in family.samples if s.name == metric and s.labels == labels]
    assert len(found) <= 1
    return found[0] if found else 0.0


def search(client: TestClient, data: bytes, **headers):
    return client.post(
        "/similarity-search", files={"file": ("q.jpg", data, "image/jpeg")}, headers=headers
    )


def test_metrics_count_requests_refusals_batches_and_the_index(indexed, folder):
    with client_for(indexed, metrics="public") as client:
        for _ in range(3):
            assert search(client, (folder / "p1.jpg").read_bytes()).status_code == 200
        assert search(client, b"<html>not an image</html>").status_code == 400
        assert search(client, b"").status_code == 400
        assert client.get("/health").status_code == 200
        assert client.get("/images/p2/similar").status_code == 200
        assert client.get("/no/such/route").status_code == 404
        families = scrape(client)

    requests_total = "imagefinder_http_requests_total"
    post = {"method": "POST", "route": "/similarity-search"}
    assert sample(families, requests_total, **post, status="200") == 3
    assert sample(families, requests_total, **post, status="400") == 2
    assert sample(families, requests_total, method="GET", route="/health", status="200") == 1
    similar = {"method": "GET", "route": "/images/{image_id}/similar", "status": "200"}
    assert sample(families, requests_total, **similar) == 1
    assert sample(families, requests_total, method="GET", route="unmatched", status="404") == 1

    latency = "imagefinder_http_request_duration_seconds"
    assert sample(families, latency + "_count", **post, status="200") == 3
    assert sample(families, latency + "_sum", **post, status="200") > 0
    buckets = [s for s in families[latency].samples if s.name == latency + "_bucket"]
    assert {s.labels["le"] for s in buckets} >= {"0.1", "1.0", "+Inf"}

    refusals = "imagefinder_decode_refusals_total"
    assert sample(families, refusals, reason="not_an_image") == 1
    assert sample(families, refusals, reason="empty_upload") == 1
    assert sample(families, refusals, reason="too_many_pixels") == 0  # listed, at zero

    # Three uploads were embedded, one image per forward; /similar reads a stored vector.
    sizes = "imagefinder_inference_batch_size"
    assert sample(families, sizes + "_count") == 3
    assert sample(families, sizes + "_sum") == 3
    assert sample(families, sizes + "_bucket", le="1.0") == 3
    assert sample(families, "imagefinder_inference_queue_depth") == 0
    assert sample(families, "imagefinder_model_loaded", name="default") == 1
    index = {"name": "default", "index": str(indexed), "model": fake_model.NAME}
    assert sample(families, "imagefinder_index_vectors", **index) == len(COLOURS)


def test_labels_stay_bounded_whatever_clients_send(indexed):
    with client_for(indexed, metrics="public") as client:
        for i in range(20):
            client.get(f"/random/{uuid.uuid4().hex}/{i}")
            client.request("BREW", f"/pot/{i}")
        families = scrape(client)
    series = {
        tuple(sorted(s.labels.items()))
        for s in families["imagefinder_http_requests"].samples
        if s.name == "imagefinder_http_requests_total"
    }
    routes = {dict(labels)["route"] for labels in series}
    methods = {dict(labels)["method"] for labels in series}
    assert routes <= {"unmatched", "/metrics"}
    assert methods <= {"GET", "other"}


def test_metrics_are_behind_the_token_unless_public(indexed):
    with client_for(indexed) as client:  # the default: "token", and no token set
        error = assert_error(client.get("/metrics"), 403, "metrics_disabled")
        assert "IMAGEFINDER_API_TOKEN" in error["message"]
        assert "IMAGEFINDER_METRICS=public" in error["message"]
    with client_for(indexed, api_token=TOKEN) as client:
        assert_error(client.get("/metrics"), 401, "unauthorized")
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, "unauthorized")
        families = scrape(client, Authorization=f"Bearer {TOKEN}")
        assert "imagefinder_http_requests" in families
    with client_for(indexed, api_token=TOKEN, metrics="off") as client:
        assert_error(client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}), 404)
    with client_for(indexed, metrics="public") as client:
        assert "imagefinder_index_vectors" in scrape(client)


def test_every_answer_carries_a_request_id(indexed, folder):
    with client_for(indexed) as client:
        first = client.get("/health")
        second = client.get("/health")
        assert re.fullmatch(r"[0-9a-f]{32}", first.headers["X-Request-ID"])
        assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]
        # A proxy's id is kept; anything that could forge a log line is replaced.
        kept = client.get("/health", headers={"X-Request-ID": "lb-7f3a.42"})
        assert kept.headers["X-Request-ID"] == "lb-7f3a.42"
        forged = client.get("/health", headers={"X-Request-ID": "x INFO: forged"})
        assert re.fullmatch(r"[0-9a-f]{32}", forged.headers["X-Request-ID"])
        assert "X-Request-ID" in search(client, b"nope").headers  # errors too


def test_an_unexpected_error_is_a_500_with_its_request_id(indexed, caplog):
    with client_for(indexed, metrics="public") as client:

        def boom() -> None:
            raise RuntimeError("a bug")

        client.app.add_api_route("/boom", boom)
        response = client.get("/boom", headers={"X-Request-ID": "bug-report-1"})
        assert_error(response, 500, "internal_error")
        assert response.headers["X-Request-ID"] == "bug-report-1"
        families = scrape(client)
    requests_total = "imagefinder_http_requests_total"
    assert sample(families, requests_total, method="GET", route="/boom", status="500") == 1
    traceback = [r for r in caplog.records if r.exc_info and "unexpected error" in r.message]
    assert traceback and traceback[0].request_id == "bug-report-1"


def served_lines(log_path) -> list[str]:
    return [line for line in log_path.read_text().splitlines() if "route=" in line]


def test_one_log_line_per_request_with_its_id(indexed, folder, tmp_path):
    log = tmp_path / "server.log"
    env = {"IMAGEFINDER_DB": str(indexed), "IMAGEFINDER_METRICS": "public"}
    with LiveServer(env, fake_model=True, log=log) as server:
        ok = search_live(server, (folder / "p0.jpg").read_bytes())
        bad = search_live(server, b"not an image")
        server.stop()
    lines = [line for line in log.read_text().splitlines() if "/similarity-search" in line]
    assert len(lines) == 2, log.read_text()
    for response, line in zip((ok, bad), lines, strict=True):
        status = response.status_code
        assert line.startswith(f'INFO:     "POST /similarity-search" {status} ')
        assert re.search(r" \d+\.\dms route=/similarity-search client=127\.0\.0\.1:\d+", line)
        assert line.endswith(f" id={response.headers['X-Request-ID']}")
    assert " code=not_an_image " in lines[1]
    # uvicorn's own access line gives way to this one.
    assert "HTTP/1.1" not in log.read_text()


def test_json_logs(indexed, folder, tmp_path):
    log = tmp_path / "server.log"
    env = {"IMAGEFINDER_DB": str(indexed), "IMAGEFINDER_LOG_FORMAT": "json"}
    with LiveServer(env, fake_model=True, log=log) as server:
        response = search_live(server, (folder / "p3.jpg").read_bytes(), rid="trace-123")
        server.stop()
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert len(records) == len(log.read_text().splitlines()), "every line is JSON"
    (search_record,) = [r for r in records if r.get("route") == "/similarity-search"]
    assert response.headers["X-Request-ID"] == "trace-123"
    assert search_record["request_id"] == "trace-123"
    assert search_record["method"] == "POST" and search_record["status"] == 200
    assert search_record["duration_ms"] > 0 and search_record["level"] == "info"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", search_record["time"])


def search_live(server: LiveServer, data: bytes, rid: str | None = None):
    import requests

    headers = {"X-Request-ID": rid} if rid else {}
    return requests.post(
        server.url + "/similarity-search",
        files={"file": ("q.jpg", data, "image/jpeg")},
        headers=headers,
        timeout=30,
    )
