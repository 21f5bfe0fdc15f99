"""The server decodes uploads in worker processes: a decode's memory and its interpreter
lock are theirs, and a decoder that dies takes only its worker down."""

from __future__ import annotations

import os
from pathlib import Path

import hostile_files as hostile
import psutil
import pytest
import requests
from support import LiveServer, image_bytes

from imagefinder.errors import NotAnImage, TooManyPixels
from imagefinder.indexer import index_folder
from imagefinder.server.decoders import Decoders
from imagefinder.store import open_store


def test_workers_decode_like_the_server_would_and_report_the_same_errors():
    decoders = Decoders(1)
    try:
        png = image_bytes((900, 600), (10, 200, 30), fmt="PNG")
        img = decoders.load_rgb(png, 10_000_000, min_side=100)
        assert img.mode == "RGB" and img.size == (150, 100)
        assert img.getpixel((75, 50)) == (10, 200, 30)
        assert decoders.probe(png, 10_000_000) == "PNG"
        with pytest.raises(TooManyPixels):
            decoders.load_rgb(png, 1000)
        with pytest.raises(NotAnImage):
            decoders.load_rgb(b"not an image", 1000)
    finally:
        decoders.close()


def test_a_worker_that_dies_fails_its_request_and_the_next_one_works():
    decoders = Decoders(1)
    try:
        with pytest.raises(NotAnImage, match="crashed the decoder"):
            decoders._run(os._exit, 3)  # what a segfault in a decoder library looks like
        assert decoders.probe(image_bytes(), 10_000) == "JPEG"
    finally:
        decoders.close()


def rss_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


@pytest.mark.sqlite_only
def test_a_large_decode_costs_the_server_process_nothing(tmp_path, model):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(image_bytes())
    store = open_store(tmp_path / "index.db")
    index_folder(folder, store, model)
    store.close()
    env = {"IMAGEFINDER_DB": str(tmp_path / "index.db")}
    with LiveServer(env, fake_model=True, log=tmp_path / "log") as server:
        pid = server.proc.pid
        warm = requests.post(
            server.url + "/similarity-search", files={"file": ("a", image_bytes())}
        )
        assert warm.status_code == 200
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        before = rss_mb(pid, "VmRSS")
        big = hostile.png_rgba(16_000_000)  # 4000 x 4000 RGBA: 64 MB to decode
        r = requests.post(server.url + "/similarity-search", files={"file": ("b", big)})
        assert r.status_code == 200, r.text
        assert rss_mb(pid, "VmHWM") - before < 32  # the 64 MB were the worker's


@pytest.mark.sqlite_only
def test_decoder_workers_end_when_the_server_is_killed(tmp_path, model):
    """A SIGKILLed server leaves no decoder behind: each held ~100s of MB, forever."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(image_bytes())
    store = open_store(tmp_path / "index.db")
    index_folder(folder, store, model)
    store.close()
    env = {"IMAGEFINDER_DB": str(tmp_path / "index.db"), "IMAGEFINDER_DECODE_PROCESSES": "2"}
    with LiveServer(env, fake_model=True, log=tmp_path / "log") as server:
        for _ in range(3):
            found = requests.post(
                server.url + "/similarity-search", files={"file": ("a", image_bytes())}
            )
            assert found.status_code == 200, found.text
        descendants = psutil.Process(server.proc.pid).children(recursive=True)
        assert descendants, "the server started no decoder process"
        server.proc.kill()
        server.proc.wait(timeout=10)
        gone, alive = psutil.wait_procs(descendants, timeout=15)
        assert alive == [], [p.cmdline()[:3] for p in alive]
