"""Every writer at once, killed at random: two API server processes and a pruning
extraction on one index and one folder, with SIGKILLs landing mid-write.

At the end the index is consistent (SQLite: ``integrity_check`` ok and its tables
agreeing row for row; PostgreSQL: its row count agreeing with its table) and every
acknowledged write is there: an id whose last acknowledged request added an image holds
exactly that image, one whose last acknowledged request deleted it is gone. (A request
cut off by a kill may have happened or not: its id may hold either state.)
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import fake_model
import requests
from support import ROOT, LiveServer, image_bytes

from imagefinder.store import open_store
from imagefinder.store.sqlite import connect

SEED = int(os.environ.get("CRASH_SEED", time.time_ns() % 10_000))
TOKEN = "crash-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
API_IDS = [f"api-{i}" for i in range(8)]


def content(image_id: str, n: int) -> bytes:
    fmt = ("JPEG", "PNG", "GIF")[n % 3]
    colour = ((37 * n) % 256, (11 * len(image_id) + 7 * n) % 256, 90)
    return image_bytes((40 + n % 5, 30), colour, fmt=fmt)


class Client(threading.Thread):
    """Adds, replaces and deletes its own ids in order, noting what was acknowledged."""

    def __init__(self, ids: list[str], servers: list[LiveServer], rng: random.Random):
        super().__init__(daemon=True)
        self.ids, self.servers, self.rng = ids, servers, rng
        self.stop = threading.Event()
        # id -> ("add", sha) or ("delete", None): the last acknowledged write
        self.acked: dict[str, tuple[str, str | None]] = {}
        # ids whose last request got no answer (its server was killed): either state
        self.unsure: set[str] = set()
        self.n = 0

    def run(self) -> None:
        while not self.stop.is_set():
            image_id = self.rng.choice(self.ids)
            server = self.rng.choice(self.servers)
            self.n += 1
            try:
                if image_id in self.acked and self.rng.random() < 0.3:
                    r = requests.delete(f"{server.url}/images/{image_id}", headers=AUTH, timeout=30)
                    op: tuple[str, str | None] = ("delete", None)
                    ok = r.status_code in (200, 404)
                else:
                    data = content(image_id, self.n)
                    r = requests.post(
                        server.url + "/images",
                        headers=AUTH,
                        timeout=30,
                        files={"file": ("x", data)},
                        data={"id": image_id},
                    )
                    op = ("add", hashlib.sha256(data).hexdigest())
                    ok = r.status_code == 201
            except requests.RequestException:
                self.unsure.add(image_id)
                continue
            if r.status_code >= 500 and r.status_code != 503:
                raise AssertionError(f"{r.status_code}: {r.text}")
            if ok:
                self.acked[image_id] = op
                self.unsure.discard(image_id)


def extract(folder: Path, db: str) -> subprocess.Popen:
    args = f"--folder {folder} --db {db} --prune --batch-size 2 --model {fake_model.NAME}"
    cmd = fake_model.command("extract_image_features.py", *args.split())
    env = {**os.environ, "IMAGEFINDER_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def test_killed_servers_and_extractions_lose_no_acknowledged_write(db_location, tmp_path):
    rng = random.Random(SEED)
    folder = tmp_path / "images"  # the API writes where extract reads
    folder.mkdir()
    for i in range(16):
        (folder / f"photo-{i:02d}.jpg").write_bytes(content(f"photo-{i}", i))
    first = extract(folder, db_location)
    assert first.wait(120) == 0
    env = {
        "IMAGEFINDER_DB": db_location,
        "IMAGEFINDER_IMAGES_DIR": str(folder),
        "IMAGEFINDER_API_TOKEN": TOKEN,
    }
    log = tmp_path / "servers.log"
    servers = [LiveServer(env, fake_model=True, log=log) for _ in range(2)]
    client = Client(API_IDS, servers, rng)
    client.start()
    kills = {"server": 0, "extract": 0}
    try:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            # The folder changes under extract too: files come and go.
            i = rng.randrange(16, 40)
            path = folder / f"photo-{i:02d}.jpg"
            path.unlink() if path.exists() else path.write_bytes(content(f"photo-{i}", i))
            run = extract(folder, db_location)
            time.sleep(rng.uniform(0.2, 1.5))
            if run.poll() is None:
                run.send_signal(signal.SIGKILL)
                kills["extract"] += 1
            run.wait()
            if rng.random() < 0.35:
                victim = rng.randrange(2)
                servers[victim].proc.send_signal(signal.SIGKILL)
                servers[victim].proc.wait()
                kills["server"] += 1
                servers[victim].stop()
                servers[victim] = LiveServer(env, fake_model=True, log=log)
                client.servers = servers
    finally:
        client.stop.set()
        client.join(60)
        for server in servers:
            server.stop()
    assert kills["extract"] >= 2 and kills["server"] >= 1, (SEED, kills)
    assert client.acked, "no write was acknowledged"

    def check_acknowledged() -> dict:
        store = open_store(db_location)
        states = store.file_states()
        store.close()
        for image_id, (op, digest) in client.acked.items():
            if image_id in client.unsure:
                continue
            if op == "add":
                assert image_id in states, (SEED, image_id)
                assert states[image_id].sha256 == digest, (SEED, image_id)
                assert Path(states[image_id].path).is_file(), (SEED, image_id)
            else:
                assert image_id not in states, (SEED, image_id)
        for image_id, state in states.items():  # no row without its file
            if image_id not in client.unsure:
                assert Path(state.path).is_file(), (SEED, image_id)
        return states

    check_acknowledged()  # as the kills left it
    # A last, uninterrupted extraction picks up files whose rows a kill cut off.
    assert extract(folder, db_location).wait(120) == 0
    states = check_acknowledged()
    store = open_store(db_location)
    if store.kind == "sqlite":
        store.close()
        conn = connect(db_location)
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute("SELECT rowid, embedding FROM images ORDER BY rowid").fetchall()
        vecs = conn.execute("SELECT rowid, embedding FROM vec_images ORDER BY rowid").fetchall()
        assert [r[0] for r in rows] == [v[0] for v in vecs]
        assert all(r[1] == v[1] for r, v in zip(rows, vecs, strict=True))
        conn.close()
    else:
        import psycopg

        with psycopg.connect(db_location) as conn:
            counted = conn.execute("SELECT count(*) FROM imagefinder_images").fetchone()[0]
            kept = conn.execute("SELECT rows FROM imagefinder_stats").fetchone()[0]
        assert counted == kept == len(states)
        store.close()
    print(f"seed {SEED}: kills {kills}, {client.n} requests, {len(client.acked)} ids acked")
