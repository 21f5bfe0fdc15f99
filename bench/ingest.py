"""Ingestion benchmark: the 500 Caltech photos served by a local HTTP server, five ways.

    python bench/ingest.py                  # prints a table
    python bench/ingest.py --commit         # ...and writes bench/results/ingest.{json,md}
    python bench/ingest.py --model efficientnet-lite0 --skip-ray

Paths, each a fresh output folder and index, each a real command in a subprocess:

- (a) ``imagefinder download``, then ``imagefinder extract``;
- (b) ``imagefinder ingest`` (download and embed in one streaming pass);
- (c) ``imagefinder ingest --engine ray`` on a Ray cluster the command starts on this
  machine, with 1 and with 2 embedding actors (0.5 CPU each). Its time includes starting
  the cluster: that is what Ray costs on one machine for a single run.
- (d) the same command with ``--ray-address`` on a cluster already running on this
  machine (``ray start --head``, timed on its own, then one small first job), as the
  README's Ray section runs it: 1 and 2 actors. A job there leaves its model loaded
  for the next (IMAGEFINDER_RAY_KEEP_WARM, imagefinder/raymodels.py). Its memory counts
  the cluster's processes too.
- (e) as (d) with IMAGEFINDER_RAY_KEEP_WARM=0: every job starts its own actors.

For each: wall seconds, images/s, and the peak RSS and PSS of the process tree (the
command and every process it started, Ray's included), from a separate run (see
``command``).

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
from collections.abc import Callable
from pathlib import Path

import psutil
import requests

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(BENCH)]  # this checkout first

from file_server import FileServer  # noqa: E402
from support import CALTECH, LiveServer, free_port  # noqa: E402

RESULTS = BENCH / "results"
TOKEN = "bench-ingest-token"


LIMIT = [0]  # --limit: the first N photos only (a quick check of the script itself)


def catalogue(server: FileServer, path: Path, prefix: str = "", repeat: int = 1) -> int:
    """A url,id CSV of every Caltech photo on ``server``, each ``repeat`` times under as
    many ids (each a row to download and embed); returns the row count."""
    rows = []
    photos = sorted(CALTECH.glob("*/*.jpg"))
    for k in range(repeat):
        suffix = f"__copy{k}" if k else ""
        for photo in photos[: LIMIT[0] or len(photos)]:
            rel = photo.relative_to(CALTECH).as_posix()
            rows.append(f"{server.url(rel)},{prefix}{rel.replace('/', '__')[:-4]}{suffix}")
    path.write_text("url,id\n" + "\n".join(rows) + "\n")
    return len(rows)


class PeakRSS:
    """The largest summed RSS of a process and its descendants, sampled every 0.1 s;
    with ``since``, also of every process started on the machine since that time (a
    running Ray cluster's: not the command's descendants)."""

    def __init__(self, pid: int, since: float | None = None, pss: bool = False):
        self.root = psutil.Process(pid)
        self.since = since
        self.pss = pss
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
            if self.since is not None:
                seen = {p.pid for p in procs} | {os.getpid()}
                procs += [
                    p
                    for p in psutil.process_iter(["create_time"])
                    if p.pid not in seen and (p.info["create_time"] or 0) >= self.since
                ]
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    if self.pss:
                        info = p.memory_full_info()
                        total += info.rss
                        pss += info.pss
                    else:
                        total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(0.1)

    def stop(self) -> tuple[float, float]:
        """(peak RSS MB, peak PSS MB) of the tree."""
        self._stop.set()
        self._thread.join()
        return round(self.peak / 2**20, 1), round(self.peak_pss / 2**20, 1)


def command(
    args: list[str],
    log: Path,
    since: float | None = None,
    pss: bool = False,
    env: dict[str, str] | None = None,
) -> tuple[float, tuple[float, float], str]:
    """Run ``python -m imagefinder ARGS``; (seconds, peak tree RSS and PSS MB, output).
    ``since``: see PeakRSS. ``pss``: also sample PSS (0.0 without), which costs ~9 ms
    of CPU per process with torch per sample: on 2 cores, sampling Ray's dozen processes
    ten times a second took a fifth of the machine from the run it measured, and almost
    nothing from (b)'s one process. Timed runs leave it off; a separate run measures it."""
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imagefinder", *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )
        rss = PeakRSS(proc.pid, since, pss)
        code = proc.wait()
        peak = rss.stop()
    seconds = time.monotonic() - started
    text = log.read_text()
    if code != 0:
        raise SystemExit(f"imagefinder {' '.join(args)} failed ({code}):\n{text[-2000:]}")
    return round(seconds, 2), peak, text


