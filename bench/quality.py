"""Retrieval quality and search cost of every combination of model, αQE and DBA.

    python bench/quality.py [--commit]

1. Quality: each offline model embeds the dev split (../shared/data/caltech101-dev)
   through the real extraction (timed: images/s), then ``evaluate_all`` scores every
   combination of αQE and DBA leave-one-out through the API's own search code
   (``query.run``). The same as ``imagefinder eval --model ...``.
2. The (n, α) sweep behind the defaults, on efficientnet-lite2.
3. Search latency on the dev split, in-process through ``Service``: decode and forward
   once, the search part per combination; and the KNN part alone on 20k synthetic
   vectors, where the extra KNNs weigh more. ``--only-latency`` re-measures these alone.

Prints everything; with ``--commit`` also writes bench/results/quality.{json,md}.
Models without weights on this machine (resnet50, vgg16, clip-vit-b-32) are not scored.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

from support import CALTECH, clustered_vectors  # noqa: E402

from imagefinder import augment, query  # noqa: E402
from imagefinder.config import Settings  # noqa: E402
from imagefinder.evaluate import (  # noqa: E402
    COMBINATIONS,
    evaluate_all,
    labelled_vectors,
    precision_and_ap,
)
from imagefinder.indexer import index_folder  # noqa: E402
from imagefinder.model.embedder import load_embedder  # noqa: E402
from imagefinder.query import SearchOptions  # noqa: E402
from imagefinder.service import Service  # noqa: E402
from imagefinder.store import Item, open_store  # noqa: E402

MODELS = ("efficientnet-lite0", "efficientnet-lite2")
LATENCY_QUERIES = 100
SYNTHETIC = 20_000


def quality(tmp: Path) -> tuple[list[dict], Path]:
    rows = []
    for name in MODELS:
        db = tmp / f"{name}.db"
        store = open_store(str(db))
        embedder = load_embedder(name)
        start = time.perf_counter()
        summary = index_folder(CALTECH, store, embedder, dba=False)
        rate = summary.indexed / (time.perf_counter() - start)
        rows += evaluate_all(store, CALTECH, 3, images_per_s=rate)
        store.close()
        print(f"{name}: {rate:.1f} images/s", flush=True)
    return rows, tmp / "efficientnet-lite2.db"


def sweep(db: Path) -> list[dict]:
    """mAP for (n, α) of αQE alone and of DBA alone, on efficientnet-lite2."""
    ids, labels, matrix = labelled_vectors(open_store(str(db)), CALTECH)
    labels_arr = np.array(labels)
    out = []
    for kind in ("qe", "dba"):
        for n, alpha in ((1, 3.0), (2, 1.0), (2, 3.0), (2, 5.0), (3, 3.0), (5, 3.0)):
            if kind == "dba":
                ranking, q_n = augment.augment(matrix, n, alpha), 0
            else:
                ranking, q_n = matrix, n
            aps = []
            for i in range(len(ids)):
                q = matrix[i]
                if q_n:
                    sims = matrix @ q
                    sims[i] = -np.inf
                    q = augment.weighted_sum(q, matrix[np.argsort(-sims)[:q_n]], alpha)
                sims = ranking @ q
                sims[i] = -np.inf
                order = np.argsort(-sims, kind="stable")[:-1]
                relevant = int((labels_arr == labels[i]).sum()) - 1
                aps.append(precision_and_ap(labels_arr[order], labels[i], relevant, 3)[1])
            out.append({"kind": kind, "n": n, "alpha": alpha, "map": float(np.mean(aps))})
    return out


def timed(fn, inputs: list) -> dict:
    times = []
    for x in inputs:
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return {"mean_ms": statistics.fmean(times) * 1000, "p50_ms": statistics.median(times) * 1000}


def latency_dev(db: Path) -> dict:
    """Search latency on the dev split: the part every upload search pays (decode and
    forward, timed once) and the part each combination adds (KNN, αQE, DBA re-rank,
    distances: ``Service.search_vector``), each combination timed over the same vectors
    in rounds, so drift in the machine's speed spreads over all of them alike."""
    photos = sorted(CALTECH.glob("*/*.jpg"))[:: 500 // LATENCY_QUERIES][:LATENCY_QUERIES]
    data = [p.read_bytes() for p in photos]
    service = Service(Settings(db=str(db)))
    service.load_model()
    service.embed_upload(data[0])  # warm: the first forwards build kernels
    embed = timed(service.embed_upload, data)
    vectors = [service.embed_upload(d) for d in data]
    knn: dict[tuple[bool, bool], list[float]] = {c: [] for c in COMBINATIONS}
    for dba in (False, True):
        augment.set_enabled(service.store, dba)
        for _ in range(3):
            for expand in (False, True):
                options = SearchOptions(k=3, expand=expand)
                search = partial(service.search_vector, options=options)
                knn[(expand, dba)].append(timed(search, vectors)["mean_ms"])
    service.close()
    rows = []
    for expand, dba in COMBINATIONS:
        part = statistics.fmean(knn[(expand, dba)])
        rows.append({
            "expand": expand, "dba": dba, "knn_ms": part,
            "mean_ms": embed["mean_ms"] + part, "p50_ms": embed["p50_ms"] + part,
        })  # fmt: skip
    return {"decode_forward_ms": embed["mean_ms"], "rows": rows}


def latency_synthetic(tmp: Path) -> list[dict]:
    """The KNN part alone (no forward) on SYNTHETIC vectors of lite2's width."""
    vectors = clustered_vectors(SYNTHETIC + 200, 1280, seed=12)
    data, queries = vectors[:SYNTHETIC], vectors[SYNTHETIC:]
    store = open_store(str(tmp / "synthetic.db"))
    store.ensure_schema({"model": "synthetic", "weights": "-", "dim": "1280", "preprocessing": "-"})
    store.begin_bulk(len(data))
    for lo in range(0, len(data), 2000):
        store.upsert(Item(f"v{i}", f"/s/{i}", "-", 0, 0, data[i]) for i in range(lo, lo + 2000))
    store.end_bulk()
    out = []
    for expand, dba in COMBINATIONS:
        start = time.perf_counter()
        augment.set_enabled(store, dba)
        refresh_s = time.perf_counter() - start if dba else None
        search = partial(query.run, store, k=3, expand=expand)
        row = {"expand": expand, "dba": dba, **timed(search, list(queries))}
        if dba and not expand:
            row["refresh_s"] = refresh_s
            row["recall_at_3"] = dba_recall(store, data, queries)
        out.append(row)
    store.close()
    return out


def dba_recall(store, data: np.ndarray, queries: np.ndarray) -> float:
    """How many of the exact 3 nearest augmented vectors the candidate re-rank finds."""
    ids = [f"v{i}" for i in range(len(data))]
    found = store.augmented_of(ids)
    augmented = np.stack([found[i] for i in ids])
    hits = 0
    for q in queries:
        exact = {ids[n] for n in np.argsort(((augmented - q) ** 2).sum(axis=1))[:3]}
        hits += len(exact & {i for i, _ in query._rank(store, q, 3, (), True)})
    return hits / (3 * len(queries))


def table(rows: list[dict]) -> str:
    lines = [
        "| model | images/s | αQE | DBA | precision@3 | mAP |",
        "| --- | ---: | :-: | :-: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['images_per_s']:.1f} | {'on' if r['expand'] else 'off'} | "
            f"{'on' if r['dba'] else 'off'} | {r['precision_at_k']:.3f} | {r['map']:.3f} |"
        )
    return "\n".join(lines)


def latency_table(rows: list[dict], knn: bool = False) -> str:
    base = rows[0]["mean_ms"]
    head = "| αQE | DBA | " + ("knn ms | " if knn else "") + "mean ms | median ms | vs plain |"
    lines = [head, "| :-: | :-: | " + ("---: | " if knn else "") + "---: | ---: | ---: |"]
    for r in rows:
        part = f"{r['knn_ms']:.2f} | " if knn else ""
        lines.append(
            f"| {'on' if r['expand'] else 'off'} | {'on' if r['dba'] else 'off'} | {part}"
            f"{r['mean_ms']:.1f} | {r['p50_ms']:.1f} | {100 * (r['mean_ms'] / base - 1):+.0f}% |"
        )
    return "\n".join(lines)


def render(results: dict) -> str:
    rows, grid = results["quality"], results["sweep"]
    dev, synthetic = results["latency_dev"], results["latency_synthetic"]
    sweep_lines = "\n".join(
        f"| {g['kind']} | {g['n']} | {g['alpha']:g} | {g['map']:.3f} |" for g in grid
    )
    dba = synthetic[2]
    return f"""# Retrieval quality and search cost (`python bench/quality.py --commit`)

Dev split: {CALTECH.name} (500 photos, 25 classes), leave-one-out, every image querying
all the others through the API's own search code. αQE: n=2, α=3 on the query; DBA:
n=2, α=3 on every catalogue vector. images/s: the real extraction (decode, forward,
write) on this machine. Only models with weights here are scored.

{table(rows)}

## The (n, α) sweep (efficientnet-lite2, mAP; each gain alone)

| kind | n | α | mAP |
| --- | ---: | ---: | ---: |
{sweep_lines}

## Search latency, efficientnet-lite2, dev split ({LATENCY_QUERIES} dev photos, in-process)

Decode and forward of an upload: {dev["decode_forward_ms"]:.1f} ms, the same for every
combination. The search itself (`knn ms`: KNN, αQE, DBA re-rank, distances) on top:

{latency_table(dev["rows"], knn=True)}

## The KNN part alone, {SYNTHETIC:,} synthetic 1280-d vectors (SQLite, binary pre-selection)

{latency_table(synthetic)}

DBA re-ranks the {query.DBA_CANDIDATES} + k candidates of the raw index by their augmented
vectors: recall@3 against an exact scan of the augmented vectors {dba["recall_at_3"]:.3f}.
Recomputing every augmented vector (exact, O(N² d)) took {dba["refresh_s"]:.1f} s for
{SYNTHETIC:,} vectors.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", action="store_true", help="write bench/results/quality.*")
    parser.add_argument(
        "--only-latency",
        action="store_true",
        help="re-measure the latency sections only (the dev index is rebuilt with lite2); "
        "with --commit, the committed quality figures are kept",
    )
    args = parser.parse_args()
    out = HERE / "results"
    results: dict = {"command": "python bench/quality.py --commit", "dev_split": CALTECH.name}
    if args.only_latency:
        results = json.loads((out / "quality.json").read_text())
    with tempfile.TemporaryDirectory(prefix="imagefinder-quality-") as name:
        tmp = Path(name)
        if args.only_latency:
            lite2 = tmp / "lite2.db"
            store = open_store(str(lite2))
            index_folder(CALTECH, store, load_embedder("efficientnet-lite2"), dba=False)
            store.close()
        else:
            rows, lite2 = quality(tmp)
            print(table(rows), flush=True)
            results["quality"] = rows
            results["sweep"] = sweep(lite2)
            for g in results["sweep"]:
                print(f"{g['kind']} n={g['n']} α={g['alpha']:g}: mAP {g['map']:.4f}")
        dev = latency_dev(lite2)
        print(f"decode+forward {dev['decode_forward_ms']:.1f} ms")
        print("dev split:\n" + latency_table(dev["rows"], knn=True), flush=True)
        synthetic = latency_synthetic(tmp)
        print(f"{SYNTHETIC} synthetic vectors, KNN part:\n" + latency_table(synthetic))
        dba = synthetic[2]
        print(f"DBA recall@3 {dba['recall_at_3']:.3f}, refresh {dba['refresh_s']:.1f} s")
    results["latency_dev"], results["latency_synthetic"] = dev, synthetic
    if not args.commit:
        return
    (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "quality.md").write_text(render(results))
    print(f"wrote {out / 'quality.md'}")


if __name__ == "__main__":
    main()
