"""ImageFinder's benchmark: speed and quality, side by side, in one run on one machine.

    python bench/bench.py            # full run (~20-30 min on 2 cores)
    python bench/bench.py --quick    # a few images, small N: a smoke test of every section
    python bench/bench.py --only knn --only search

Prints a markdown report and writes the same figures as JSON to
bench/results/<timestamp>.json (git-ignored); ``--commit`` also writes
bench/results/committed.{json,md}, the run the README quotes. Everything is
generated or read locally (../shared/data), offline.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The project first: a worktree beside an editable install of another checkout.
sys.path[:0] = [str(HERE.parent), str(HERE), str(HERE.parent / "tests")]

import indexing  # noqa: E402
import report  # noqa: E402
from corpus import CACHE, large_photos  # noqa: E402

SECTIONS = ("indexing", "quality", "search", "knn")
RESULTS = HERE / "results"


def machine() -> dict:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = Path("/proc/cpuinfo").read_text()
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("openvino", "faiss", "sqlite_vec", "PIL", "numpy"):
        with contextlib.suppress(ImportError, AttributeError):
            versions[name] = __import__(name).__version__
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "os": platform.platform(),
        "versions": versions,
    }


def main() -> None:
    if os.environ.get("OPENBLAS_CORETYPE") or os.environ.get("OPENBLAS_L2_SIZE"):
        # Set on this workplace's machines for old OpenBLAS builds; they pin numpy's
        # current one to slower kernels, which would handicap the numpy baseline.
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
        }
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few images, small N")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only these")
    parser.add_argument("--sweep", action="store_true", help="also sweep batch/workers/threads")
    parser.add_argument("--knn-sizes", type=int, nargs="+", help="N values for the KNN section")
    parser.add_argument("--commit", action="store_true", help="write results/committed.*")
    args = parser.parse_args()
    sections = args.only or list(SECTIONS)
    if "knn" in sections and importlib.util.find_spec("faiss") is None:
        sys.exit("the KNN section compares against faiss: pip install -e '.[bench]'")
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", file=sys.stderr, flush=True)

    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    results: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python bench/bench.py " + " ".join(sys.argv[1:]),
        "quick": args.quick,
        "machine": machine(),
        "load_average_at_start": os.getloadavg(),
    }
    try:
        index_dbs: dict = {}
        if "indexing" in sections or "quality" in sections:
            results["indexing"] = indexing.run_indexing(work, args.quick, log)
            index_dbs = results["indexing"]["quality_dbs"]
        if args.sweep:
            results["sweep"] = indexing.sweep(work, args.quick, log)
        if "quality" in sections:
            results["quality"] = indexing.run_quality(index_dbs, work, log)
        if "search" in sections:
            results["search"] = run_search(work, args.quick, log)
        if "knn" in sections:
            import knn

            sizes = args.knn_sizes or (
                [2_000, 10_000] if args.quick else [2_000, 5_000, 10_000, 100_000]
            )
            results["knn"] = knn.run_knn(work, sizes, 20 if args.quick else 100, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_average_at_end"] = os.getloadavg()
    results["seconds"] = time.time() - started

    markdown = report.render(results)
    print(markdown)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{stamp}.json").write_text(json.dumps(results, indent=2, default=str))
    if args.commit:
        (RESULTS / "committed.json").write_text(json.dumps(results, indent=2, default=str))
        (RESULTS / "committed.md").write_text(markdown)
    log(f"wrote {RESULTS / (stamp + '.json')}")


def run_search(work: Path, quick: bool, log) -> dict:
    """An index of Caltech photos with ResNet50 (random weights), queried with a 12 MP JPEG."""
    import pipelines
    import search_latency
    from corpus import caltech_subset

    db = work / "search-resnet50.db"
    weights = indexing.random_resnet50()
    log("search: indexing the Caltech photos with resnet50")
    pipelines.run(
        "imagefinder",
        folder=caltech_subset(100 if quick else None),
        db=db,
        model="resnet50",
        weights=weights,
        **indexing.defaults(),
    )
    photo = sorted(large_photos(1).glob("*.jpg"))[0].read_bytes()
    return search_latency.run_search(db, photo, "resnet50", weights, quick, log)


if __name__ == "__main__":
    main()
