"""Section 3: search latency through the real API (uvicorn on 127.0.0.1).

The floor is what one search must compute anyway: decoding the uploaded 12 MP JPEG
and one forward pass, timed in-process before the server starts. The API adds HTTP,
multipart parsing, the KNN and JSON on top.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from support import LiveServer


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def ms(seconds: list[float]) -> dict:
    return {
        "p50_ms": percentile(seconds, 50) * 1000,
        "p95_ms": percentile(seconds, 95) * 1000,
        "max_ms": max(seconds) * 1000,
        "n": len(seconds),
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def in_process(photo: bytes, model: str, weights: str | None, repeats: int) -> dict:
    """Decode + preprocess + one batch-1 forward, as the server does it, minus HTTP."""
    from imagefinder.config import Settings
    from imagefinder.images import load_rgb
    from imagefinder.model.embedder import load_embedder

    settings = Settings()
    embedder = load_embedder(model, weights, "fp32", settings.threads)
    decode, total = [], []
    for i in range(repeats + 2):
        start = time.perf_counter()
        img = load_rgb(photo, settings.max_pixels, min_side=embedder.min_side)
        x = embedder.preprocess(img)[None]
        decoded = time.perf_counter()
        embedder.embed_tensors(x)
        end = time.perf_counter()
        if i >= 2:  # the first calls build oneDNN kernels
            decode.append(decoded - start)
            total.append(end - start)
    return {"decode": ms(decode), "decode_plus_forward": ms(total)}


def run_search(db: Path, photo: bytes, model: str, weights: str | None, quick: bool, log) -> dict:
    repeats = 8 if quick else 30
    log("search: in-process floor")
    floor = in_process(photo, model, weights, repeats)
    env = {"IMAGEFINDER_DB": str(db), "IMAGEFINDER_IMAGES_DIR": str(db.parent)}
    if weights:
        env["IMAGEFINDER_WEIGHTS"] = weights
    log("search: starting the server")
    # One log line per request: to a file beside the index, not over the benchmark's output.
    with LiveServer(env, log=db.parent / "server-search-latency.log") as server:
        rss_loaded = rss_mb(server.proc.pid)
        url = server.url + "/similarity-search"

        def search(session: requests.Session) -> float:
            start = time.perf_counter()
            r = session.post(url, files={"file": ("q.jpg", photo, "image/jpeg")}, data={"k": 3})
            elapsed = time.perf_counter() - start
            r.raise_for_status()
            return elapsed

        log("search: 1 client")
        with requests.Session() as s:
            for _ in range(3):
                search(s)
            one = [search(s) for _ in range(repeats)]
        one_throughput = len(one) / sum(one)

        log("search: 8 clients + /health")
        per_client = 3 if quick else 8
        health: list[float] = []
        stop = threading.Event()

        def poll_health() -> None:
            with requests.Session() as s:
                while not stop.is_set():
                    start = time.perf_counter()
                    s.get(server.url + "/health").raise_for_status()
                    health.append(time.perf_counter() - start)
                    stop.wait(0.05)

        def client(_: int) -> list[float]:
            with requests.Session() as s:
                return [search(s) for _ in range(per_client)]

        poller = threading.Thread(target=poll_health)
        start = time.perf_counter()
        poller.start()
        with ThreadPoolExecutor(8) as pool:
            eight = [t for ts in pool.map(client, range(8)) for t in ts]
        wall = time.perf_counter() - start
        stop.set()
        poller.join()
        rss_after = rss_mb(server.proc.pid)
    return {
        "photo_bytes": len(photo),
        "in_process": floor,
        "api_1_client": {**ms(one), "throughput_per_s": one_throughput},
        "api_8_clients": {**ms(eight), "throughput_per_s": len(eight) / wall},
        "health_during_8_clients": ms(health),
        "api_p50_vs_in_process": statistics.median(one)
        / (floor["decode_plus_forward"]["p50_ms"] / 1000),
        "server_rss_mb_after_load": rss_loaded,
        "server_rss_mb_after_searches": rss_after,
    }
