"""`imagefinder ingest`: download and embed in one streaming pass, from a real HTTP server
on 127.0.0.1, into a real index (the fake model: the model is not the point here)."""

from __future__ import annotations

import csv
from pathlib import Path

import fake_model
import pytest
from click.testing import CliRunner
from file_server import FileServer
from support import image_bytes

from imagefinder.cli import cli
from imagefinder.store import open_store

COLOURS = [(i * 37 % 256, i * 91 % 256, i * 53 % 256) for i in range(1, 13)]


@pytest.fixture
def photos(tmp_path) -> Path:
    """Twelve distinct small photos, plus a file that is not an image."""
    folder = tmp_path / "web"
    folder.mkdir()
    for i, colour in enumerate(COLOURS):
        (folder / f"p{i}.jpg").write_bytes(image_bytes((64 + i, 48), colour))
    (folder / "page.html").write_text("<html>no picture</html>")
    return folder


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("url,id\n" + "".join(f"{u},{i}\n" for u, i in rows), encoding="utf-8")
    return path


def run_ingest(csv_path: Path, out: Path, db: Path, *extra: str):
    return CliRunner().invoke(
        cli,
        ["ingest", "--csv", str(csv_path), "--output-dir", str(out), "--db", str(db),
         "--model", fake_model.NAME, "--retries", "0", "--timeout", "3", "--allow-private",
         "--batch-size", "4", *extra],
    )  # fmt: skip


def rows_in(db: Path) -> list[str]:
    # Through the store's own SQLite library: a second SQLite library in this process
    # (the stdlib's) would drop the writer's POSIX locks when it closes the file.
    store = open_store(db, create=False)
    try:
        return sorted(store.file_states()) if store.meta() else []
    finally:
        store.close()


def test_ingest_downloads_and_embeds_with_a_summary_and_a_manifest(photos, tmp_path):
    with FileServer(photos) as server:
        good = [(server.url(f"p{i}.jpg"), f"p{i}") for i in range(len(COLOURS))]
        bad = [(server.url("missing.jpg"), "gone"), (server.url("page.html"), "html")]
        csv_path = write_csv(tmp_path / "c.csv", [*good, *bad, ("ftp://x/y.jpg", "ftp")])
        out, db = tmp_path / "images", tmp_path / "index.db"
        result = run_ingest(csv_path, out, db)
    assert result.exit_code == 0, result.output
    assert rows_in(db) == sorted(i for _, i in good)
    assert sorted(p.name for p in out.glob("*.jpg")) == sorted(f"{i}.jpg" for _, i in good)
    assert "12 downloaded, 0 already there, 3 failed; 12 indexed, 0 unchanged" in result.output
    # One `skipping` line per failed row, naming the CSV line.
    assert f"skipping {csv_path}:14: HTTP 404" in result.output
    assert f"skipping {csv_path}:15: not an image" in result.output
    assert f"skipping {csv_path}:16:" in result.output
    with open(out / "manifest.csv", newline="") as f:
        manifest = {r["id"]: r["status"] for r in csv.DictReader(f)}
    assert manifest["p0"] == "downloaded" and manifest["gone"] == "failed"
    assert len(manifest) == 15
    store = open_store(db)
    assert store.file_state("p3").path == str((out / "p3.jpg").resolve())
    store.close()


def test_a_second_ingest_redoes_nothing(photos, tmp_path):
    with FileServer(photos) as server:
        rows = [(server.url(f"p{i}.jpg"), f"p{i}") for i in range(4)]
        csv_path = write_csv(tmp_path / "c.csv", rows)
        out, db = tmp_path / "images", tmp_path / "index.db"
        assert run_ingest(csv_path, out, db).exit_code == 0
        hits = sum(server.hits.values())
        again = run_ingest(csv_path, out, db)
        assert sum(server.hits.values()) == hits  # nothing fetched again
    assert again.exit_code == 0, again.output
    assert "0 downloaded, 4 already there, 0 failed; 0 indexed, 4 unchanged" in again.output
    assert rows_in(db) == ["p0", "p1", "p2", "p3"]


def test_ingest_resumes_through_the_content_hash_after_the_files_were_rewritten(photos, tmp_path):
    """Files re-downloaded with the same bytes (a new mtime) are not embedded again."""
    with FileServer(photos) as server:
        rows = [(server.url(f"p{i}.jpg"), f"p{i}") for i in range(3)]
        csv_path = write_csv(tmp_path / "c.csv", rows)
        out, db = tmp_path / "images", tmp_path / "index.db"
        assert run_ingest(csv_path, out, db).exit_code == 0
        for f in out.glob("*.jpg"):
            f.unlink()
        again = run_ingest(csv_path, out, db)
    assert again.exit_code == 0, again.output
    assert "3 downloaded, 0 already there, 0 failed; 0 indexed, 3 unchanged" in again.output


def test_embedding_starts_while_downloads_go_on(photos, tmp_path):
    """The last file is only served once the index already holds every other one: a
    pipeline that downloaded everything before embedding would wait for it, and fail."""
    db = tmp_path / "index.db"

    def others_indexed() -> bool:
        return len(rows_in(db)) >= 11

    with FileServer(photos, hold_timeout=20) as server:
        server.hold("p11.jpg", others_indexed)
        rows = [(server.url(f"p{i}.jpg"), f"p{i}") for i in range(12)]
        csv_path = write_csv(tmp_path / "c.csv", rows)
        result = run_ingest(csv_path, tmp_path / "images", db, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert len(rows_in(db)) == 12, result.output


def test_nothing_downloadable_is_one_line_of_error(tmp_path):
    csv_path = write_csv(tmp_path / "c.csv", [("http://127.0.0.1:9/a.jpg", "a")])
    result = run_ingest(csv_path, tmp_path / "images", tmp_path / "index.db")
    assert result.exit_code == 1
    assert "nothing usable was downloaded" in result.output


def test_a_missing_csv_names_the_option(tmp_path):
    result = run_ingest(tmp_path / "nope.csv", tmp_path / "images", tmp_path / "index.db")
    assert result.exit_code == 2 and "no such file; pass the catalogue CSV with --csv" in (
        result.output
    )
