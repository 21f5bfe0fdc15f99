"""The first hour: what a new user meets from a fresh clone, offline.

Each test is one stumble a first run hit (the scripts' ``-h``, tracebacks where one line
was promised, files left behind, misleading output, the network's real cause), fixed.
The fake model stands in wherever the model is not the point.
"""

from __future__ import annotations

import os
import pty
import re
import stat
import subprocess
import sys
from pathlib import Path

import fake_model
import pytest
import torch
from click.testing import CliRunner
from image_server import ImageServer
from support import ROOT, free_port, image_bytes

from imagefinder.catalog import Row
from imagefinder.cli import cli
from imagefinder.config import CHOICES, RANGES, Settings
from imagefinder.download import Downloader, DownloadOptions
from imagefinder.errors import ConfigError, ModelUnavailable
from imagefinder.files import save_bytes
from imagefinder.indexer import index_folder
from imagefinder.model.embedder import load_embedder
from imagefinder.model.weights import torchvision_state_dict
from imagefinder.store import open_store

FAKE = fake_model.NAME
QUICK = DownloadOptions(timeout=3.0, retries=2, backoff=0.01, workers=4, allow_private=True)


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner(env=env).invoke(cli, list(args))


def photos(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i in range(n):
        (folder / f"p{i}.jpg").write_bytes(image_bytes((64, 48), colours[i % 4]))
    return folder


def first_index(folder: Path, db: Path) -> None:
    """``folder`` indexed with the fake model. (Not through ``extract --model``: the CLI's
    list of models is fixed when it is imported, which may be before the fake model is
    registered; once an index exists, ``extract`` takes its model from the index.)"""
    store = open_store(str(db))
    index_folder(folder, store, load_embedder(FAKE))
    store.close()


def extract(folder: Path, db: Path, *more: str):
    """The extract command over an existing index: the index's own model."""
    return run("extract", "--folder", str(folder), "--db", str(db), *more)


# -- help ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["extract_image_features.py", "-h"],
        ["download_images.py", "-h"],
        ["-m", "imagefinder", "-h"],
        ["-m", "imagefinder", "search", "-h"],
    ],
)
def test_every_entry_point_answers_dash_h(command):
    proc = subprocess.run(
        [sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ") and "-h, --help" in proc.stdout


# -- one line, never a traceback -------------------------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        ("lots", "Error: IMAGEFINDER_BATCH_SIZE='lots' is not a whole number"),
        ("0", "Error: IMAGEFINDER_BATCH_SIZE=0 is out of range; use 1 to 4,096"),
    ],
)
def test_a_bad_setting_stops_uvicorn_with_one_line(value, message):
    env = {**os.environ, "IMAGEFINDER_BATCH_SIZE": value}
    cmd = [sys.executable, "-m", "uvicorn", "main:app", "--port", str(free_port())]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == message + "\n"


@pytest.mark.parametrize("name", sorted(RANGES))
def test_numbers_out_of_range_are_refused_by_name(name):
    low, high = RANGES[name]
    for bad in (low - 1, high + 1):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env({f"IMAGEFINDER_{name.upper()}": str(bad)})
        assert caught.value.message.startswith(f"IMAGEFINDER_{name.upper()}={bad} is out of range")
    assert getattr(Settings.from_env({f"IMAGEFINDER_{name.upper()}": str(low)}), name) == low


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_choices_are_checked_and_case_blind(name):
    variable = f"IMAGEFINDER_{name.upper()}"
    with pytest.raises(ConfigError, match=f"^{variable}='nope' is not one of "):
        Settings.from_env({variable: "nope"})
    choice = CHOICES[name][-1]
    assert getattr(Settings.from_env({variable: choice.upper()}), name) == choice


