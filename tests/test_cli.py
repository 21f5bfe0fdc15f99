"""The commands as a user runs them: `imagefinder ...` and the two scripts in the project root."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import click
import fake_model
import pytest
from click.testing import CliRunner
from image_server import JPEG, ImageServer
from support import ROOT

from imagefinder import __version__
from imagefinder.cli import cli
from imagefinder.store import open_store


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def script(*args: str, fake: bool = False) -> subprocess.CompletedProcess:
    """Run a script in the project root as a user would; ``fake``: with the tests' fake
    model registered."""
    cmd = fake_model.command(*args) if fake else [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help(name):
    command = cli.commands[name]
    assert command.help and command.help.strip(), f"{name} has no docstring"
    result = run(name, "--help")
    assert result.exit_code == 0, result.output
    assert command.help.strip().splitlines()[0] in result.output
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{name} {param.opts[0]} has no help text"


def test_the_group_lists_its_commands_and_version():
    result = run("--help")
    assert result.exit_code == 0
    for name in cli.commands:
        assert name in result.output
    assert run("--version").output.strip() == f"imagefinder, version {__version__}"


def test_download_images_script(tmp_path):
    with ImageServer() as server:
        csv_path = tmp_path / "images.csv"
        csv_path.write_text(
            f"url,id\n{server.url('/img/one.jpg')},one\n{server.url('/missing')},two\n"
        )
        out = tmp_path / "images"
        proc = script(
            "download_images.py",
            "--csv_file",
            str(csv_path),
            "--output-dir",
            str(out),
            "--allow-private",
        )
        missing = server.url("/missing")
    assert proc.returncode == 0, proc.stderr
    assert "1 downloaded, 0 skipped (already there), 1 failed" in proc.stdout
    # Not a terminal: the skip line alone, no progress label, no blank lines.
    assert proc.stderr == f"skipping {csv_path}:3: HTTP 404 ({missing})\n"
    assert (out / "one.jpg").read_bytes() == JPEG
    assert (out / "manifest.csv").is_file()
    usage = script("download_images.py", "--help")
    assert usage.returncode == 0 and "Usage: download_images.py" in usage.stdout


def test_extract_image_features_script_then_info(tmp_path, caltech_dir):
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in sorted((caltech_dir / "pagoda").glob("*.jpg"))[:5]:
        shutil.copy(src, folder)
    db = tmp_path / "pagoda.db"
    proc = script(
        "extract_image_features.py", "--folder", str(folder), "--db", str(db),
        "--model", fake_model.NAME, fake=True,
    )  # fmt: skip
    n = len(list(folder.glob("*.jpg")))
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout.strip()
        == f"{n} indexed, 0 unchanged, 0 skipped; index {db} now holds {n} images"
    )

    info = run("info", "--db", str(db))
    assert info.exit_code == 0, info.output
    assert re.search(rf"^vectors\s+{n}$", info.output, re.M)
    assert re.search(rf"^model\s+{re.escape(fake_model.NAME)}$", info.output, re.M)
    data = json.loads(run("info", "--db", str(db), "--json").output)
    assert (data["vectors"], data["dim"], data["metric"]) == (n, str(fake_model.DIM), "l2")
    assert data["index"] == str(db)

    removed = sorted(folder.glob("*.jpg"))[0]
    removed.unlink()
    kept = run("extract", "--folder", str(folder), "--db", str(db))
    assert kept.exit_code == 0, kept.output
    assert "1 indexed files no longer exist; run with --prune to remove them" in kept.stderr
    pruned = run("extract", "--folder", str(folder), "--db", str(db), "--prune")
    assert pruned.exit_code == 0, pruned.output
    assert pruned.stdout.startswith(f"0 indexed, {n - 1} unchanged, 0 skipped, 1 pruned; ")
    assert pruned.stdout.rstrip().endswith(f"now holds {n - 1} images")


def test_search_prints_neighbours_as_text_and_json(caltech_index, caltech_dir):
    query = caltech_dir / "ewer" / sorted(p.name for p in (caltech_dir / "ewer").iterdir())[0]
    text = run("search", str(query), "--db", str(caltech_index), "-k", "4")
    assert text.exit_code == 0, text.output
    lines = text.output.strip().splitlines()
    assert len(lines) == 4
    # The query is in the catalogue: it comes first, marked as the same file.
    assert re.fullmatch(r"0\.0000  ewer/" + query.stem + r"  \[exact\]", lines[0])
    assert all(re.fullmatch(r"\d+\.\d{4}  [\w/]+(  \[(exact|near)\])?", line) for line in lines)

    as_json = run("search", str(query), "--db", str(caltech_index), "--json")
    assert as_json.exit_code == 0, as_json.output
    body = json.loads(as_json.output)
    assert (body["model"], body["metric"]) == (fake_model.NAME, "l2")
    assert [r["id"] for r in body["results"]] == [line.split()[1] for line in lines[:3]]


def test_eval_reports_every_combination_of_expansion_and_dba(caltech_index, caltech_dir):
    result = run("eval", "--folder", str(caltech_dir), "--db", str(caltech_index))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "500 queries over 25 classes, k = 3"
    assert lines[1].split() == ["model", "images/s", "αQE", "DBA", "P@k", "mAP"]
    rows = [line.split() for line in lines[2:]]
    assert [(r[2], r[3]) for r in rows] == [
        ("off", "off"),
        ("on", "off"),
        ("off", "on"),
        ("on", "on"),
    ]
    assert all(r[0] == fake_model.NAME and r[1] == "-" for r in rows)
    assert all(re.fullmatch(r"0\.\d{4}", x) for r in rows for x in r[4:])


def test_commands_on_a_missing_index_say_how_to_build_it(tmp_path, caltech_dir):
    db = tmp_path / "none.db"
    query = next((caltech_dir / "ewer").iterdir())
    result = run("search", str(query), "--db", str(db))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: the index {db} is missing; build it with: ")
    assert "python extract_image_features.py --folder" in result.stderr
    assert result.stderr.count("\n") == 1
    info = run("info", "--db", str(db))
    assert info.exit_code == 1
    assert f"build one with: imagefinder extract --folder DIR --db {db}" in info.stderr
    assert not db.exists(), "looking must not create an index"


def test_search_with_a_file_that_is_not_an_image(caltech_index, tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_text("hello")
    result = run("search", str(fake), "--db", str(caltech_index))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: not a supported image")


def test_eval_of_a_folder_the_index_does_not_hold(caltech_index, tmp_path):
    result = run("eval", "--folder", str(tmp_path), "--db", str(caltech_index))
    assert result.exit_code == 1
    assert (
        "holds no images from" in result.stderr and "imagefinder extract --folder" in result.stderr
    )


def test_a_bad_setting_is_one_line(tmp_path, caltech_dir):
    result = CliRunner(env={"IMAGEFINDER_BATCH_SIZE": "lots"}).invoke(
        cli, ["extract", "--folder", str(caltech_dir), "--db", str(tmp_path / "x.db")]
    )
    assert result.exit_code == 1
    assert result.stderr == "Error: IMAGEFINDER_BATCH_SIZE='lots' is not a whole number\n"
    assert open_store(tmp_path / "x.db").meta() == {}
