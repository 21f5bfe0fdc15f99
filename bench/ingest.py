"""Ingestion benchmark: the 500 Caltech photos served by a local HTTP server, three ways.

    python bench/ingest.py                  # prints a table
    python bench/ingest.py --commit         # ...and writes bench/results/ingest.{json,md}
    python bench/ingest.py --model efficientnet-lite0 --skip-ray

Paths, each a fresh output folder and index, each a real command in a subprocess:

- (a) ``imagefinder download``, then ``imagefinder extract``;
- (b) ``imagefinder ingest`` (download and embed in one streaming pass);
- (c) ``imagefinder ingest --engine ray`` on a Ray cluster the command starts on this
  machine, with 1 and with 2 embedding actors (0.5 CPU each). Its time includes starting
  the cluster: that is what Ray costs on one machine.

For each: wall seconds, images/s, and the peak RSS of the process tree (sampled every
0.1 s: the command and every process it started, Ray's included; shared pages count
once per process, as they do against the machine's memory).

Then the search latency of a live server (the index from (b)): p50/p95 of sequential
``POST /similarity-search`` while idle, and while the server runs an ingestion job of
the same 500 photos under new ids (POST /jobs), with the job's own images/s.

The model is efficientnet-lite0 (offline weights; resnet50's are not on this machine).
Loopback only. Run under the heavy lock: the figures are ratios of one run on one
machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(BENCH)]  # this checkout first

from file_server import FileServer  # noqa: E402
from support import CALTECH, LiveServer  # noqa: E402

RESULTS = BENCH / "results"
TOKEN = "bench-ingest-token"


LIMIT = [0]  # --limit: the first N photos only (a quick check of the script itself)


def catalogue(server: FileServer, path: Path, prefix: str = "") -> int:
    """A url,id CSV of every Caltech photo on ``server``; returns the row count."""
    rows = []
    photos = sorted(CALTECH.glob("*/*.jpg"))
    for photo in photos[: LIMIT[0] or len(photos)]:
        rel = photo.relative_to(CALTECH).as_posix()
        rows.append(f"{server.url(rel)},{prefix}{rel.replace('/', '__')[:-4]}")
    path.write_text("url,id\n" + "\n".join(rows) + "\n")
    return len(rows)


class PeakRSS:
    """The largest summed RSS of a process and its descendants, sampled every 0.1 s."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak = 0
        # The same tree's proportional set size: shared pages (libraries, Ray's object
        # store) split between the processes sharing them, so it sums to real memory.
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = pss = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    info = p.memory_full_info()
                    total += info.rss
                    pss += info.pss
            self.peak = max(self.peak, total)
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(0.1)

    def stop(self) -> tuple[float, float]:
        """(peak RSS MB, peak PSS MB) of the tree."""
        self._stop.set()
        self._thread.join()
        return round(self.peak / 2**20, 1), round(self.peak_pss / 2**20, 1)


def command(args: list[str], log: Path) -> tuple[float, tuple[float, float], str]:
    """Run ``python -m imagefinder ARGS``; (seconds, peak tree RSS and PSS MB, output)."""
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imagefinder", *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        rss = PeakRSS(proc.pid)
        code = proc.wait()
        peak = rss.stop()
    seconds = time.monotonic() - started
    text = log.read_text()
    if code != 0:
        raise SystemExit(f"imagefinder {' '.join(args)} failed ({code}):\n{text[-2000:]}")
    return round(seconds, 2), peak, text


def path_row(
    name: str, images: int, seconds: float, peak: tuple[float, float], **extra: object
) -> dict:
    return {
        "path": name,
        "images": images,
        "seconds": seconds,
        "images_per_s": round(images / seconds, 2),
        "peak_rss_mb": peak[0],
        "peak_pss_mb": peak[1],
        **extra,
    }


def paths(work: Path, csv_path: Path, n: int, model: str, ray: bool) -> list[dict]:
    rows = []
    a = work / "a"
    d_s, d_rss, _ = command(
        ["download", "--csv_file", str(csv_path), "--output-dir", str(a / "images"),
         "--allow-private"], work / "a-download.log",
    )  # fmt: skip
    e_s, e_rss, _ = command(
        ["extract", "--folder", str(a / "images"), "--db", str(a / "index.db"),
         "--model", model], work / "a-extract.log",
    )  # fmt: skip
    rows.append(
        path_row(
            "(a) download, then extract", n, round(d_s + e_s, 2), max(d_rss, e_rss),
            stages={"download_s": d_s, "extract_s": e_s},
        )
    )  # fmt: skip
    print(rows[-1], flush=True)
    b = work / "b"
    s, rss, _ = command(
        ["ingest", "--csv", str(csv_path), "--output-dir", str(b / "images"),
         "--db", str(b / "index.db"), "--model", model, "--allow-private"], work / "b.log",
    )  # fmt: skip
    rows.append(path_row("(b) ingest, streaming", n, s, rss))
    print(rows[-1], flush=True)
    if ray:
        # 1 actor, 2 actors, then 1 again: the first start of Ray on a machine also warms
        # its disk caches, so the third row is 1 actor without that.
        for run, actors in enumerate((1, 2, 1)):
            c = work / f"c{run}"
            s, rss, _ = command(
                ["ingest", "--csv", str(csv_path), "--output-dir", str(c / "images"),
                 "--db", str(c / "index.db"), "--model", model, "--allow-private",
                 "--engine", "ray", "--actors", str(actors), "--actor-cpus", "0.5"],
                work / f"c{run}.log",
            )  # fmt: skip
            again = " (again)" if run == 2 else ""
            rows.append(path_row(f"(c) ingest --engine ray, {actors} actor(s){again}", n, s, rss))
            print(rows[-1], flush=True)
    return rows


