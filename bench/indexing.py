"""Sections 1 and 2: indexing throughput (files to committed rows) and retrieval quality.

Every pipeline runs in its own process (``pipelines.py``) on the same files, one after
another, so the ratios compare like with like. The Caltech indexes built here with
efficientnet-lite0 are then evaluated leave-one-out, so a faster mode can never
silently cost quality.
"""

from __future__ import annotations

import importlib.util
import inspect
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pipelines
from corpus import CACHE, CALTECH, caltech_subset, large_photos

from imagefinder.config import Settings
from imagefinder.evaluate import evaluate_index
from imagefinder.indexer import index_folder
from imagefinder.model.registry import MODELS as REGISTRY
from imagefinder.model.registry import PRECISIONS
from imagefinder.store.sqlite import SQLiteStore

# The models this benchmark times: the default (with random weights: speed only) and the
# offline one (speed and quality). Names come from the registry, so a rename breaks here.
MODELS = tuple(REGISTRY[name].name for name in ("resnet50", "efficientnet-lite0"))
RANDOM_WEIGHTS = CACHE / "resnet50-random.pth"


def defaults() -> dict:
    """The settings ``imagefinder extract`` uses when given no options."""
    params = inspect.signature(index_folder).parameters
    return {
        "batch_size": Settings().batch_size,
        "workers": params["workers"].default,
        "overlap": params["overlap"].default,
    }


def random_resnet50() -> str:
    """A ResNet50 state dict with random weights: same cost as real ones, no download."""
    if not RANDOM_WEIGHTS.is_file():
        import torch
        from torchvision.models import resnet50

        torch.manual_seed(0)
        RANDOM_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
        torch.save(resnet50().state_dict(), RANDOM_WEIGHTS)
    return str(RANDOM_WEIGHTS)


def available_precisions() -> list[str]:
    have_ov = importlib.util.find_spec("openvino") is not None
    have_nncf = importlib.util.find_spec("nncf") is not None
    return [
        p for p in PRECISIONS if p in ("fp32", "bf16") or (have_ov and (p != "int8" or have_nncf))
    ]


def warm_files(folder: Path) -> None:
    """Read every file once so no pipeline pays for the first disk read."""
    subprocess.run(f"cat {folder}/* {folder}/*/* > /dev/null 2>&1", shell=True, check=False)


def run_indexing(work: Path, quick: bool, log) -> dict:
    large_n = 12 if quick else 96
    caltech_n = 100 if quick else None
    corpora = {
        f"large ({large_n} x 12 MP JPEG)": large_photos(large_n),
        f"caltech ({caltech_n or 500} photos as they are)": caltech_subset(caltech_n),
    }
    precisions = available_precisions()
    weights = {"resnet50": random_resnet50(), "efficientnet-lite0": None}
    settings = defaults()
    # A cache of converted OpenVINO models of its own, so a first run shows conversion times.
    env = {"TORCH_HOME": str(CACHE / "torch")}
    rows, forward, dbs = [], {}, {}

    for model in MODELS:
        for precision in precisions:
            log(f"forward-only {model} {precision}")
            forward[(model, precision)] = pipelines.run(
                "forward",
                env=env,
                model=model,
                weights=weights[model],
                precision=precision,
                batch_sizes=[1, 8, 16, 32],
                images=16 if quick else 48,
                min_seconds=1.0 if quick else 2.5,
                calibration=str(CALTECH),
            )

    for corpus_name, folder in corpora.items():
        warm_files(folder)
        for model in MODELS:
            db = work / f"{model}-naive-{len(dbs)}.db"
            log(f"{corpus_name} {model} naive")
            naive = pipelines.run(
                "naive", env=env, folder=folder, db=db, model=model, weights=weights[model]
            )
            dbs[(corpus_name, model, "naive")] = db
            rows.append(row(corpus_name, model, "naive reference", "fp32", naive, naive, None))
            for precision in precisions:
                db = work / f"{model}-{precision}-{len(dbs)}.db"
                log(f"{corpus_name} {model} {precision}")
                result = pipelines.run(
                    "imagefinder",
                    env=env,
                    folder=folder,
                    db=db,
                    model=model,
                    weights=weights[model],
                    precision=precision,
                    **settings,
                )
                dbs[(corpus_name, model, precision)] = db
                rows.append(
                    row(
                        corpus_name,
                        model,
                        "imagefinder",
                        precision,
                        result,
                        naive,
                        forward[(model, precision)],
                    )
                )
    forward_rows = [
        {
            "model": model,
            "precision": precision,
            "images_per_s": r["images_per_s"],
            "best_batch": r["best_batch"],
            "per_batch": r["per_batch"],
            "peak_rss_mb": r["peak_rss_mb"],
            "prepare_seconds": r.get("load_seconds"),
        }
        for (model, precision), r in forward.items()
    ]
    caltech_key = next(k for k in corpora if k.startswith("caltech"))
    quality_dbs = {
        label: dbs[(caltech_key, "efficientnet-lite0", label)] for label in ["naive", *precisions]
    }
    return {
        "settings": settings,
        "rows": rows,
        "forward": forward_rows,
        "quality_dbs": {k: str(v) for k, v in quality_dbs.items()},
    }