def test_a_zero_batch_size_leaves_no_index_behind(tmp_path):
    db = tmp_path / "index.db"
    result = CliRunner(env={"IMAGEFINDER_BATCH_SIZE": "0"}).invoke(
        cli,
        ["extract", "--folder", str(photos(tmp_path / "p")), "--db", str(db),
         "--model", "efficientnet-lite0"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr == "Error: IMAGEFINDER_BATCH_SIZE=0 is out of range; use 1 to 4,096\n"
    assert not db.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["info"],
        ["info", "--json"],
        ["eval", "--folder", "FOLDER"],
        ["copy", "DB", "OTHER"],
    ],
)
def test_commands_that_only_read_never_create_an_index(tmp_path, args):
    db = tmp_path / "typo" / "imagefindr.db"
    folder = photos(tmp_path / "photos")
    argv = [str(folder) if a == "FOLDER" else a for a in args]
    argv = [
        str(db) if a == "DB" else str(tmp_path / "copy.db") if a == "OTHER" else a for a in argv
    ]
    if "DB" not in args:
        argv += ["--db", str(db)]
    result = run(*argv)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {db} is not an index yet; build one with: "
        f"imagefinder extract --folder DIR --db {db}\n"
    )
    assert not db.parent.exists(), "neither the file nor its folder is created"
    assert not (tmp_path / "copy.db").exists()


def test_search_of_a_missing_index_creates_nothing(tmp_path):
    db = tmp_path / "nowhere" / "index.db"
    query = tmp_path / "q.jpg"
    query.write_bytes(image_bytes())
    result = run("search", str(query), "--db", str(db))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: the index {db} is missing; build it with: ")
    assert not db.parent.exists()


def test_a_folder_given_as_the_index_is_named_as_such(tmp_path):
    result = run("info", "--db", str(tmp_path))
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {tmp_path} is a folder, not an index file; "
        f"name the file, for example {tmp_path / 'imagefinder.db'}\n"
    )
    query = tmp_path / "q.jpg"
    query.write_bytes(image_bytes())
    searched = run("search", str(query), "--db", str(tmp_path))
    assert searched.exit_code == 1 and "is a folder, not an index file" in searched.stderr


def test_another_model_is_refused_before_any_weights_load(tmp_path, monkeypatch):
    db = tmp_path / "index.db"
    first_index(photos(tmp_path / "p"), db)

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded (resnet50 would have gone to download)")

    monkeypatch.setattr("imagefinder.model.embedder.load_embedder", no_loading)
    result = run("extract", "--folder", str(tmp_path / "p"), "--db", str(db), "--model", "resnet50")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {db} was built with model='{FAKE}', but this run uses model='resnet50'; "
        "vectors from different models cannot be mixed. "
        f"Use --model {FAKE} (and the same weights), or a new --db path\n"
    )


# -- files are created like any other tool's -------------------------------------------


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_downloaded_and_uploaded_images_follow_the_umask(umask, tmp_path):
    expected = 0o666 & ~umask
    with ImageServer() as server:
        row = Row(2, server.url("/img/a.jpg"), "a")
        (outcome,) = Downloader(tmp_path / "dl", QUICK).run([row])
    assert outcome.status == "downloaded", outcome.reason
    assert mode(Path(outcome.path)) == expected
    # What POST /images writes through.
    saved = save_bytes(tmp_path / "api", "b", "JPEG", image_bytes())
    assert mode(saved) == expected


def test_thumbnails_follow_the_umask(umask, tmp_path):
    from imagefinder.server import thumbs
    from imagefinder.store import FileState

    source = tmp_path / "a.jpg"
    source.write_bytes(image_bytes((300, 200)))
    st = source.stat()
    version = thumbs.version_of("a", FileState(str(source), "0" * 64, st.st_size, st.st_mtime_ns))
    made = thumbs.thumbnail(tmp_path / "thumbs", version, source, 10**8)
    assert mode(made) == 0o666 & ~umask


# -- what the output says --------------------------------------------------------------


def messy_folder(root: Path) -> Path:
    """Three good photos, one corrupt file and two files claiming one id."""
    folder = photos(root / "photos")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "twin.jpg").write_bytes(image_bytes((64, 48), (10, 10, 10)))
    (folder / "twin.png").write_bytes(image_bytes((64, 48), (10, 10, 10), fmt="PNG"))
    return folder


