"""Load test: concurrent clients uploading real photos to a live server on 127.0.0.1.

    python bench/loadtest.py                       # 60 s, 8 clients, Caltech index
    python bench/loadtest.py --duration 20 --clients 4 --db data/imagefinder.db
    python bench/loadtest.py --commit              # also refresh bench/results/loadtest.*

Starts ``uvicorn main:app`` over an efficientnet-lite0 index of the Caltech photos
(built once through the real extract command into the bench cache, or ``--db``),
warms it up, then for ``--duration`` seconds ``--clients`` threads POST Caltech JPEGs
to /similarity-search while one more thread samples /health. Reports requests,
errors, latency percentiles, /health latency under load and the server's RSS
(VmRSS of the uvicorn process) before and after; writes
bench/results/loadtest-<time>.{json,md} (git-ignored), and the tracked
bench/results/loadtest.{json,md} that the README quotes only with ``--commit``.
Targets: zero errors, RSS growth after warm-up under 10%, /health p99 under 100 ms.
Exits 1 if a target is missed. A ``--db`` that is missing or holds no vectors is
refused before anything starts: every request would be an error. Bounded in time;
loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(BENCH)]

from corpus import CACHE, caltech_photos  # noqa: E402
from support import LiveServer  # noqa: E402

from imagefinder.errors import ImageFinderError  # noqa: E402
from imagefinder.store import open_store  # noqa: E402

RESULTS = BENCH / "results"
TARGETS = {"errors": 0, "rss_growth_pct": 10.0, "health_p99_ms": 100.0}


def build_index(db: Path) -> None:
    """The Caltech photos embedded with efficientnet-lite0, through the real CLI."""
    folder = caltech_photos()[0].parent.parent
    cmd = [sys.executable, "extract_image_features.py", "--folder", str(folder)]
    cmd += ["--db", str(db), "--model", "efficientnet-lite0"]
    print(f"indexing {folder} into {db} ...", file=sys.stderr)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=sys.stderr)


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    arr = np.asarray(values) * 1000
    p50, p95, p99 = (float(v) for v in np.percentile(arr, [50, 95, 99]))
    return {"p50": p50, "p95": p95, "p99": p99, "max": float(arr.max())}


class Load:
    """``clients`` threads searching, one thread sampling /health, until stopped."""

    def __init__(self, url: str, photos: list[bytes], clients: int):
        self.url = url
        self.photos = photos
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.health: list[float] = []
        self.errors: list[str] = []
        self.in_flight = 0
        self.threads = [threading.Thread(target=self._client, args=(n,)) for n in range(clients)]
        self.threads.append(threading.Thread(target=self._health))

    def reset(self) -> None:
        with self.lock:
            self.latencies, self.health, self.errors = [], [], []

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def _client(self, n: int) -> None:
        rng = random.Random(n)
        with requests.Session() as session:
            while not self.stop.is_set():
                data = rng.choice(self.photos)
                with self.lock:
                    self.in_flight += 1
                started = time.perf_counter()
                try:
                    r = session.post(
                        self.url + "/similarity-search",
                        files={"file": ("q.jpg", data, "image/jpeg")},
                        data={"k": "3"},
                        timeout=60,
                    )
                    error = (
                        None
                        if r.status_code == 200 and r.json()["results"]
                        else (f"{r.status_code} {r.text[:120]}")
                    )
                except requests.RequestException as e:
                    error = f"{type(e).__name__}: {e}"
                elapsed = time.perf_counter() - started
                with self.lock:
                    self.in_flight -= 1
                    self.latencies.append(elapsed)
                    if error:
                        self.errors.append(error)

    def _health(self) -> None:
        with requests.Session() as session:
            while not self.stop.wait(0.2):
                with self.lock:
                    busy = self.in_flight > 0
                started = time.perf_counter()
                try:
                    ok = session.get(self.url + "/health", timeout=10).status_code == 200
                except requests.RequestException:
                    ok = False
                elapsed = time.perf_counter() - started
                with self.lock:
                    if not ok:
                        self.errors.append("/health failed")
                    elif busy:  # only samples taken while searches were in flight count
                        self.health.append(elapsed)


def check_index(db: Path) -> str | None:
    """Why ``db`` cannot be load-tested, or None."""
    if not db.is_file():
        return f"{db}: no such index; build one with python extract_image_features.py"
    store = open_store(str(db), create=False)
    try:
        count = store.count()
    except ImageFinderError as e:
        return f"{db}: {e.message}"
    finally:
        store.close()
    return None if count else f"{db}: the index holds no vectors; every search would fail"


def run(args: argparse.Namespace) -> dict:
    db = Path(args.db) if args.db else CACHE / "caltech-lite0.db"
    photos = [p.read_bytes() for p in caltech_photos()]
    if not args.db and open_store(db).count() != len(photos):
        db.parent.mkdir(parents=True, exist_ok=True)
        build_index(db)  # incremental: an interrupted build resumes
    env = {"IMAGEFINDER_DB": str(db)}
    # One log line per request: to a file in the bench cache, not over the report.
    CACHE.mkdir(parents=True, exist_ok=True)
    with LiveServer(env, log=CACHE / "server-loadtest.log") as server:
        pid = server.proc.pid
        health = requests.get(server.url + "/health", timeout=10).json()
        rss_start = rss_mb(pid)
        load = Load(server.url, photos, args.clients)
        load.start()
        time.sleep(args.warmup)
        rss_before = rss_mb(pid)
        load.reset()
        started = time.perf_counter()
        time.sleep(args.duration)
        rss_after = rss_mb(pid)
        rss_peak = rss_mb(pid, "VmHWM")
        load.finish()
        elapsed = time.perf_counter() - started
    with load.lock:
        latencies, health_times, errors = load.latencies, load.health, load.errors
    growth = 100.0 * (rss_after - rss_before) / rss_before
    result = {
        "command": " ".join(["python bench/loadtest.py", *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg()[0],
        },
        "index": {"model": health.get("model"), "vectors": health.get("vectors")},
        "clients": args.clients,
        "warmup_s": args.warmup,
        "duration_s": round(elapsed, 1),
        "requests": len(latencies),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        # Answered searches only: a failing server must not look fast.
        "throughput_rps": round((len(latencies) - len(errors)) / elapsed, 2),
        "latency_ms": {k: round(v, 1) for k, v in percentiles(latencies).items()},
        "health_samples": len(health_times),
        "health_ms_under_load": {k: round(v, 1) for k, v in percentiles(health_times).items()},
        "rss_mb": {
            "at_start": round(rss_start, 1),
            "after_warmup": round(rss_before, 1),
            "at_end": round(rss_after, 1),
            "peak": round(rss_peak, 1),
            "growth_after_warmup_pct": round(growth, 2),
        },
    }
    result["targets"] = {
        "zero_errors": len(errors) == TARGETS["errors"],
        "rss_growth_under_10pct": growth < TARGETS["rss_growth_pct"],
        "health_p99_under_100ms": result["health_ms_under_load"]["p99"] < TARGETS["health_p99_ms"],
    }
    return result


def markdown(r: dict) -> str:
    lat, health, rss = r["latency_ms"], r["health_ms_under_load"], r["rss_mb"]
    verdict = {True: "met", False: "MISSED"}
    rows = [
        ("Command", f"`{r['command'].strip()}`"),
        ("Index", f"{r['index']['model']}, {r['index']['vectors']} vectors"),
        (
            "Clients / duration",
            f"{r['clients']} / {r['duration_s']} s after {r['warmup_s']} s warm-up",
        ),
        ("Requests (errors)", f"{r['requests']} ({r['errors']})"),
        ("Throughput", f"{r['throughput_rps']} searches/s"),
        ("Search latency p50 / p95 / p99 / max", "{p50} / {p95} / {p99} / {max} ms".format(**lat)),
        (
            "/health under load p50 / p95 / p99 / max",
            "{p50} / {p95} / {p99} / {max} ms".format(**health),
        ),
        (
            "Server RSS start / after warm-up / end / peak",
            f"{rss['at_start']} / {rss['after_warmup']} / {rss['at_end']} / {rss['peak']} MB",
        ),
        ("RSS growth after warm-up", f"{rss['growth_after_warmup_pct']} %"),
        (
            "Machine",
            f"{r['machine']['cpus']} CPUs, load average {r['machine']['load_average_at_end']:.1f} at the end",
        ),
    ]
    rows += [
        (f"Target: {name.replace('_', ' ')}", verdict[ok]) for name, ok in r["targets"].items()
    ]
    lines = ["# Load test", "", f"Run {r['when']}.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds (60)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent uploaders (8)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring (10)")
    parser.add_argument("--db", help="an existing index to serve (default: build the Caltech one)")
    parser.add_argument(
        "--out", help="results path stem (default: bench/results/loadtest-<time>, untracked)"
    )
    parser.add_argument(
        "--commit",
        action="store_true",
        help="also write the tracked bench/results/loadtest.{json,md} the README quotes",
    )
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 1 <= args.duration <= 3600:
        parser.error("--clients must be 1..64 and --duration 1..3600 seconds")
    if args.db and (problem := check_index(Path(args.db))):
        parser.exit(2, f"loadtest.py: error: {problem}\n")
    result = run(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    outs = [Path(args.out) if args.out else RESULTS / f"loadtest-{stamp}"]
    if args.commit:
        outs.append(RESULTS / "loadtest")
    print(markdown(result))
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0 if all(result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