def row(corpus, model, pipeline, precision, result, naive, forward) -> dict:
    out = {
        "corpus": corpus,
        "model": model,
        "pipeline": pipeline,
        "precision": precision,
        "images": result["images"],
        "images_per_s": result["images_per_s"],
        "vs_naive": result["images_per_s"] / naive["images_per_s"],
        "peak_rss_mb": result["peak_rss_mb"],
    }
    if forward:
        out["vs_forward_only"] = result["images_per_s"] / forward["images_per_s"]
        out["forward_only_images_per_s"] = forward["images_per_s"]
    return out


def sweep(work: Path, quick: bool, log) -> list[dict]:
    """Batch size x decode workers x torch threads x decoding beside inference or
    between batches, on the large photos (ResNet50 fp32)."""
    folder = large_photos(12 if quick else 96)
    warm_files(folder)
    out = []
    combos = [(bs, 2, 2, False) for bs in (4, 8, 16, 32)]
    combos += [(8, 1, 2, False), (8, 1, 1, False)]
    combos += [(bs, w, 2, True) for bs in (8, 16) for w in (1, 2)]
    for bs, w, t, overlap in combos:
        log(f"sweep batch {bs} workers {w} threads {t} overlap {overlap}")
        db = work / f"sweep-{bs}-{w}-{t}-{overlap}.db"
        r = pipelines.run(
            "imagefinder",
            folder=folder,
            db=db,
            model="resnet50",
            weights=random_resnet50(),
            precision="fp32",
            batch_size=bs,
            workers=w,
            threads=t,
            overlap=overlap,
        )
        out.append(
            {
                "batch_size": bs,
                "workers": w,
                "threads": t,
                "overlap": overlap,
                "images_per_s": r["images_per_s"],
            }
        )
        db.unlink()
    return out


def run_quality(quality_dbs: dict[str, str], work: Path, log) -> dict:
    """Leave-one-out precision@3 and mAP of every lite0 Caltech index, plus how close
    each mode's vectors are to fp32's (the vectors a default server would query with)."""
    results = {}
    reference = vectors_by_id(SQLiteStore(quality_dbs["fp32"]))
    for label, db in quality_dbs.items():
        log(f"quality {label}")
        store = SQLiteStore(db, exact=True)
        report = evaluate_index(store, CALTECH, k=3)
        entry = {
            "precision_at_3": report["precision_at_k"],
            "map": report["map"],
            "queries": report["queries"],
        }
        if label != "naive":
            mine = vectors_by_id(store)
            ids = sorted(mine)
            cos = np.einsum(
                "ij,ij->i", np.stack([mine[i] for i in ids]), np.stack([reference[i] for i in ids])
            )
            entry["cosine_to_fp32_mean"] = float(cos.mean())
            entry["cosine_to_fp32_min"] = float(cos.min())
            entry["precision_at_3_fp32_queries"] = cross_precision(store, reference)
        results[label] = entry
    # The fast KNN path on real vectors: the fp32 index with the inverted file forced on.
    fast_db = work / "caltech-fp32-fastknn.db"
    shutil.copy(quality_dbs["fp32"], fast_db)
    forced = SQLiteStore(fast_db, fast_min_rows=1)
    forced.end_bulk()
    assert forced.search_mode() == "ivf+rerank"
    report = evaluate_index(forced, CALTECH, k=3)
    exact = SQLiteStore(fast_db, exact=True)
    recall = np.mean(
        [
            len({i for i, _ in forced.knn(v, 3, [key])} & {i for i, _ in exact.knn(v, 3, [key])})
            / 3
            for key, v in reference.items()
        ]
    )
    results["fp32, ivf+rerank KNN"] = {
        "precision_at_3": report["precision_at_k"],
        "map": report["map"],
        "queries": report["queries"],
        "recall_at_3_vs_exact": float(recall),
    }
    return results


def vectors_by_id(store: SQLiteStore) -> dict[str, np.ndarray]:
    return {i: v for chunk in store.iter_vectors() for i, _, v in chunk}


def cross_precision(store: SQLiteStore, queries: dict[str, np.ndarray]) -> float:
    """precision@3 when fp32 query vectors search this index (a default server's case)."""
    label = {i: Path(p).resolve().parent.name for c in store.iter_vectors() for i, p, _ in c}
    hits = [
        np.mean([label[n] == label[key] for n, _ in store.knn(v, 3, [key])])
        for key, v in queries.items()
        if key in label
    ]
    return float(np.mean(hits))
