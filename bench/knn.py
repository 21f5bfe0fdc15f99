"""Section 4: KNN latency for k=3 over N synthetic 2048-d unit vectors.

Side by side on the same vectors and queries: the project's SQL KNN (exact vec0 scan,
and the inverted file re-ranked exactly that large indexes use by default),
numpy brute force and faiss ``IndexFlatL2`` (a benchmark-only dependency). Recall@3 is
against the exact answer. The vectors are shaped like CNN features
(``support.clustered_vectors``); uniform random ones would have no real neighbours.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from support import clustered_vectors

from imagefinder.store import Item, ivf
from imagefinder.store.sqlite import SQLiteStore

DIM = 2048
K = 3


def build(path: Path, vectors: np.ndarray) -> tuple[SQLiteStore, float]:
    """An index of ``vectors`` written through the store, as an extraction writes it."""
    store = SQLiteStore(path)
    store.ensure_schema(
        {"model": "synthetic", "weights": "none", "dim": str(DIM), "preprocessing": "none"}
    )
    start = time.perf_counter()
    store.begin_bulk(len(vectors))
    for lo in range(0, len(vectors), 2000):
        store.upsert(
            Item(f"v{i}", f"/synthetic/{i}", "-", 0, 0, vectors[i])
            for i in range(lo, min(lo + 2000, len(vectors)))
        )
    store.end_bulk()
    return store, time.perf_counter() - start


def timed(search, queries: np.ndarray) -> tuple[list[list[int]], list[float]]:
    answers, seconds = [], []
    search(queries[0])  # warm caches
    for q in queries:
        start = time.perf_counter()
        answers.append(search(q))
        seconds.append(time.perf_counter() - start)
    return answers, seconds


def recall(found: list[list[int]], truth: list[list[int]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def run_knn(work: Path, sizes: list[int], queries: int, log) -> list[dict]:
    rows = []
    for n in sizes:
        log(f"knn: N={n:,}")
        rows += measure(work / f"knn-{n}.db", n, queries)
        for f in work.glob(f"knn-{n}.db*"):
            f.unlink()
    return rows


def measure(path: Path, n: int, queries: int) -> list[dict]:
    import faiss

    data = clustered_vectors(n + queries, DIM, seed=n)
    vectors, qs = data[:n], data[n:]
    store, build_seconds = build(path, vectors)
    exact = SQLiteStore(path, exact=True)
    rowid = {f"v{i}": i for i in range(n)}

    def sql(s):
        return lambda q: [rowid[i] for i, _ in s.knn(q, K)]

    def brute(q):
        d = 2 - 2 * (vectors @ q)  # unit vectors: |x - q|^2
        top = np.argpartition(d, K)[:K]
        return list(top[np.argsort(d[top])])

    index = faiss.IndexFlatL2(DIM)
    index.add(vectors)

    def flat(q):
        return list(index.search(q[None], K)[1][0])

    default_mode = store.search_mode()
    truth, exact_s = timed(sql(exact), qs)
    fast_name = f"SQLite {ivf.MODE_IVF} ({store.ef_search} candidates)"
    if default_mode != ivf.MODE_IVF:
        # Below the threshold the default is exact: build the inverted file anyway, to compare.
        SQLiteStore(path, fast_min_rows=1).end_bulk()
        fast_name += ", forced"
    methods = {
        "SQLite vec0 exact": (truth, exact_s),
        fast_name: timed(sql(store), qs),
        "numpy brute force": timed(brute, qs),
        "faiss IndexFlatL2": timed(flat, qs),
    }
    rows = [
        {
            "n": n,
            "method": name,
            "p50_ms": float(np.percentile(seconds, 50) * 1000),
            "p95_ms": float(np.percentile(seconds, 95) * 1000),
            "recall_at_3": recall(found, truth),
            "default_mode": default_mode,
            "build_seconds": build_seconds,
            "db_mb": path.stat().st_size / 2**20,
        }
        for name, (found, seconds) in methods.items()
    ]
    store.close()
    exact.close()
    return rows
