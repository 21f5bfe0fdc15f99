"""Ingestion jobs over the API: POST /jobs (a CSV or files), GET /jobs/{id}, GET /jobs,
DELETE /jobs/{id}, behind the bearer token, bounded, and surviving a killed server.

Real parts: the app in-process with its lifespan (so its job runner and decoder
processes run), a SQLite index and a catalogue folder in tmp dirs, a real HTTP server
for the CSV's images; the restart test runs `uvicorn main:app` in a subprocess and kills
it. The model is the tests' fake (not the point here).
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import fake_model
import psutil
import pytest
import requests
from fastapi.testclient import TestClient
from file_server import FileServer
from support import LiveServer, assert_error, image_bytes

from imagefinder.config import Settings
from imagefinder.server.app import create_app
from imagefinder.service import Service
from imagefinder.store import open_store

TOKEN = "job-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHAPE = {
    "id",
    "state",
    "total",
    "done",
    "skipped",
    "failed",
    "errors",
    "created_at",
    "started_at",
    "finished_at",
}


def photo(i: int) -> bytes:
    return image_bytes((64 + i, 48), (i * 37 % 256, i * 91 % 256, i * 53 % 256))


@pytest.fixture
def web(tmp_path) -> Path:
    folder = tmp_path / "web"
    folder.mkdir()
    for i in range(6):
        (folder / f"p{i}.jpg").write_bytes(photo(i))
    return folder


@pytest.fixture
def make_client(tmp_path, model):
    clients = []

    def make(**overrides) -> TestClient:
        settings = Settings(
            db=str(tmp_path / "index.db"),
            images_dir=str(tmp_path / "images"),
            model=fake_model.NAME,
            api_token=TOKEN,
            job_allow_private=True,
            decode_processes=1,
        ).with_(**overrides)
        service = Service(settings)
        service.embedder = model
        client = TestClient(create_app(service=service))
        client.__enter__()  # the lifespan: the job runner starts
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def wait_finished(client: TestClient, location: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(location, headers=AUTH).json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job not finished in {timeout}s: {job}")


def ids_in(db: Path) -> list[str]:
    # Through the store's own SQLite library: a second SQLite library in this process
    # (the stdlib's) would drop the server's POSIX locks when it closes the file.
    store = open_store(db, create=False)
    try:
        return sorted(store.file_states()) if store.meta() else []
    finally:
        store.close()


def post_csv(client: TestClient, text: str, **kw):
    return client.post("/jobs", files={"csv": ("c.csv", text.encode())}, headers=AUTH, **kw)


def test_a_csv_job_downloads_and_indexes_and_reports_its_failures(make_client, web, tmp_path):
    client = make_client()
    with FileServer(web) as server:
        rows = [f"{server.url(f'p{i}.jpg')},p{i}" for i in range(6)]
        rows.append(f"{server.url('missing.jpg')},gone")
        response = post_csv(client, "url,id\n" + "\n".join(rows) + "\n")
        assert response.status_code == 202, response.text
        location = response.headers["Location"]
        assert location == f"/jobs/{response.json()['id']}"
        assert response.json()["state"] == "queued" and response.json()["total"] == 7
        job = wait_finished(client, location)
    assert set(job) == SHAPE
    assert job["state"] == "done", job
    assert (job["total"], job["done"], job["skipped"], job["failed"]) == (7, 6, 0, 1)
    assert job["errors"] == [{"id": "gone", "reason": "HTTP 404"}]
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    assert ids_in(tmp_path / "index.db") == [f"p{i}" for i in range(6)]
    assert sorted(p.name for p in (tmp_path / "images").glob("*.jpg")) == [
        f"p{i}.jpg" for i in range(6)
    ]
    # The index can be searched for what the job put in.
    found = client.post("/similarity-search", files={"file": ("q.jpg", photo(3))}).json()
    assert found["results"][0]["id"] == "p3"


def test_a_files_job_takes_ids_from_names_or_explicitly(make_client, tmp_path):
    client = make_client()
    files = [("files", (f"dir/x{i}.jpg", photo(i))) for i in range(3)]
    files.append(("files", ("notes.txt", b"not a picture")))
    job = wait_finished(client, client.post("/jobs", files=files, headers=AUTH).headers["Location"])
    assert (job["state"], job["done"], job["failed"]) == ("done", 3, 1), job
    assert job["errors"][0]["id"] == "notes" and "image" in job["errors"][0]["reason"]
    explicit = client.post(
        "/jobs",
        files=[("files", ("a.jpg", photo(4))), ("files", ("b.jpg", photo(5)))],
        data={"id": ["first", "second"]},
        headers=AUTH,
    )
    job = wait_finished(client, explicit.headers["Location"])
    assert job["done"] == 2, job
    assert ids_in(tmp_path / "index.db") == ["first", "second", "x0", "x1", "x2"]
    # Nothing staged is left behind once the jobs are over.
    assert not any((tmp_path / "images" / ".jobs").rglob("*.*"))


def test_running_a_job_again_redoes_nothing(make_client):
    client = make_client()
    files = [("files", (f"x{i}.jpg", photo(i))) for i in range(3)]
    first = wait_finished(
        client, client.post("/jobs", files=files, headers=AUTH).headers["Location"]
    )
    again = wait_finished(
        client, client.post("/jobs", files=files, headers=AUTH).headers["Location"]
    )
    assert (first["done"], first["skipped"]) == (3, 0)
    assert (again["done"], again["skipped"], again["state"]) == (0, 3, "done")


def test_every_job_route_needs_the_token(make_client, tmp_path):
    client = make_client()
    for response in (
        client.post("/jobs", files={"csv": ("c.csv", b"url,id\n")}),
        client.get("/jobs"),
        client.get("/jobs/abc"),
        client.delete("/jobs/abc"),
        client.get("/jobs", headers={"Authorization": "Bearer wrong"}),
    ):
        assert_error(response, 401, "unauthorized")
    closed = make_client(api_token="", db=str(tmp_path / "other.db"))
    assert_error(closed.get("/jobs"), 403, "writes_disabled")


def test_unknown_and_finished_jobs(make_client):
    client = make_client()
    assert_error(client.get("/jobs/nope", headers=AUTH), 404, "unknown_job")
    assert_error(client.delete("/jobs/nope", headers=AUTH), 404, "unknown_job")
    location = client.post("/jobs", files=[("files", ("a.jpg", photo(1)))], headers=AUTH).headers[
        "Location"
    ]
    wait_finished(client, location)
    assert_error(client.delete(location, headers=AUTH), 409, "job_finished")
    listed = client.get("/jobs", headers=AUTH).json()["jobs"]
    assert [j["id"] for j in listed] == [location.rsplit("/", 1)[1]]


def test_inputs_are_bounded(make_client):
    client = make_client(
        job_max_files=2, job_max_rows=3, max_upload_bytes=50_000, job_max_bytes=200_000
    )
    three = [("files", (f"x{i}.jpg", photo(i))) for i in range(3)]
    assert_error(client.post("/jobs", files=three, headers=AUTH), 413, "too_many_files")
    rows = "url,id\n" + "".join(f"https://example.com/{i}.jpg,i{i}\n" for i in range(4))
    assert_error(post_csv(client, rows), 413, "too_many_rows")
    big = [("files", ("big.jpg", b"\xff\xd8" + b"0" * 60_000))]
    assert_error(client.post("/jobs", files=big, headers=AUTH), 413, "too_large")
    huge = [("files", ("a.jpg", b"0" * 150_000)), ("files", ("b.jpg", b"0" * 150_000))]
    assert_error(client.post("/jobs", files=huge, headers=AUTH), 413, "too_large")
    assert_error(client.post("/jobs", data={"x": "1"}, headers=AUTH), 422, "invalid_request")
    bad_id = [("files", ("a b.jpg", photo(1)))]
    assert_error(client.post("/jobs", files=bad_id, headers=AUTH), 422, "invalid_id")
    assert_error(post_csv(client, "name,where\nx,y\n"), 400, "invalid_catalog")
    # Nothing was queued by any of these.
    assert client.get("/jobs", headers=AUTH).json()["jobs"] == []


def test_jobs_waiting_at_once_are_bounded_and_a_queued_job_can_be_cancelled(make_client, web):
    client = make_client(job_queue=2)
    with FileServer(web, hold_timeout=30) as server:
        release = []
        server.hold("p0.jpg", lambda: bool(release))  # the first job waits on its download
        first = post_csv(client, f"url,id\n{server.url('p0.jpg')},p0\n")
        second = post_csv(client, f"url,id\n{server.url('p1.jpg')},p1\n")
        assert first.status_code == second.status_code == 202
        deadline = time.monotonic() + 20
        while client.get(first.headers["Location"], headers=AUTH).json()["state"] != "running":
            assert time.monotonic() < deadline, "the runner never took the first job"
            time.sleep(0.05)
        assert_error(post_csv(client, f"url,id\n{server.url('p2.jpg')},p2\n"), 429, "too_many_jobs")
        cancelled = client.delete(second.headers["Location"], headers=AUTH)
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        running = client.delete(first.headers["Location"], headers=AUTH).json()
        assert running["state"] == "running"  # it stops after what it is doing
        release.append(1)
        job = wait_finished(client, first.headers["Location"])
    assert job["state"] == "cancelled"
    assert client.get(second.headers["Location"], headers=AUTH).json()["state"] == "cancelled"


def test_a_killed_server_resumes_its_job_on_restart_through_the_content_hash(tmp_path):
    """SIGKILL mid-job: the restarted server shows the finished job, runs the interrupted
    one to its end, embeds none of what was done again, and indexes every image once."""
    env = {
        "IMAGEFINDER_DB": str(tmp_path / "index.db"),
        "IMAGEFINDER_IMAGES_DIR": str(tmp_path / "images"),
        "IMAGEFINDER_MODEL": fake_model.NAME,
        "IMAGEFINDER_API_TOKEN": TOKEN,
        "IMAGEFINDER_JOB_BATCH_SIZE": "4",
        "FAKE_MODEL_BATCH_SECONDS": "0.3",
    }
    log = tmp_path / "server.log"
    files = [("files", (f"x{i:02d}.jpg", photo(i))) for i in range(24)]
    with LiveServer(env, fake_model=True, log=log) as server:
        small = requests.post(
            server.url + "/jobs", files=[("files", ("one.jpg", photo(99)))], headers=AUTH
        )
        small_url = server.url + small.headers["Location"]
        while requests.get(small_url, headers=AUTH).json()["state"] != "done":
            time.sleep(0.1)
        big = requests.post(server.url + "/jobs", files=files, headers=AUTH)
        big_path = big.headers["Location"]
        deadline = time.monotonic() + 30
        while requests.get(server.url + big_path, headers=AUTH).json()["done"] < 8:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        orphans = server.children()
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        for process in orphans:  # what a killed server leaves behind
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    before = len(ids_in(tmp_path / "index.db"))
    assert 8 <= before < 25
    with LiveServer(env, fake_model=True, log=log) as server:
        assert requests.get(small_url.replace(small_url.split("/jobs")[0], server.url),
                            headers=AUTH).json()["state"] == "done"  # fmt: skip
        deadline = time.monotonic() + 60
        while (job := requests.get(server.url + big_path, headers=AUTH).json())["state"] not in (
            "done",
            "failed",
        ):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
    assert job["state"] == "done", job
    assert job["done"] + job["skipped"] == 24 and job["failed"] == 0
    assert job["skipped"] >= before - 1  # found by content hash, not embedded again
    assert ids_in(tmp_path / "index.db") == sorted(["one", *(f"x{i:02d}" for i in range(24))])


def test_a_job_of_a_gone_process_is_taken_over_even_with_the_same_pid(tmp_path, model):
    """A restarted container may get the PID of the server it replaces: the job that
    server left running is still taken over, at once, not mistaken for this one's."""
    import os
    import socket

    from imagefinder.store.jobtable import Job, this_owner

    store = open_store(tmp_path / "index.db")
    store.ensure_schema(model.meta())
    table = store.jobs()
    table.create(Job(id="j1", kind="csv", total=1, created_at="2026-01-01T00:00:00.000Z"), "")
    earlier = f"{socket.gethostname()}:{os.getpid()}:0123456789ab"  # same PID, older process
    assert table.claim(earlier) is not None
    mine = this_owner()
    assert mine != earlier
    taken = table.claim(mine)
    assert taken is not None and taken.owner == mine and taken.state == "running"
    assert table.claim(mine) is None  # now it is this process's own, being run
    store.close()


def test_listing_refuses_an_unknown_parameter(make_client):
    client = make_client()
    assert_error(client.get("/jobs?limt=5", headers=AUTH), 422, "invalid_request")
    assert_error(client.get("/jobs?limit=0", headers=AUTH), 422, "invalid_request")
    assert client.get("/jobs?limit=5", headers=AUTH).json() == {"jobs": []}
