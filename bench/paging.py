"""Deep pages and metadata filters: recall against exact search, and latency, on both
stores.

    python bench/paging.py [--n 20000] [--dim 1280] [--skip-postgres] [--max-candidates M]
        [--commit]

N synthetic vectors (tests/support.py's clustered_vectors, efficientnet-lite's 1280-d by
default) in a SQLite index (its default search: binary pre-selection from 5,000
vectors) and in PostgreSQL (pgvector HNSW, a temporary server), each image with a
``category`` that 1%, 10% or 60% of them share. For QUERIES held-out vectors:

- pages of k=10 at offsets 0, 50, 100, 200, 500 and 990 (``query.run``, plain order),
  which path served them (approximate, or exact past what the approximate index
  serves), and the recall of the whole ranking down to the page (``Store.knn`` to depth
  offset + k): a miss higher up shifts a page, so its own recall is the stricter;
- k=10 under each filter (``Store.knn`` with ``where``);

recall = the share of the exact search's results (the same store, ``exact=True``)
found, and the latency p50/p95 of the approximate search and of the exact one.
Prints a table; with ``--commit`` writes bench/results/paging-<n>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

from support import clustered_vectors  # noqa: E402

from imagefinder import query  # noqa: E402
from imagefinder.store import Item, open_store, pgsearch  # noqa: E402

QUERIES = 50
K = 10
OFFSETS = (0, 50, 100, 200, 500, 990)
SHARES = {"1%": 100, "10%": 10, "60%": None}


def category(i: int) -> str:
    """'p1' for 1% of images, 'p10' for 10% (those included), else 'rest'; 'common'
    rides in a second column on 60%."""
    return "p1" if i % 100 == 0 else "p10" if i % 10 == 0 else "rest"


def fill(location: str, vectors: np.ndarray) -> float:
    store = open_store(location)
    store.ensure_schema(
        {
            "model": "synthetic",
            "weights": "none",
            "dim": str(vectors.shape[1]),
            "preprocessing": "none",
        }
    )
    start = time.perf_counter()
    store.begin_bulk(len(vectors))
    for lo in range(0, len(vectors), 1000):
        store.upsert(
            Item(f"v{i:07d}", f"/x/{i}", f"h{i}", 1, 1, vectors[i])
            for i in range(lo, min(len(vectors), lo + 1000))
        )
    store.end_bulk()
    for lo in range(0, len(vectors), 5000):
        store.set_metadata(
            (
                f"v{i:07d}",
                {"category": category(i), "tier": "common" if i % 10 < 6 else "other"},
            )
            for i in range(lo, min(len(vectors), lo + 5000))
        )
    seconds = time.perf_counter() - start
    store.close()
    return seconds


WHERE = {
    "1%": (("category", "p1"),),
    "10%": (("category", "p10"),),
    "60%": (("tier", "common"),),
}


def path(store, fetch: int) -> str:
    """Which search serves ``fetch`` results: the approximate index, or an exact scan."""
    if store.kind == "sqlite":
        approximate = store.search_mode() == "binary+rerank" and store._preselects(fetch)
    else:
        approximate = pgsearch.approximate(fetch, store.ef_search)
    return "approximate" if approximate else "exact"


def measure(location: str, queries: np.ndarray) -> dict:
    fast, exact = open_store(location), open_store(location, exact=True)
    mode = fast.search_mode() if fast.kind == "sqlite" else f"hnsw ef_search={fast.ef_search}"
    out: dict = {"store": fast.kind, "search": mode, "pages": [], "filters": []}

    def run(search) -> tuple[list, list[float]]:
        found, times = [], []
        for q in queries:
            start = time.perf_counter()
            found.append(search(q))
            times.append((time.perf_counter() - start) * 1000)
        return found, times

    def stats(times: list[float]) -> dict:
        return {
            "p50_ms": round(statistics.median(times), 2),
            "p95_ms": round(float(np.percentile(times, 95)), 2),
        }

    def recall(got: list, want: list) -> float:
        return float(
            np.mean(
                [
                    len({i for i, _ in g} & {i for i, _ in w}) / max(1, len(w))
                    for g, w in zip(got, want, strict=True)
                ]
            )
        )

    for store in (fast, exact):  # warm caches: the first searches read the file
        for q in queries[:5]:
            store.knn(q, K)
    for offset in OFFSETS:
        got, t_fast = run(lambda q, o=offset: query.run(fast, q, K, False, offset=o))
        want, t_exact = run(lambda q, o=offset: query.run(exact, q, K, False, offset=o))
        depth = offset + K
        ranked = recall(
            [fast.knn(q, depth) for q in queries], [exact.knn(q, depth) for q in queries]
        )
        row = {"offset": offset, "path": path(fast, depth), "recall": recall(got, want)}
        row.update(depth_recall=ranked, **stats(t_fast))
        row["exact"] = stats(t_exact)
        out["pages"].append(row)
        print(fast.kind, row, flush=True)
    for share, where in WHERE.items():
        got, t_fast = run(lambda q, w=where: fast.knn(q, K, where=w))
        want, t_exact = run(lambda q, w=where: exact.knn(q, K, where=w))
        assert all(len(g) == K for g in got), "a filtered search came back short"
        row = {"filter": share, "recall": recall(got, want), **stats(t_fast)}
        row["exact"] = stats(t_exact)
        out["filters"].append(row)
        print(fast.kind, row, flush=True)
    fast.close()
    exact.close()
    return out


def markdown(result: dict) -> str:
    lines = [
        f"# Deep pages and filters: {result['n']:,} vectors, {result['dim']}-d",
        "",
        f"`{result['command']}` - {result['when']}, {result['machine']}. {QUERIES} queries, "
        f"k = {K}; recall against the same store searching exactly; latency in ms.",
        "",
        "| store | search | page offset | served by | page recall | recall to the page's "
        "depth | p50 | p95 | exact p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["stores"]:
        for r in s["pages"]:
            lines.append(
                f"| {s['store']} | {s['search']} | {r['offset']} | {r['path']} | "
                f"{r['recall']:.4f} | {r['depth_recall']:.4f} | "
                f"{r['p50_ms']} | {r['p95_ms']} | {r['exact']['p50_ms']} |"
            )
    lines += ["", "| store | search | filter matches | recall | p50 | p95 | exact p50 |"]
    lines.append("|---|---|---|---|---|---|---|")
    for s in result["stores"]:
        for r in s["filters"]:
            lines.append(
                f"| {s['store']} | {s['search']} | {r['filter']} | {r['recall']:.4f} | "
                f"{r['p50_ms']} | {r['p95_ms']} | {r['exact']['p50_ms']} |"
            )
    lines += [
        "",
        "Load (vectors, index build, metadata): "
        + ", ".join(f"{s['store']} {s['load_s']:.0f} s" for s in result["stores"])
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument(
        "--max-candidates",
        type=int,
        help="override both stores' MAX_CANDIDATES (how deep the approximate index "
        "serves before an exact scan), to measure the approximate path deeper",
    )
    parser.add_argument("--commit", action="store_true")
    args = parser.parse_args()
    if args.max_candidates:
        from imagefinder.store import sqlite

        sqlite.MAX_CANDIDATES = pgsearch.MAX_CANDIDATES = args.max_candidates
    vectors = clustered_vectors(args.n + QUERIES, args.dim, seed=31)
    data, queries = vectors[: args.n], vectors[args.n :]
    result: dict = {
        "command": "python bench/paging.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "n": args.n,
        "dim": args.dim,
        "stores": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "paging.db")
        load_s = fill(db, data)
        result["stores"].append({**measure(db, queries), "load_s": load_s})
    if not args.skip_postgres:
        from pgtest import create_database, temporary_server

        with temporary_server(durable=True) as server:
            url = create_database(server, "paging")
            load_s = fill(url, data)
            result["stores"].append({**measure(url, queries), "load_s": load_s})
    text = markdown(result)
    print(text)
    if args.commit:
        out = HERE / "results" / f"paging-{args.n}"
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