def path_row(
    name: str,
    images: int,
    seconds: float,
    peak: tuple[float | None, float | None],
    **extra: object,
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


SMALL = ", first {} photos"
FIRST_JOB = 10  # photos in (d)'s first job on each new cluster


def paths(
    work: Path,
    sizes: list[tuple[Path, int]],
    model: str,
    which: str,
    rounds: int,
    actor_counts: tuple[int, ...] = (1, 2),
) -> list[dict]:
    """Every path ``rounds`` times, one round after another (so a slow spell of the
    machine falls on every path alike); each row keeps every run and reports the median
    run (by time). ``sizes``: (csv, rows), the whole set first; (b), (c) and (d) also run
    on the others, which separates each path's fixed cost from its cost per photo.
    ``which``: the paths' letters; ``actor_counts``: the Ray paths' actor pools.

    The timed runs sample RSS only; then one more run of each path on the whole set
    samples PSS too, and gives the memory columns (see ``command``)."""
    runs: dict[str, list[dict]] = {}
    memory: dict[str, tuple[float | None, float | None]] = {}
    count: dict[str, int] = {}
    full = sizes[0][1]

    def record(
        name: str, n: int, seconds: float, peak: tuple[float, float], **extra: object
    ) -> None:
        name += "" if n == full else SMALL.format(n)
        count[name] = n
        runs.setdefault(name, []).append({"seconds": seconds, "peak_rss_mb": peak[0], **extra})
        print(f"{name}: {seconds} s, peak RSS {peak[0]} MB {extra or ''}", flush=True)

    def measure(
        name: str, n: int, seconds: float, peak: tuple[float, float], **extra: object
    ) -> None:
        memory[name] = peak
        print(f"{name}: peak RSS/PSS {peak} MB (memory run, {seconds} s)", flush=True)

    for r in range(rounds):
        one_round(work, f"{r}", sizes, model, which, actor_counts, record, pss=False)
    one_round(work, "m", sizes[:1], model, which, actor_counts, measure, pss=True)
    rows = []
    for name, done in runs.items():
        ordered = sorted(done, key=lambda run: run["seconds"])
        median = ordered[(len(ordered) - 1) // 2]
        extra = {k: v for k, v in median.items() if k not in ("seconds", "peak_rss_mb")}
        rows.append(
            path_row(
                name, count[name], median["seconds"], memory.get(name, (None, None)),
                runs_s=[run["seconds"] for run in done], **extra,
            )
        )  # fmt: skip
    return rows


def one_round(
    work: Path,
    tag: str,
    sizes: list[tuple[Path, int]],
    model: str,
    which: str,
    actor_counts: tuple[int, ...],
    record: Callable[..., None],
    pss: bool,
) -> None:
    """Each path once on each size, in order; ``record(name, rows, seconds, peak,
    **extra)`` gets each run."""
    full = sizes[0][0]

    def ingest(folder: Path, csv_path: Path, *more: str) -> list[str]:
        return [
            "ingest", "--csv", str(csv_path), "--output-dir", str(folder / "images"),
            "--db", str(folder / "index.db"), "--model", model, "--allow-private", *more,
        ]  # fmt: skip

    if "a" in which:
        a = work / f"a{tag}"
        d_s, d_rss, _ = command(
            ["download", "--csv_file", str(full), "--output-dir", str(a / "images"),
             "--allow-private"], work / f"a{tag}-download.log", pss=pss,
        )  # fmt: skip
        e_s, e_rss, _ = command(
            ["extract", "--folder", str(a / "images"), "--db", str(a / "index.db"),
             "--model", model], work / f"a{tag}-extract.log", pss=pss,
        )  # fmt: skip
        record(
            "(a) download, then extract", sizes[0][1], round(d_s + e_s, 2),
            max(d_rss, e_rss), stages={"download_s": d_s, "extract_s": e_s},
        )  # fmt: skip
    for csv_path, n in sizes:
        if "b" in which:
            b = work / f"b{tag}-{n}"
            s, rss, _ = command(ingest(b, csv_path), work / f"b{tag}-{n}.log", pss=pss)
            record("(b) ingest, streaming", n, s, rss)
        for actors in actor_counts if "c" in which else ():
            c = work / f"c{tag}-{n}-{actors}"
            on_ray = ("--engine", "ray", "--actors", str(actors), "--actor-cpus", "0.5")
            s, rss, _ = command(
                ingest(c, csv_path, *on_ray), work / f"c{tag}-{n}-{actors}.log", pss=pss
            )
            record(f"(c) ingest --engine ray, {actors} actor(s)", n, s, rss)
    if "d" not in which and "e" not in which:
        return
    with RayCluster(work / f"ray-start{tag}.log") as cluster:
        # A running cluster has run jobs before: the first one on a new cluster also
        # starts Ray Data's own actors (stats, usage, autoscaling, actor locations:
        # ~10 s of CPU here), which later jobs find running. Timed on its own.
        first = work / f"d{tag}-first"
        first_csv = first.with_suffix(".csv")
        lines = full.read_text().splitlines(keepends=True)
        first_csv.write_text("".join(lines[: FIRST_JOB + 1]))
        first_s, _, _ = command(
            ingest(first, first_csv, "--engine", "ray", "--ray-address", cluster.address),
            work / f"d{tag}-first.log",
        )  # fmt: skip
        print(f"(d) first job on the new cluster ({FIRST_JOB} photos): {first_s} s", flush=True)
        for letter in "de":
            if letter not in which:
                continue
            # (e): every job starts and ends its own actors (no model kept warm).
            env = {"IMAGEFINDER_RAY_KEEP_WARM": "0"} if letter == "e" else {}
            for csv_path, n in sizes:
                for actors in actor_counts:
                    d = work / f"{letter}{tag}-{n}-{actors}"
                    more = ("--engine", "ray", "--ray-address", cluster.address,
                            "--actors", str(actors), "--actor-cpus", "0.5")  # fmt: skip
                    s, rss, _ = command(
                        ingest(d, csv_path, *more), work / f"{letter}{tag}-{n}-{actors}.log",
                        since=cluster.started, pss=pss, env=env,
                    )  # fmt: skip
                    record(
                        f"({letter}) ingest --engine ray on a running cluster, "
                        + ("models kept warm" if letter == "d" else "no model kept warm")
                        + f", {actors} actor(s)",
                        n, s, rss, cluster_start_s=cluster.seconds, first_job_s=first_s,
                    )  # fmt: skip


def costs(r: dict) -> list[dict]:
    """Each path's fixed cost and cost per photo, from its median times on the whole set
    and on the small one (a straight line through the two)."""
    out = []
    for p in r["paths"]:
        small = next((q for q in r["paths"] if q["path"].startswith(p["path"] + ", first")), None)
        if small is None or small["images"] >= p["images"]:
            continue
        per = (p["seconds"] - small["seconds"]) / (p["images"] - small["images"])
        out.append(
            {
                "path": p["path"],
                "fixed_s": round(p["seconds"] - per * p["images"], 2),
                "per_photo_ms": round(per * 1000, 1),
            }
        )
    base = next((c for c in out if c["path"].startswith("(b)")), None)
    for c in out:
        c["per_photo_vs_b"] = round(c["per_photo_ms"] / base["per_photo_ms"], 2) if base else None
    return out


class RayCluster:
    """``ray start --head`` on this machine (its start timed), ``ray stop`` at the end."""

    def __init__(self, log: Path):
        self.log = log
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.ray = str(Path(sys.executable).with_name("ray"))

    def __enter__(self) -> RayCluster:
        self.started = time.time() - 1  # create_time has a coarse clock
        t = time.monotonic()
        with open(self.log, "w") as out:
            subprocess.run(
                [self.ray, "start", "--head", "--port", str(self.port),
                 "--num-cpus", str(os.cpu_count()), "--include-dashboard", "false",
                 "--disable-usage-stats"],
                stdout=out, stderr=subprocess.STDOUT, check=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
        self.seconds = round(time.monotonic() - t, 2)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run([self.ray, "stop", "--force"], capture_output=True, check=False)


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


def search_during_job(work: Path, db: Path, server: FileServer, model: str, count: int) -> dict:
    """p50 of searches on the index from (b), idle and while a job ingests 500 photos."""
    env = {
        "IMAGEFINDER_DB": str(db),
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
        (
            f"{r['images']} rows, the Caltech photos each listed {r['repeat']} times under "
            "as many ids,"
            if r.get("repeat", 1) > 1
            else f"{r['images']} Caltech photos"
        )
        + " served by a local HTTP server (tests/file_server.py)"
        + (
            f", which waits {r['latency_s'] * 1000:.0f} ms before each answer."
            if r.get("latency_s")
            else "."
        ),
        f"Every path ran {r.get('rounds', 1)} times, round after round; each row is its "
        "median run (s: that run; all runs listed).",
        "Peak RSS and PSS: the command's whole process tree (Ray's processes included), "
        "sampled every 0.1 s in one more run of each path on the whole set (the timed runs "
        "sample no PSS: reading it costs CPU per process, far more for Ray's many than for "
        "(b)'s one). RSS counts shared pages once per process; PSS splits them.",
        "",
        "| path | s | runs s | images/s | peak RSS MB | peak PSS MB | vs (b) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in r["paths"]:
        base = next(
            q for q in r["paths"] if q["path"].startswith("(b)") and q["images"] == p["images"]
        )
        ratio = p["seconds"] / base["seconds"]
        runs = ", ".join(str(x) for x in p.get("runs_s", [p["seconds"]]))
        lines.append(
            f"| {p['path']} | {p['seconds']} | {runs} | {p['images_per_s']} | "
            f"{p['peak_rss_mb'] or '-'} | {p['peak_pss_mb'] or '-'} | {ratio:.2f}x time |"
        )
    a = next((p for p in r["paths"] if p["path"].startswith("(a)")), None)
    if a:
        lines += [
            "",
            f"(a) = download {a['stages']['download_s']} s + extract {a['stages']['extract_s']} s.",
        ]
    if r.get("costs"):
        lines += [
            "",
            "Fixed cost and cost per photo: a straight line through each path's median on "
            "the whole set and on the small one.",
            "",
            "| path | fixed s | ms per photo | per photo vs (b) |",
            "| --- | --- | --- | --- |",
        ]
        for c in r["costs"]:
            lines.append(
                f"| {c['path']} | {c['fixed_s']} | {c['per_photo_ms']} | "
                f"{c['per_photo_vs_b']:.2f}x |"
            )
    d = next((p for p in r["paths"] if p["path"].startswith(("(d)", "(e)"))), None)
    if d:
        lines += [
            "",
            f"(d), (e): `ray start --head` took {d['cluster_start_s']} s (in the median run's "
            f"round), then a first job of {FIRST_JOB} photos {d.get('first_job_s', '?')} s, "
            "both before the runs and not counted in their time (the first job on a new "
            "cluster also starts Ray Data's own actors); their memory includes the "
            "cluster's processes. (c) counts all of it.",
        ]
        if any(p["path"].startswith("(e)") for p in r["paths"]):
            lines.append(
                "(e) runs on (d)'s cluster after it: its memory also counts the models "
                "(d) left loaded there (idle, until IMAGEFINDER_RAY_KEEP_WARM runs out)."
            )
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
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of every path; the median is reported"
    )
    parser.add_argument("--paths", default="a,b,c,d,e", help="which paths to run, e.g. b,d")
    parser.add_argument("--actors", default="1,2", help="the Ray paths' actor counts")
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="list every photo this many times, under as many ids (a larger catalogue)",
    )  # fmt: skip
    parser.add_argument(
        "--latency", type=float, default=0.0,
        help="seconds the file server waits before each answer (a remote host's round trip)",
    )  # fmt: skip
    parser.add_argument(
        "--small", type=int, default=50,
        help="also run (b)-(e) on the first N photos: fixed cost against cost per photo",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--limit", type=int, default=0, help="only the first N photos (a check)")
    parser.add_argument("--commit", action="store_true", help="write bench/results/ingest.*")
    args = parser.parse_args()
    if args.commit and args.limit:
        parser.error("--commit records the whole set: drop --limit")
    LIMIT[0] = args.limit
    which = args.paths.replace(",", "")
    if args.skip_ray:
        which = which.replace("c", "").replace("d", "").replace("e", "")
    if "b" not in which:
        parser.error("--paths needs b: every path is compared with it")
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="imagefinder-ingest-bench-"))
    try:
        with FileServer(CALTECH, delay=args.latency) as server:
            csv_path = work / "caltech.csv"
            n = catalogue(server, csv_path, repeat=args.repeat)
            sizes = [(csv_path, n)]
            if 0 < args.small < n:
                lines = csv_path.read_text().splitlines(keepends=True)
                small = work / "small.csv"
                small.write_text("".join(lines[: args.small + 1]))
                sizes.append((small, args.small))
            result = {
                "command": "python bench/ingest.py" + " ".join(["", *sys.argv[1:]]),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                f"load {os.getloadavg()[0]:.2f} at start",
                "model": args.model,
                "latency_s": args.latency,
                "repeat": args.repeat,
                "images": n,
                "rounds": args.rounds,
                "paths": paths(
                    work,
                    sizes,
                    args.model,
                    which,
                    args.rounds,
                    tuple(int(x) for x in args.actors.split(",")),
                ),  # fmt: skip
            }
            result["costs"] = costs(result)
            result["search"] = search_during_job(
                work, work / f"b0-{n}" / "index.db", server, args.model, args.searches
            )
        result["seconds"] = round(time.time() - started, 1)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(result))
    if args.commit:
        RESULTS.mkdir(exist_ok=True)
        name = "ingest" + (f"-latency-{round(args.latency * 1000)}ms" if args.latency else "")
        name += f"-{n}" if args.repeat > 1 else ""
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(markdown(result))
        print(f"wrote {RESULTS / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