def extract_in(cwd: Path, *args: str, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """The extract script run from ``cwd`` with a relative --folder, as a user would."""
    cmd = fake_model.command(str(ROOT / "extract_image_features.py"), *args, "--model", FAKE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, **popen)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_output_to_a_pipe_is_the_messages_and_the_summary_only(tmp_path):
    messy_folder(tmp_path)
    proc = extract_in(tmp_path, "--folder", "photos", "--db", "index.db")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    # No progress label left dangling, no blank lines; every skipped file named the
    # way the user named the folder (relative here), whichever check refused it.
    assert lines[0] == f"Loading {FAKE} ..."
    assert "" not in lines and not any("Embedding" in line for line in lines)
    broken, twin = sorted(line for line in lines if line.startswith("skipping"))
    assert broken.startswith("skipping photos/broken.jpg: ")  # the decoder refused it
    assert twin == "skipping photos/twin.png: same id 'twin' as twin.jpg"  # the scan did
    assert proc.stdout == "4 indexed, 0 unchanged, 2 skipped; index index.db now holds 4 images\n"


def test_on_a_terminal_messages_replace_the_bar_line(tmp_path):
    messy_folder(tmp_path)
    leader, follower = pty.openpty()
    proc = extract_in(
        tmp_path, "--folder", "photos", "--db", "index.db",
        stdout=subprocess.PIPE, stderr=follower,
    )  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=300) == 0
    shown = b"".join(chunks).decode()
    assert "Embedding" in shown  # the bar
    starts = [m.start() for m in re.finditer("skipping photos/", shown)]
    assert len(starts) == 2
    for start in starts:
        # Each message starts on a cleared line, never glued to a half-drawn bar.
        assert shown[start - 4 : start] == "\r\x1b[K", repr(shown[max(0, start - 60) : start])
    assert "\n\n" not in shown.replace("\r\n", "\n")


def test_a_file_taking_over_an_id_is_not_reported_gone(tmp_path):
    folder = photos(tmp_path / "photos", 2)
    db = tmp_path / "index.db"
    first_index(folder, db)
    # p0.jpg is replaced by p0.png: the id p0 now belongs to the PNG.
    (folder / "p0.jpg").unlink()
    (folder / "p0.png").write_bytes(image_bytes((64, 48), (90, 90, 250), fmt="PNG"))
    taken = extract(folder, db, "--prune")
    assert taken.exit_code == 0, taken.output
    assert taken.stdout.startswith("1 indexed, 1 unchanged, 0 skipped; ")
    assert "no longer exist" not in taken.stderr
    store = open_store(str(db))
    assert store.count() == 2, "--prune kept the id that was just re-indexed"
    assert store.file_state("p0").path == str((folder / "p0.png").resolve())
    store.close()
    # A file really gone is reported, and --prune removes exactly it.
    (folder / "p1.jpg").unlink()
    gone = extract(folder, db)
    assert "1 indexed files no longer exist; run with --prune to remove them" in gone.stderr
    pruned = extract(folder, db, "--prune")
    assert pruned.stdout.startswith("0 indexed, 1 unchanged, 0 skipped, 1 pruned; ")


# -- the network, named ----------------------------------------------------------------


def download(csv_rows: list[tuple[str, str]], tmp_path: Path, *more: str):
    csv_path = tmp_path / "images.csv"
    csv_path.write_text("url,id\n" + "".join(f"{u},{i}\n" for u, i in csv_rows))
    out = tmp_path / "images"
    result = run("download", "--csv_file", str(csv_path), "--output-dir", str(out), *more)
    return result, csv_path, out / "manifest.csv"


def test_connection_refused_is_named_and_the_run_fails(tmp_path):
    port = free_port()  # nothing listens there
    rows = [(f"http://127.0.0.1:{port}/{i}.jpg", f"r{i}") for i in range(3)]
    result, csv_path, manifest = download(rows, tmp_path, "--retries", "1", "--allow-private")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert (
        f"skipping {csv_path}:2: connection refused by 127.0.0.1:{port} "
        f"(after 2 attempts) ({rows[0][0]})" in lines
    )
    assert lines[-1] == (
        "Error: nothing usable was downloaded: 3 of 3 rows failed because the servers "
        f"refused the connection (are they running?); reasons in {manifest}. "
        "Without network, try: make demo"
    )