def latencies(url: str, photo: bytes, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        r = requests.post(url + "/similarity-search", files={"file": ("q.jpg", photo)}, timeout=60)
        out.append((time.perf_counter() - started) * 1000)
        r.raise_for_status()
    return out


def summary(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return {
        "requests": len(ms),
        "p50_ms": round(statistics.median(ordered), 1),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 1),
    }


def search_during_job(work: Path, server: FileServer, model: str, count: int) -> dict:
    """p50 of searches on the index from (b), idle and while a job ingests 500 photos."""
    env = {
        "IMAGEFINDER_DB": str(work / "b" / "index.db"),
        "IMAGEFINDER_IMAGES_DIR": str(work / "server-images"),
        "IMAGEFINDER_API_TOKEN": TOKEN,
        "IMAGEFINDER_JOB_ALLOW_PRIVATE": "1",
        "IMAGEFINDER_MODEL": model,
    }
    photo = next(iter(sorted(CALTECH.glob("pagoda/*.jpg")))).read_bytes()
    job_csv = work / "job.csv"
    n = catalogue(server, job_csv, prefix="job__")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with LiveServer(env, log=work / "server.log") as live:
        latencies(live.url, photo, 5)  # warm up
        idle = latencies(live.url, photo, count)
        started = time.monotonic()
        r = requests.post(
            live.url + "/jobs", files={"csv": ("job.csv", job_csv.read_bytes())}, headers=auth
        )
        r.raise_for_status()
        location = live.url + r.headers["Location"]
        while requests.get(location, headers=auth).json()["state"] == "queued":
            time.sleep(0.05)
        busy: list[float] = []
        while True:
            busy += latencies(live.url, photo, 5)
            job = requests.get(location, headers=auth).json()
            if job["state"] != "running" or len(busy) >= count:
                break
        while job["state"] in ("queued", "running"):
            time.sleep(0.2)
            job = requests.get(location, headers=auth).json()
        job_seconds = time.monotonic() - started
    return {
        "idle": summary(idle),
        "during_job": summary(busy),
        "job": {
            "images": n,
            "state": job["state"],
            "done": job["done"],
            "failed": job["failed"],
            "seconds": round(job_seconds, 2),
            "images_per_s": round(n / job_seconds, 2),
        },
    }


def markdown(r: dict) -> str:
    lines = [
        "# Ingestion",
        "",
        f"`{r['command']}`, {r['date']}, {r['machine']}, model {r['model']}.",
        "",
        f"{r['images']} Caltech photos served by a local HTTP server (tests/file_server.py).",
        "Peak RSS and PSS: the command's whole process tree (Ray's processes included), "
        "sampled every 0.1 s. RSS counts shared pages once per process; PSS splits them.",
        "",
        "| path | s | images/s | peak RSS MB | peak PSS MB | vs (b) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    base = next(p for p in r["paths"] if p["path"].startswith("(b)"))
    for p in r["paths"]:
        ratio = p["seconds"] / base["seconds"]
        lines.append(
            f"| {p['path']} | {p['seconds']} | {p['images_per_s']} | {p['peak_rss_mb']} | "
            f"{p['peak_pss_mb']} | {ratio:.2f}x time |"
        )
    a = next(p for p in r["paths"] if p["path"].startswith("(a)"))
    lines += [
        "",
        f"(a) = download {a['stages']['download_s']} s + extract {a['stages']['extract_s']} s.",
    ]
    if r.get("search"):
        s = r["search"]
        lines += [
            "",
            "| search (POST /similarity-search, sequential) | requests | p50 ms | p95 ms |",
            "| --- | --- | --- | --- |",
            f"| idle | {s['idle']['requests']} | {s['idle']['p50_ms']} | {s['idle']['p95_ms']} |",
            f"| while a job ingests {s['job']['images']} photos | {s['during_job']['requests']} | "
            f"{s['during_job']['p50_ms']} | {s['during_job']['p95_ms']} |",
            "",
            f"The job: {s['job']['state']}, {s['job']['done']} indexed, {s['job']['failed']} "
            f"failed, {s['job']['seconds']} s ({s['job']['images_per_s']} images/s) with the "
            "searches going on.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--skip-ray", action="store_true", help="leave out path (c)")
    parser.add_argument("--searches", type=int, default=40, help="searches per latency sample")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--limit", type=int, default=0, help="only the first N photos (a check)")
    parser.add_argument("--commit", action="store_true", help="write bench/results/ingest.*")
    args = parser.parse_args()
    if args.commit and args.limit:
        parser.error("--commit records the whole set: drop --limit")
    LIMIT[0] = args.limit
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="imagefinder-ingest-bench-"))
    try:
        with FileServer(CALTECH) as server:
            csv_path = work / "caltech.csv"
            n = catalogue(server, csv_path)
            result = {
                "command": "python bench/ingest.py" + (" --commit" if args.commit else ""),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                f"load {os.getloadavg()[0]:.2f} at start",
                "model": args.model,
                "images": n,
                "paths": paths(work, csv_path, n, args.model, not args.skip_ray),
            }
            result["search"] = search_during_job(work, server, args.model, args.searches)
        result["seconds"] = round(time.time() - started, 1)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(result))
    if args.commit:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "ingest.md").write_text(markdown(result))
        print(f"wrote {RESULTS / 'ingest.json'} and {RESULTS / 'ingest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
