"""`ingest --engine ray`: the Ray Data pipeline on a real local Ray cluster (2 CPUs,
fractional CPUs per actor), images from a real HTTP server on 127.0.0.1, into SQLite
(the driver writes) and a real PostgreSQL (the workers write).

The cluster is started once for the module; its workers import this checkout and the
tests' fake model (the model is not the point here), each forward pass slowed to 0.4 s
so that a test can kill an actor in the middle of a job.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import fake_model
import numpy as np
import psutil
import pytest
import ray
from click.testing import CliRunner
from file_server import FileServer
from support import ROOT, image_bytes

from imagefinder.catalog import read_catalog
from imagefinder.cli import cli
from imagefinder.config import Settings
from imagefinder.download import DownloadOptions
from imagefinder.errors import ModelUnavailable
from imagefinder.images import load_rgb
from imagefinder.rayengine import RayOptions, ingest
from imagefinder.raymodels import NAMESPACE
from imagefinder.store import open_store

N = 16


@pytest.fixture(scope="module")
def cluster():
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={
            "env_vars": {
                "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
                "FAKE_MODEL_BATCH_SECONDS": "0.4",
            },
            "worker_process_setup_hook": "fake_model.ray_setup",
        },
    )
    yield
    ray.shutdown()


@pytest.fixture
def web(tmp_path) -> Path:
    folder = tmp_path / "web"
    folder.mkdir()
    for i in range(N):
        colour = (i * 37 % 256, i * 91 % 256, i * 53 % 256)
        (folder / f"p{i:02d}.jpg").write_bytes(image_bytes((64 + i, 48), colour))
    return folder


def catalogue(tmp_path: Path, server: FileServer, extra: str = "") -> Path:
    path = tmp_path / "c.csv"
    rows = "".join(f"{server.url(f'p{i:02d}.jpg')},p{i:02d}\n" for i in range(N))
    path.write_text("url,id\n" + rows + extra)
    return path


def run(
    csv_path: Path,
    location: str,
    out: Path,
    actors: int = 1,
    batch: int = 4,
    keep_warm: float = 0,
    meta: dict | None = None,
    **kw,
):
    store = open_store(location)
    store.ensure_schema(meta or fake_embedder().meta())
    settings = Settings(db=location, model=fake_model.NAME)
    options = RayOptions(
        actors=actors, actor_cpus=0.5, fetch_cpus=0.25, batch_size=batch, keep_warm=keep_warm
    )
    try:
        return ingest(
            read_catalog(csv_path), store, location, fake_model.NAME, None, settings, out,
            DownloadOptions(allow_private=True, retries=0, timeout=5), options, **kw,
        )  # fmt: skip
    finally:
        store.close()


# Each embedding path: a pool of actors for the job (Ray Data's), or models kept warm
# on the cluster between jobs (raymodels.py).
PATHS = pytest.mark.parametrize("keep_warm", [0, 60], ids=["job-actors", "warm-models"])


@pytest.fixture
def no_warm_models(cluster):
    """No warm model left by an earlier test (their keep_warm is their own)."""
    for name in warm_models():
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    deadline = time.monotonic() + 30
    while warm_models():
        assert time.monotonic() < deadline, warm_models()
        time.sleep(0.1)


def warm_models() -> list[str]:
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE
    )


def embedding_processes() -> list[psutil.Process]:
    """Ray titles an embedding actor's process ray::MapWorker(MapBatches(_Embed)) or
    ray::WarmModel."""
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(t in " ".join(p.info["cmdline"] or ()) for t in ("_Embed", "WarmModel"))
    ]


_EMBEDDER = []


def fake_embedder():
    if not _EMBEDDER:
        from imagefinder.model.embedder import load_embedder

        _EMBEDDER.append(load_embedder(fake_model.NAME))
    return _EMBEDDER[0]


def assert_indexed_exactly_once(location: str, out: Path) -> None:
    """One row per image, each with the vector of its own file (as extract makes it)."""
    store = open_store(location)
    states = store.file_states()
    assert sorted(states) == [f"p{i:02d}" for i in range(N)]
    assert store.count() == N
    embedder = fake_embedder()
    for image_id in ("p00", "p07", f"p{N - 1:02d}"):
        path = out / f"{image_id}.jpg"
        assert states[image_id].path == str(path.resolve())
        expected = embedder.embed_batch([load_rgb(path, 10**8, embedder.min_side)])[0]
        assert np.allclose(store.vector_of(image_id), expected, atol=1e-5)
    store.close()


@PATHS
def test_ray_ingests_into_sqlite_with_the_driver_writing(cluster, web, tmp_path, keep_warm):
    db, out = str(tmp_path / "index.db"), tmp_path / "images"
    with FileServer(web) as server:
        csv_path = catalogue(tmp_path, server, f"{server.url('missing.jpg')},gone\nnot a url,bad\n")
        result = run(csv_path, db, out, keep_warm=keep_warm)
        assert (result.summary.indexed, result.summary.skipped) == (N, 2)
        assert sorted(i for i, _ in result.errors) == ["bad", "gone"]
        assert_indexed_exactly_once(db, out)
        hits = dict(server.hits)
        # A job run again: nothing fetched or embedded.
        again = run(csv_path, db, out, keep_warm=keep_warm)
        # Only the failed row is tried again.
        assert {k: v - hits[k] for k, v in server.hits.items()} == {
            k: int(k == "missing.jpg") for k in hits
        }
    assert (again.summary.indexed, again.summary.unchanged) == (0, N)


@PATHS
def test_an_actor_killed_mid_job_loses_and_duplicates_nothing(cluster, web, tmp_path, keep_warm):
    db, out = str(tmp_path / "index.db"), tmp_path / "images"

    def rows() -> int:
        # Through the store's own SQLite library, never the stdlib's: two SQLite libraries
        # in one process drop each other's POSIX locks, and readers saw nothing.
        store = open_store(db, create=False)
        try:
            return len(store.file_states()) if store.meta() else 0
        finally:
            store.close()

    with FileServer(web) as server:
        csv_path = catalogue(tmp_path, server)
        done: list = []
        job = threading.Thread(
            target=lambda: done.append(
                run(csv_path, db, out, actors=2, batch=2, keep_warm=keep_warm)
            )
        )
        job.start()
        deadline = time.monotonic() + 60
        while rows() < 2:
            assert time.monotonic() < deadline and job.is_alive(), "the job never wrote"
            time.sleep(0.05)
        assert rows() < N, "the job finished before the kill: nothing was tested"
        actors = embedding_processes()
        assert actors, "no embedding actor found"
        os.kill(actors[0].pid, signal.SIGKILL)
        job.join(120)
    assert not job.is_alive() and done
    assert done[0].summary.indexed == N and done[0].summary.skipped == 0
    assert_indexed_exactly_once(db, out)


@PATHS
def test_ray_ingests_into_postgresql_with_the_workers_writing(
    cluster, web, tmp_path, pg_url, keep_warm
):
    out = tmp_path / "images"
    with FileServer(web) as server:
        result = run(catalogue(tmp_path, server), pg_url, out, actors=2, keep_warm=keep_warm)
    assert result.summary.indexed == N
    assert_indexed_exactly_once(pg_url, out)


def test_the_command_runs_on_the_cluster(cluster, web, tmp_path):
    db, out = tmp_path / "index.db", tmp_path / "images"
    with FileServer(web) as server:
        csv_path = catalogue(tmp_path, server, f"{server.url('missing.jpg')},gone\n")
        result = CliRunner().invoke(
            cli,
            ["ingest", "--csv", str(csv_path), "--output-dir", str(out), "--db", str(db),
             "--model", fake_model.NAME, "--engine", "ray", "--allow-private",
             "--retries", "0"],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{N} downloaded, 0 already there, 1 failed; {N} indexed" in result.output
    assert f"skipping {csv_path}:{N + 2}: HTTP 404" in result.output
    assert (out / "manifest.csv").is_file()
    assert_indexed_exactly_once(str(db), out)


def test_with_a_ray_address_the_server_runs_csv_jobs_on_the_cluster(cluster, web, tmp_path, model):
    from fastapi.testclient import TestClient

    from imagefinder.server.app import create_app
    from imagefinder.service import Service

    token = {"Authorization": "Bearer t0ken"}
    settings = Settings(
        db=str(tmp_path / "index.db"),
        images_dir=str(tmp_path / "images"),
        model=fake_model.NAME,
        api_token="t0ken",
        job_allow_private=True,
        decode_processes=0,
        ray_address="auto",  # this process already drives the tests' cluster
    )
    service = Service(settings)
    service.embedder = model
    with FileServer(web) as server, TestClient(create_app(service=service)) as client:
        csv_text = catalogue(tmp_path, server, f"{server.url('missing.jpg')},gone\n").read_text()
        location = client.post(
            "/jobs", files={"csv": ("c.csv", csv_text.encode())}, headers=token
        ).headers["Location"]
        deadline = time.monotonic() + 120
        while (job := client.get(location, headers=token).json())["state"] not in (
            "done",
            "failed",
        ):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
    assert (job["state"], job["done"], job["failed"]) == ("done", N, 1), job
    assert job["errors"] == [{"id": "gone", "reason": "HTTP 404"}]
    assert_indexed_exactly_once(settings.db, tmp_path / "images")


def test_a_warm_model_serves_the_next_job_and_ends_once_idle(
    cluster, web, tmp_path, no_warm_models
):
    keep_warm = 4
    with FileServer(web) as server:
        csv_path = catalogue(tmp_path, server)
        first = run(csv_path, str(tmp_path / "a.db"), tmp_path / "a", keep_warm=keep_warm)
        models = warm_models()
        assert len(models) == 1, models  # one slot: --actors 1
        pids = {p.pid for p in embedding_processes()}
        second = run(csv_path, str(tmp_path / "b.db"), tmp_path / "b", keep_warm=keep_warm)
        # The same process embedded the second job: no model was loaded for it.
        assert warm_models() == models
        assert {p.pid for p in embedding_processes()} == pids
    assert first.summary.indexed == second.summary.indexed == N
    assert_indexed_exactly_once(str(tmp_path / "b.db"), tmp_path / "b")
    deadline = time.monotonic() + keep_warm + 30
    while warm_models():
        assert time.monotonic() < deadline, "the idle model never ended"
        time.sleep(0.2)


@PATHS
def test_actors_whose_model_differs_from_the_index_fail_the_job_in_one_line(
    cluster, web, tmp_path, keep_warm, no_warm_models
):
    # The index names other weights than the actors load (the driver never loads the
    # model: only the actors can tell).
    meta = {**fake_embedder().meta(), "weights": "seed-999"}
    with FileServer(web) as server, pytest.raises(ModelUnavailable) as failed:
        run(catalogue(tmp_path, server), str(tmp_path / "i.db"), tmp_path / "i",
            keep_warm=keep_warm, meta=meta)  # fmt: skip
    assert str(failed.value).endswith(
        f"a Ray actor loaded {fake_model.NAME} weights {fake_embedder().weights_id}, but "
        "the index holds vectors of weights seed-999"
    ), failed.value
    assert "\n" not in str(failed.value)
