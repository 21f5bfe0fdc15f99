"""Fixtures shared across the suite. Everything is real: SQLite files in tmp dirs,
images made with PIL or read from ../shared/data, the real model where quality matters."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import CALTECH, image_bytes  # noqa: E402

from imagefinder.config import Settings  # noqa: E402

# Tests never depend on the developer's own index or env.
for key in [k for k in os.environ if k.startswith("IMAGEFINDER_")]:
    del os.environ[key]


@pytest.fixture(scope="session")
def caltech_dir() -> Path:
    if not CALTECH.is_dir():
        pytest.fail(f"{CALTECH} is missing: the suite needs ../shared/data beside the project")
    return CALTECH


@pytest.fixture(scope="session")
def caltech_index(tmp_path_factory, caltech_dir) -> Path:
    """The Caltech photos indexed with efficientnet-lite0 through the real extract command."""
    from click.testing import CliRunner

    from imagefinder.cli import cli

    db = tmp_path_factory.mktemp("caltech") / "caltech.db"
    result = CliRunner().invoke(
        cli,
        ["extract", "--folder", str(caltech_dir), "--db", str(db), "--model", "efficientnet-lite0"],
    )
    assert result.exit_code == 0, result.output
    return db


@pytest.fixture(scope="session")
def lite0():
    """The real efficientnet-lite0, loaded once."""
    from imagefinder.embed import load_embedder

    return load_embedder("efficientnet-lite0")


@pytest.fixture
def db_location(tmp_path) -> str:
    """Where a test's index lives. Tests take it from here (never build their own path)
    so the same tests can run against every store."""
    return str(tmp_path / "index.db")


@pytest.fixture
def settings(tmp_path, db_location) -> Settings:
    return Settings(db=db_location, images_dir=str(tmp_path / "images"))


@pytest.fixture
def jpeg() -> bytes:
    return image_bytes()
