"""Crash safety: the real entry points killed with SIGKILL mid-run, then run again.

A killed extraction leaves the index consistent and resumable; a killed download
leaves no half file under a real name and a re-run finishes the rest.
"""

from __future__ import annotations

import csv
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fake_model
import pytest
from PIL import Image
from support import ROOT

from imagefinder.files import TEMP_PREFIX
from imagefinder.indexer import index_folder
from imagefinder.store import open_store
from imagefinder.store.sqlite import connect

SEED = int(os.environ.get("CRASH_SEED", time.time_ns() % 10_000))


def jpeg(i: int, size=(96, 72)) -> bytes:
    """A distinct small picture per ``i`` (colour, and a block whose place moves)."""
    img = Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
    x = (i * 7) % (size[0] - 20)
    img.paste((255 - (i * 37) % 256, 40, 200), (x, 10, x + 20, 50))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def kill_after_progress(
    cmd: list[str],
    progressed,
    rng: random.Random,
    max_delay: float,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> int:
    """Start ``cmd``; once ``progressed()`` is true, wait a random moment and SIGKILL it.
    Returns the process's return code (-9 when killed, 0 if it finished first)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env or ENV
    )
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not progressed():
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{cmd} made no progress in {timeout}s")
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, max_delay))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return proc.wait()


ENV = {**os.environ, "IMAGEFINDER_THREADS": "1"}
# The fake model embeds in microseconds; a run killed "mid-run" needs one that takes a
# while, as a real model's does (see fake_model.py).
SLOW_MODEL = {**ENV, "FAKE_MODEL_BATCH_SECONDS": "0.05"}


# -- extraction --------------------------------------------------------------------------

VALID = 60
INVALID = {
    "aa-truncated.jpg": lambda: jpeg(999)[:700],
    "ab-empty.jpg": lambda: b"",
    "ac-html.gif": lambda: b"GIF89a<html><script>alert(1)</script></html>",
    "ad-text.png": lambda: b"not a png at all\n" * 10,
}


def indexed_rows(db: Path) -> int:
    if not db.exists():
        return 0
    conn = connect(db)
    try:
        return conn.execute("SELECT count(*) FROM images").fetchone()[0]
    except Exception:  # the schema is not there yet
        return 0
    finally:
        conn.close()


def test_a_killed_extraction_leaves_a_consistent_index_that_resumes(tmp_path, model):
    rng = random.Random(SEED)
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for i in range(VALID):
        sub = folder / "more" if i % 4 == 0 else folder
        (sub / f"img-{i:03d}.jpg").write_bytes(jpeg(i))
    for name, make in INVALID.items():
        (folder / name).write_bytes(make())
    files_before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    db = tmp_path / "db" / "index.db"
    cmd = fake_model.command("extract_image_features.py", "--folder", str(folder), "--db", str(db))
    cmd += ["--model", fake_model.NAME, "--batch-size", "3"]

    progress = []  # (return code, rows indexed) per killed run
    for _ in range(3):
        seen = indexed_rows(db)
        # Short delays against the model's 0.05 s a batch: the third kill still lands
        # mid-run, however fast the rest of the pipeline is.
        code = kill_after_progress(
            cmd, lambda seen=seen: indexed_rows(db) > seen, rng, 0.15, env=SLOW_MODEL
        )
        progress.append((code, indexed_rows(db)))
        if code == 0:
            break
    killed_mid_run = [n for code, n in progress if code == -signal.SIGKILL and n < VALID]
    assert len(killed_mid_run) >= 2, f"seed {SEED}: kills did not land mid-run: {progress}"

    final = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    print(f"seed {SEED}: killed runs {progress}; final: {final.stderr.splitlines()[-1]}")
    for name in INVALID:  # refused again, each by name, with a reason
        assert any(name in line and "skipping" in line for line in final.stderr.splitlines()), (
            name,
            final.stderr,
        )

    conn = connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        ids = [r[0] for r in conn.execute("SELECT id FROM images")]
        expected = {f"{'more/' if i % 4 == 0 else ''}img-{i:03d}" for i in range(VALID)}
        assert len(ids) == len(set(ids)) == VALID, f"seed {SEED}: {progress}"
        assert set(ids) == expected
        rows = conn.execute("SELECT rowid, embedding FROM images ORDER BY rowid").fetchall()
        vecs = conn.execute("SELECT rowid, embedding FROM vec_images ORDER BY rowid").fetchall()
        assert [r[0] for r in rows] == [v[0] for v in vecs]  # same rowids, row for row
        assert all(r[1] == v[1] for r, v in zip(rows, vecs, strict=True))  # same vectors
    finally:
        conn.close()

    # Nothing left behind: the folder is as it was, the index is one file.
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == files_before
    assert [p.name for p in db.parent.iterdir()] == ["index.db"]
    # And a further run has nothing to do but refuse the same four files again.
    summary = index_folder(folder, open_store(db), model)
    assert (summary.indexed, summary.unchanged, summary.skipped) == (0, VALID, len(INVALID))


# -- download ----------------------------------------------------------------------------

IMAGES = 24


class SlowImages:
    """127.0.0.1 serving ``/<i>.jpg``: a distinct JPEG trickled out over ~0.4 s."""

    def __init__(self):
        self.bodies = {f"img{i:02d}": jpeg(i, size=(320, 240)) for i in range(IMAGES)}
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                image_id = self.path.strip("/").removesuffix(".jpg")
                server.hits.append(image_id)
                body = server.bodies[image_id]
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                step = len(body) // 8 + 1
                for start in range(0, len(body), step):
                    self.wfile.write(body[start : start + step])
                    self.wfile.flush()
                    time.sleep(0.05)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # a killed client: not news
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_killed_download_leaves_no_half_file_and_a_rerun_finishes(tmp_path):
    rng = random.Random(SEED)
    server = SlowImages()
    csv_path = tmp_path / "catalogue.csv"
    csv_path.write_text("url,id\n" + "".join(f"{server.base}/{i}.jpg,{i}\n" for i in server.bodies))
    out = tmp_path / "images"
    cmd = [sys.executable, "download_images.py", "--csv_file", str(csv_path)]
    cmd += ["--output-dir", str(out), "--workers", "4", "--allow-private"]

    def complete_files() -> dict[str, bytes]:
        if not out.exists():
            return {}
        return {p.stem: p.read_bytes() for p in out.iterdir() if p.suffix == ".jpg"}

    try:
        for _ in range(2):
            have = len(complete_files())
            code = kill_after_progress(
                cmd, lambda have=have: len(complete_files()) > have, rng, max_delay=0.4
            )
            assert code == -signal.SIGKILL, "the download finished before it could be killed"
            # Whatever sits under a real name is whole: the exact bytes served.
            for image_id, data in complete_files().items():
                assert data == server.bodies[image_id], f"half file {image_id}.jpg (seed {SEED})"
            names = {p.name for p in out.iterdir()}
            assert all(n.startswith(TEMP_PREFIX) or n.endswith(".jpg") for n in names), names
        done_before = set(complete_files())
        assert 0 < len(done_before) < IMAGES

        server.hits.clear()
        final = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    finally:
        server.close()
    assert final.returncode == 0, final.stderr
    assert complete_files() == server.bodies
    assert sorted(server.hits) == sorted(set(server.bodies) - done_before)  # only the rest
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{i}.jpg" for i in server.bodies] + ["manifest.csv"]
    )  # no temporary file left
    with open(out / "manifest.csv", newline="") as f:
        status = {row["id"]: row["status"] for row in csv.DictReader(f)}
    assert status == {i: ("skipped" if i in done_before else "downloaded") for i in server.bodies}


# -- the inverted file ---------------------------------------------------------------------

WRITER = """
import sys, numpy as np
sys.path.insert(0, "tests")
from support import clustered_vectors
from imagefinder.store import Item
from imagefinder.store.sqlite import SQLiteStore

db, total = sys.argv[1], int(sys.argv[2])
vectors = clustered_vectors(total, 64, seed=3)
# From 2,000 on, every fifth vector is of one new, tight kind: they crowd a few lists,
# which inserts split between rebuilds.
rng = np.random.default_rng(4)
tight = np.abs(rng.standard_normal(64) + 0.1 * rng.standard_normal((total, 64)))
vectors[2000::5] = (tight / np.linalg.norm(tight, axis=1, keepdims=True))[2000::5]
store = SQLiteStore(db, fast_min_rows=300)
store.ensure_schema({"model": "m", "weights": "w", "dim": "64", "preprocessing": "p"})
done = store.count() // 50 * 50  # deletes make the count lag: redo a batch or two
for start in range(done, total, 50):  # crosses the threshold, then doubles: rebuilds
    stop = min(start + 50, total)
    batch = [Item(f"v{i}", f"/{i}", "-", 0, 0, vectors[i]) for i in range(start, stop)]
    store.upsert(batch)
    if start % 200 == 0:  # and deletes and replacements along the way
        store.delete([f"v{start - 7}"])
        store.upsert([Item(f"v{start - 3}", "/r", "-", 0, 0, vectors[start - 3] * 0.5)])
"""


def test_a_killed_writer_leaves_the_inverted_file_consistent(tmp_path):
    """SIGKILL while batches, deletes and rebuilds of the inverted file are committing:
    every time, each row is in exactly one list of the current build, and a search
    through every list answers exactly what an exact scan answers."""
    from imagefinder.store import ivf
    from imagefinder.store.sqlite import SQLiteStore

    rng = random.Random(SEED)
    db = tmp_path / "index.db"
    cmd = [sys.executable, "-c", WRITER, str(db), "12000"]
    codes, checked = [], 0
    for round_ in range(4):
        seen = indexed_rows(db)
        code = kill_after_progress(cmd, lambda s=seen: indexed_rows(db) > s, rng, 0.4)
        codes.append(code)
        store = SQLiteStore(db)
        conn = store.conn
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = sorted(r[0] for r in conn.execute("SELECT rowid FROM images"))
        if ivf.exists(conn):
            checked += 1
            coded = sorted(r[0] for r in conn.execute(f"SELECT rowid FROM {ivf.TABLE}"))
            assert coded == rows, f"seed {SEED}, round {round_}, exit {code}"
            lists = conn.execute(f"SELECT count(*) FROM {ivf.CENTROIDS}").fetchone()[0]
            built_at = conn.execute(f"SELECT rows FROM {ivf.STATE}").fetchone()[0]
            assert lists >= ivf.lists_for(built_at)  # more where lists were split
            sizes = dict(conn.execute(f"SELECT list, count(*) FROM {ivf.TABLE} GROUP BY list"))
            assert set(sizes) <= set(range(lists))
            kept = dict(conn.execute(f"SELECT list, size FROM {ivf.LISTS} WHERE size > 0"))
            assert kept == sizes, f"seed {SEED}, round {round_}: list sizes drifted"
            everywhere = SQLiteStore(db, nprobe=10**6, ef_search=4096)
            exact = SQLiteStore(db, exact=True)
            for image_id in ("v5", "v250", "v299"):
                q = exact.vector_of(image_id)
                if q is not None:
                    assert everywhere.knn(q, 5) == exact.knn(q, 5)
        store.close()
        if code == 0:
            break
    assert codes.count(-signal.SIGKILL) >= 2, f"seed {SEED}: kills did not land: {codes}"
    assert checked >= 2, f"seed {SEED}: the inverted file was checked {checked} times"