def test_a_host_name_that_does_not_resolve_is_named_and_not_retried_per_row(tmp_path):
    # .invalid never resolves (RFC 2606), online or off.
    rows = [(f"http://imagefinder-test.invalid/{i}.jpg", f"d{i}") for i in range(6)]
    result, csv_path, manifest = download(rows, tmp_path, "--workers", "1")
    assert result.exit_code == 1
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipping")]
    assert len(skipped) == 6
    assert all("DNS lookup failed for imagefinder-test.invalid (" in line for line in skipped)
    # The name is looked up until it is known to fail; the other rows say so at once.
    assert sum("(as before in this run)" in line for line in skipped) >= 2
    assert (
        "6 of 6 rows failed because their host names could not be resolved "
        "(is this machine offline?)" in result.stderr.splitlines()[-1]
    )


def test_make_run_stops_when_nothing_was_downloaded():
    recipe = (ROOT / "Makefile").read_text().split("\nrun:", 1)[1].split("\n\n", 1)[0]
    download_line = next(line for line in recipe.splitlines() if "download_images.py" in line)
    # A leading '-' would make make ignore the download's failure and go on to extract.
    assert download_line.startswith("\t$(BIN)/python download_images.py")


def test_the_weights_error_names_the_cause_and_the_offline_way(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    port = free_port()  # the weights' server is down

    class Weights:  # shaped like a torchvision weights enum, pointing at that server
        name = "IMAGENET1K_V1"
        url = f"http://127.0.0.1:{port}/resnet50-0676ba61.pth"

        def get_state_dict(self, **kwargs):
            return torch.hub.load_state_dict_from_url(self.url, **kwargs)

    with pytest.raises(ModelUnavailable) as caught:
        torchvision_state_dict(Weights(), "ResNet50")
    message = caught.value.message
    assert f"(connection refused by 127.0.0.1:{port})" in message
    assert "--model efficientnet-lite2" in message and "`make demo`" in message


# -- a quick search against a running server --------------------------------------------


def test_search_through_a_running_server_answers_like_a_local_search(tmp_path):
    from support import LiveServer

    folder = photos(tmp_path / "photos", 4)
    db = tmp_path / "index.db"
    first_index(folder, db)
    query = folder / "p2.jpg"
    local = run("search", str(query), "--db", str(db), "-k", "4")
    assert local.exit_code == 0, local.output
    with LiveServer({"IMAGEFINDER_DB": str(db)}, fake_model=True) as server:
        remote = run("search", str(query), "--server", server.url, "-k", "4")
        not_image = tmp_path / "notes.jpg"
        not_image.write_text("shopping list")
        refused = run("search", str(not_image), "--server", server.url + "/")
        # What makes it quick: the command loads no model, and not even torch.
        alone = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "imagefinder", "search", str(query),
             "--server", server.url, "-k", "4"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout == local.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in alone.stderr.splitlines()}
    assert "imagefinder.cli" in imported and "torch" not in imported
    assert remote.exit_code == 0, remote.output
    assert remote.stdout == local.stdout
    assert remote.stdout.splitlines()[0] == "0.0000  p2  [exact]"  # the query itself
    assert refused.exit_code == 1
    assert refused.stderr.startswith(f"Error: {server.url} answered 400: not a supported image")


def test_search_with_no_server_there_is_one_line(tmp_path):
    query = tmp_path / "q.jpg"
    query.write_bytes(image_bytes())
    url = f"http://127.0.0.1:{free_port()}"
    result = run("search", str(query), "--server", url)
    assert result.exit_code == 1
    port = url.rsplit(":", 1)[1]
    assert result.stderr == f"Error: cannot reach {url}: connection refused by 127.0.0.1:{port}\n"
    both = run("search", str(query), "--server", url, "--db", str(tmp_path / "x.db"))
    assert both.exit_code == 2 and "--db and --server exclude each other" in both.stderr
    bad = run("search", str(query), "--server", "127.0.0.1:8000")
    assert bad.exit_code == 1 and "is not an http(s) URL" in bad.stderr


def test_the_readme_starts_offline_and_says_to_activate_the_venv():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert quick_start.index("make demo") < quick_start.index("make run")
    assert "source .venv/bin/activate" in quick_start
