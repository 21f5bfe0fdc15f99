"""The container: the Dockerfile built and run for real with Podman, and compose.yaml.

The image is built on a local Debian base (Docker Hub is out of reach here; see
``podman.py``), run on 127.0.0.1, made to index the demo photos it ships, and asked
for neighbours, over HTTP and through ``imagefinder search --server``.
"""

from __future__ import annotations

import json
import os
import re
import time

import podman
import pytest
import requests
import tomllib
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from support import ROOT, free_port

from imagefinder.cli import cli

DEMO = ROOT / "assets" / "demo"


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_the_dockerfile_installs_the_pinned_torch_on_cpu():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pins = sorted(p for p in pins if p.startswith(("torch==", "torchvision==")))
    assert len(torch_pins) == 2
    install = re.search(
        r"RUN pip install [^\n]*\\\n\s+(torch==\S+) (torchvision==\S+)", dockerfile()
    )
    assert install, "the Dockerfile installs torch and torchvision on a layer of their own"
    assert sorted(install.groups()) == torch_pins
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in dockerfile()


def test_the_dockerfile_runs_as_a_user_with_a_health_check():
    text = dockerfile()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.M)
    assert re.search(r"^FROM \$\{BASE\}", text, re.M)
    assert "ARG BASE=python:3.11-slim" in text


def test_compose_runs_the_api_on_postgresql_with_one_volume():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    api, db = compose["services"]["api"], compose["services"]["db"]
    assert api["build"] == "."
    assert api["environment"]["IMAGEFINDER_DB"].startswith("postgresql://")
    assert "@db:5432/" in api["environment"]["IMAGEFINDER_DB"]
    assert api["depends_on"]["db"]["condition"] == "service_healthy"
    assert "pgvector" in db["image"] and "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert list(compose["volumes"]) == ["data"]
    mounts = {name: service["volumes"] for name, service in compose["services"].items()}
    assert mounts == {"api": ["data:/data"], "db": ["data:/var/lib/postgresql"]}
    # Published on loopback only; the database not at all.
    assert all(p.startswith("127.0.0.1:") for p in api["ports"]) and "ports" not in db


@pytest.fixture(scope="module")
def containers(tmp_path_factory):
    """Podman's environment and the freshly built image."""
    reason = podman.unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the container test, but it {reason}")
        pytest.skip(f"the container test {reason}")
    folder = tmp_path_factory.mktemp("podman")
    env = podman.environment(folder)
    started = time.monotonic()
    image = podman.build(env, folder / "build.log")
    print(f"image built in {time.monotonic() - started:.0f} s")
    return env, image


def wait_healthy(url: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = requests.get(url + "/health", timeout=5)
            if response.status_code == 200:
                return response.json()
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url}/health did not answer in {timeout} s")


def test_the_image_indexes_its_demo_photos_and_answers_searches(containers):
    env, image = containers
    name = f"imagefinder-test-{os.getpid()}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    token = "container-test-token"
    podman.podman(env, "volume", "create", name)
    try:
        podman.podman(
            env, "run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:8000",
            "--volume", f"{name}:/data", "--env", f"IMAGEFINDER_API_TOKEN={token}", image,
        )  # fmt: skip
        assert wait_healthy(url)["status"] == "missing"
        assert podman.podman(env, "exec", name, "id", "-u").stdout.strip() == "10001"

        extract = podman.podman(
            env, "exec", name, "imagefinder", "extract",
            "--folder", "/opt/imagefinder/demo", "--model", "efficientnet-lite0",
        )  # fmt: skip
        photos = sorted(DEMO.glob("*.jpg"))
        assert extract.stdout.startswith(f"{len(photos)} indexed, 0 unchanged, 0 skipped;")
        health = requests.get(url + "/health", timeout=10).json()
        assert (health["status"], health["vectors"]) == ("ok", len(photos))

        query = photos[len(photos) // 2]
        response = requests.post(
            url + "/similarity-search",
            files={"file": (query.name, query.read_bytes())},
            data={"k": "3"},
            headers={"X-Request-ID": "container-test-1"},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        assert response.headers["X-Request-ID"] == "container-test-1"
        first = response.json()["results"][0]
        assert first["id"] == query.stem and first["distance"] < 1e-4

        # The command line, asking the container instead of loading a model itself.
        cli_result = CliRunner().invoke(cli, ["search", str(query), "--server", url, "--json"])
        assert cli_result.exit_code == 0, cli_result.output
        assert json.loads(cli_result.output) == response.json()

        assert podman.podman(env, "healthcheck", "run", name, check=False).returncode == 0
        scrape = requests.get(
            url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
        vectors = families["imagefinder_index_vectors"].samples[0]
        assert vectors.value == len(photos)
        assert vectors.labels["model"] == "efficientnet-lite0"

        logged = podman.podman(env, "logs", name)
        logs = logged.stdout + logged.stderr
        line = next(x for x in logs.splitlines() if "id=container-test-1" in x)
        assert '"POST /similarity-search" 200' in line and "route=/similarity-search" in line
    finally:
        podman.podman(env, "rm", "--force", "--time", "5", name, check=False)
        podman.podman(env, "volume", "rm", "--force", name, check=False)
