"""Concurrency: one SQLite index, readers and writers at once, no "database is locked".

The index runs in WAL mode (readers never wait for a writer) with a busy timeout
(writers queue instead of failing). The live test puts the whole service under that
load: 8 clients searching while the API and an extraction process both write.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import fake_model
import numpy as np
import pytest
import requests
from support import ROOT, LiveServer, image_bytes

from imagefinder.indexer import index_folder
from imagefinder.store import Item, open_store
from imagefinder.store.sqlite import SQLiteStore, connect

TOKEN = "concurrency-token"
IDENTITY = {"model": "test", "weights": "none", "dim": "4", "preprocessing": "none"}


def item(i: int) -> Item:
    vector = np.full(4, i + 1, dtype=np.float32)
    return Item(f"x{i}", f"/x{i}.jpg", "0" * 64, 1, 1, vector / np.linalg.norm(vector))


def test_every_connection_is_wal_with_a_busy_timeout(tmp_path):
    conn = connect(tmp_path / "index.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 10_000
    conn.close()
    store = SQLiteStore(tmp_path / "index.db")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_readers_do_not_wait_for_a_writer_and_writers_queue(tmp_path):
    store = SQLiteStore(tmp_path / "index.db")
    store.ensure_schema(IDENTITY)
    store.upsert([item(0)])
    held = threading.Event()
    release = threading.Event()

    def slow_writer():
        writer = SQLiteStore(tmp_path / "index.db")
        with writer.transaction() as conn:  # BEGIN IMMEDIATE: the write lock, held
            conn.execute("UPDATE images SET size = 2")
            held.set()
            release.wait(10)
        writer.close()

    thread = threading.Thread(target=slow_writer)
    thread.start()
    assert held.wait(10)
    # A reader is answered at once, from the last committed state.
    started = time.monotonic()
    assert store.count() == 1
    assert store.file_state("x0").size == 1
    assert time.monotonic() - started < 0.5
    # A second writer waits for the lock instead of failing with "database is locked".
    threading.Timer(0.5, release.set).start()
    started = time.monotonic()
    assert store.upsert([item(1)]) == 1
    assert time.monotonic() - started >= 0.4
    thread.join()
    assert store.count() == 2
    assert store.file_state("x0").size == 2


SEEDS = 12  # photos indexed before the server starts
EXTRACTED = 40  # generated pictures the extraction adds, one commit each


def photos(caltech_dir: Path) -> list[Path]:
    return sorted(caltech_dir.glob("*/*.jpg"))


@pytest.fixture
def live_index(tmp_path, caltech_dir, model):
    """12 Caltech photos indexed (the fake model), and a server over them with writes
    enabled."""
    seeds = {p.parent.name + "/" + p.stem for p in photos(caltech_dir)[::40][:SEEDS]}
    store = open_store(tmp_path / "index.db")
    summary = index_folder(caltech_dir, store, model, select=seeds.__contains__)
    store.close()
    assert summary.indexed == SEEDS
    env = {
        "IMAGEFINDER_DB": str(tmp_path / "index.db"),
        "IMAGEFINDER_IMAGES_DIR": str(tmp_path / "catalogue"),
        "IMAGEFINDER_API_TOKEN": TOKEN,
    }
    with LiveServer(env, fake_model=True) as server:
        yield server, tmp_path


def test_searches_keep_answering_while_the_api_and_an_extraction_write(live_index, caltech_dir):
    server, tmp_path = live_index
    queries = [p.read_bytes() for p in photos(caltech_dir)[5::50]]
    uploads = [p.read_bytes() for p in photos(caltech_dir)[7::31][:16]]
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i in range(EXTRACTED):
        (folder / f"gen-{i:02d}.jpg").write_bytes(image_bytes((200, 150), (6 * i, 90, 250 - 6 * i)))

    writing = threading.Event()
    writing.set()
    outcomes: Counter[str] = Counter()
    problems: list[str] = []
    lock = threading.Lock()

    def record(what: str, response: requests.Response | None, error: str = "") -> None:
        with lock:
            if response is not None and response.ok:
                outcomes[what] += 1
            else:
                detail = error or f"{response.status_code} {response.text[:200]}"
                problems.append(f"{what}: {detail}")

    def searcher(seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as session:
            while writing.is_set():
                try:
                    response = session.post(
                        server.url + "/similarity-search",
                        files={"file": ("q.jpg", rng.choice(queries))},
                        timeout=60,
                    )
                    record("search", response)
                except requests.RequestException as e:
                    record("search", None, repr(e))

    def api_writer() -> None:
        """From the extraction's first commit until it exits, and at least once each:
        post the uploads (a second round replaces the first), so the two really write
        at the same time however fast the model is."""
        store = open_store(tmp_path / "index.db")
        while extraction.poll() is None and store.count() == SEEDS:
            time.sleep(0.005)
        store.close()
        with requests.Session() as session:
            for n in itertools.count():
                if n >= len(uploads) and extraction.poll() is not None:
                    break
                response = session.post(
                    server.url + "/images",
                    files={"file": ("u.jpg", uploads[n % len(uploads)])},
                    data={"id": f"api-{n % len(uploads):02d}"},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    timeout=60,
                )
                record("post", response)
                if extraction.poll() is None and response.ok:
                    with lock:
                        outcomes["post while extracting"] += 1

    searchers = [threading.Thread(target=searcher, args=(n,)) for n in range(8)]
    for t in searchers:
        t.start()
    cmd = fake_model.command("extract_image_features.py", "--folder", str(folder))
    cmd += ["--db", str(tmp_path / "index.db"), "--batch-size", "1"]
    # A tenth of a second per image: the run lasts seconds, so the API's writes overlap it
    # however fast the fake model and however busy the machine.
    env = {**os.environ, "IMAGEFINDER_THREADS": "1", "FAKE_MODEL_BATCH_SECONDS": "0.1"}
    extraction = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    writer = threading.Thread(target=api_writer)
    writer.start()
    _, extract_err = extraction.communicate(timeout=300)
    writer.join()
    writing.clear()
    for t in searchers:
        t.join()

    assert extraction.returncode == 0, extract_err
    assert "locked" not in extract_err
    assert problems == [], problems[:5]
    assert outcomes["post"] >= len(uploads)
    assert outcomes["post while extracting"] >= 1, outcomes
    assert outcomes["search"] >= 8, outcomes  # every search was answered, and there were some
    health = requests.get(server.url + "/health", timeout=10).json()
    assert health["vectors"] == SEEDS + len(uploads) + EXTRACTED

    conn = connect(tmp_path / "index.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rowids = [r[0] for r in conn.execute("SELECT rowid FROM images ORDER BY rowid")]
    assert rowids == [r[0] for r in conn.execute("SELECT rowid FROM vec_images ORDER BY rowid")]
    conn.close()
