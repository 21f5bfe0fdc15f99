"""Calibrate each model's duplicate levels on real photos, and time grouping at scale.

    python bench/duplicates.py [--model NAME ...] [--weights W] [--commit]
    python bench/duplicates.py --only-scale [--scale 100000] [--commit]

1. Calibration, per model, on ../shared/data/caltech101-dev (500 photos, 25 classes):
   - positives: each photo against an edited copy of itself, 4 edits per photo drawn
     in turn from EDITS (JPEG re-encoding at quality 30-70; resizing to 50-80%; a
     thumbnail, short side 64-100 px; crops of 0-8% a side; EXIF rotation; a watermark
     band over ~5%; brightness, contrast and saturation shifts of 20-30%; WebP; a
     re-upload chain), each copy encoded to a file and embedded through the same
     decoder as an upload;
   - hard negatives: every pair of distinct photos of one class (4,750 pairs);
   - ``near``: the largest distance at which precision (positives among the pairs at
     or under it) is >= 0.99, on all classes and on each half of them (a 2-fold split
     by class), whichever is smallest: a cut chosen on one half reached only ~0.92 on
     the other in a first run, and a false "near duplicate" is the error users resent.
     Recall = positives at or under it. Each fold's cut is also measured on the other
     half (held out);
   - ``similar``: the largest distance at which a pair of distinct photos is at least
     SIMILAR_PRECISION likely to be of one class (all 124,750 pairs: 4,750 same-class,
     120,000 across classes), and never below ``near``.
2. Grouping time: ``duplicates.find`` over N synthetic vectors (tests/support.py's
   clustered_vectors, 1280-d, 1% planted near copies) in a SQLite index, at the lite2
   distances; and, for comparison, per-image KNN through the store, extrapolated from
   200 queries.

Prints everything; with ``--commit`` writes bench/results/duplicates.{json,md}. Copy the
thresholds into imagefinder/model/registry.py (``DuplicateThresholds``).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

import fake_model  # noqa: E402,F401  (registers the tests' fake model, for --model fake-colour)
from support import CALTECH, clustered_vectors  # noqa: E402

from imagefinder import duplicates  # noqa: E402
from imagefinder.images import load_rgb  # noqa: E402
from imagefinder.model.embedder import load_embedder  # noqa: E402
from imagefinder.store import Item, open_store  # noqa: E402

MODELS = ("efficientnet-lite0", "efficientnet-lite2")
NEAR_PRECISION = 0.99
SIMILAR_PRECISION = 0.9
EDITS_PER_PHOTO = 4
SEED = 13


# -- edits: each takes an RGB image and a generator, returns the bytes of a file -----


def _jpeg(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def reencode(img, rng):
    return _jpeg(img, int(rng.integers(30, 71)))


def resize(img, rng):
    f = rng.uniform(0.5, 0.8)
    return _jpeg(img.resize((max(8, round(img.width * f)), max(8, round(img.height * f)))))


def thumbnail(img, rng):
    """A thumbnail: the short side 64-100 px, well under the models' input size."""
    f = rng.uniform(64, 100) / min(img.size)
    return _jpeg(img.resize((max(8, round(img.width * f)), max(8, round(img.height * f)))))


def crop(img, rng):
    w, h = img.size
    left, right, top, bottom = rng.uniform(0, 0.08, 4)
    box = (round(w * left), round(h * top), round(w * (1 - right)), round(h * (1 - bottom)))
    return _jpeg(img.crop(box))


def exif_rotate(img, rng):
    """Pixels stored sideways with an EXIF Orientation tag, as cameras write them."""
    orientation = int(rng.choice([3, 6, 8]))
    stored = img.transpose(
        {
            3: Image.Transpose.ROTATE_180,
            6: Image.Transpose.ROTATE_90,
            8: Image.Transpose.ROTATE_270,
        }[orientation]
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(stored, exif=exif.tobytes())


def overlay(img, rng):
    """A watermark: a caption on a translucent band in a corner, ~5% of the area."""
    out = img.convert("RGBA")
    w, h = out.size
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    bw, bh = round(w * rng.uniform(0.25, 0.35)), round(h * rng.uniform(0.12, 0.18))
    x = 0 if rng.random() < 0.5 else w - bw
    y = 0 if rng.random() < 0.5 else h - bh
    draw.rectangle((x, y, x + bw, y + bh), fill=(255, 255, 255, 150))
    draw.text((x + 4, y + 2), "© photo 2026", fill=(20, 20, 20, 255))
    return _jpeg(Image.alpha_composite(out, layer).convert("RGB"))


def colour(img, rng):
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))
    return _jpeg(ImageEnhance.Color(img).enhance(rng.uniform(0.7, 1.3)))


def webp(img, rng):
    buf = io.BytesIO()
    img.save(buf, "WEBP", quality=int(rng.integers(60, 81)))
    return buf.getvalue()


def reupload(img, rng):
    """What a round trip through a chat app or a shop does: smaller, trimmed, recompressed."""
    w, h = img.size
    m = rng.uniform(0.02, 0.05)
    img = img.crop((round(w * m), round(h * m), round(w * (1 - m)), round(h * (1 - m))))
    f = rng.uniform(0.5, 0.8)
    img = img.resize((max(8, round(img.width * f)), max(8, round(img.height * f))))
    return _jpeg(img, int(rng.integers(50, 71)))


EDITS = {
    f.__name__: f
    for f in (reencode, resize, thumbnail, crop, exif_rotate, overlay, colour, webp, reupload)
}


# -- calibration --------------------------------------------------------------------------


def embed_all(embedder, blobs: list[bytes], batch: int = 16) -> np.ndarray:
    import torch

    out = []
    for start in range(0, len(blobs), batch):
        tensors = [
            embedder.preprocess(load_rgb(b, 100_000_000, min_side=embedder.min_side))
            for b in blobs[start : start + batch]
        ]
        out.append(embedder.embed_tensors(torch.stack(tensors)))
    return np.concatenate(out)


def best_cut(pos: np.ndarray, neg: np.ndarray, precision: float) -> float:
    """The largest distance d with precision(d) >= ``precision`` (a pair at or under d
    predicted positive)."""
    values = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    order = np.argsort(values, kind="stable")
    tp = np.cumsum(labels[order])
    prec = tp / np.arange(1, len(values) + 1)
    ok = np.flatnonzero(prec >= precision)
    # Only cut between distinct values: ties on either side go together.
    ok = [i for i in ok if i + 1 == len(values) or values[order[i + 1]] > values[order[i]]]
    return float(values[order[ok[-1]]]) if ok else 0.0


def scores(pos: np.ndarray, neg: np.ndarray, cut: float) -> dict:
    tp, fp = int((pos <= cut).sum()), int((neg <= cut).sum())
    return {
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / len(pos) if len(pos) else 0.0,
        "positives": len(pos),
        "negatives": len(neg),
        "false_positives": fp,
    }


def calibrate(name: str, weights: str | None) -> dict:
    embedder = load_embedder(name, weights)
    photos = sorted(CALTECH.glob("*/*.jpg"))
    classes = sorted({p.parent.name for p in photos})
    label = np.array([classes.index(p.parent.name) for p in photos])
    originals = [p.read_bytes() for p in photos]
    rng = np.random.default_rng(SEED)
    names = list(EDITS)
    pairs, blobs = [], []
    for i in range(len(photos)):
        img = load_rgb(originals[i], 100_000_000)
        for j in range(EDITS_PER_PHOTO):
            edit = names[(i + j * 2) % len(names)]
            pairs.append((i, edit))
            blobs.append(EDITS[edit](img, rng))
    start = time.perf_counter()
    base = embed_all(embedder, originals)
    edited = embed_all(embedder, blobs)
    seconds = time.perf_counter() - start
    pos = np.linalg.norm(edited - base[[i for i, _ in pairs]], axis=1)
    dist = np.sqrt(np.maximum(2 - 2 * base @ base.T, 0))
    iu = np.triu_indices(len(photos), 1)
    same = label[iu[0]] == label[iu[1]]
    neg = dist[iu][same]
    cross = dist[iu][~same]
    # Label noise, if any: one photo twice in Caltech-101 under two names.
    copies = [
        (photos[a].relative_to(CALTECH).as_posix(), photos[b].relative_to(CALTECH).as_posix())
        for a, b in zip(*iu, strict=True)
        if dist[a, b] < 0.05
    ]
    folds = []
    for half in (0, 1):
        chosen = label % 2 == half
        pick = np.array([chosen[i] for i, _ in pairs])
        neg_pick = same & chosen[iu[0]]
        neg_held = same & ~chosen[iu[0]]
        cut = best_cut(pos[pick], dist[iu][neg_pick], NEAR_PRECISION)
        folds.append({"cut": cut, **scores(pos[~pick], dist[iu][neg_held], cut)})
    near = min(best_cut(pos, neg, NEAR_PRECISION), *(f["cut"] for f in folds))
    similar = max(near, best_cut(neg, cross, SIMILAR_PRECISION))
    everything = np.concatenate([base, edited])
    grouping = {
        level: pair_recall(everything, cut, np.arange(len(everything)))
        for level, cut in (("near", near), ("similar", similar))
    }
    per_edit = {
        e: float((pos[[k for k, (_, edit) in enumerate(pairs) if edit == e]] <= near).mean())
        for e in names
    }
    return {
        "model": name,
        "weights": embedder.weights_id,
        "photos": len(photos),
        "embed_seconds": round(seconds, 1),
        "near": round(near, 4),
        "near_scores": scores(pos, neg, near),
        "held_out": folds,
        "recall_per_edit": per_edit,
        "similar": round(similar, 4),
        "similar_scores": scores(neg, cross, similar),
        "near_copies_in_caltech": copies,
        # duplicates.radius_pairs against every pair, over the photos and their copies.
        "grouping_pair_recall": grouping,
        "distances": {
            "positives_p50_p99": [float(np.percentile(pos, q)) for q in (50, 99)],
            "hard_negatives_p1_p50": [float(np.percentile(neg, q)) for q in (1, 50)],
            "cross_class_p1_p50": [float(np.percentile(cross, q)) for q in (1, 50)],
        },
    }


def pair_recall(matrix: np.ndarray, radius: float, rows: np.ndarray) -> float:
    """Of the pairs within ``radius`` that involve ``rows``, the share
    ``duplicates.radius_pairs`` finds (the truth: every pair compared)."""
    wanted = set()
    for lo in range(0, len(rows), 1000):
        chunk = rows[lo : lo + 1000]
        d2 = np.einsum("ij,ij->i", matrix[chunk], matrix[chunk])[:, None]
        d2 = d2 + np.einsum("ij,ij->i", matrix, matrix) - 2 * matrix[chunk] @ matrix.T
        a, b = np.nonzero(d2 <= radius * radius)
        wanted |= {(int(chunk[x]), int(y)) for x, y in zip(a, b, strict=True) if chunk[x] != y}
    if not wanted:
        return 1.0
    chosen = np.zeros(len(matrix), bool)
    chosen[rows] = True
    found = set()
    for a, b in duplicates.radius_pairs(matrix, radius):
        for x, y in ((a, b), (b, a)):
            keep = chosen[x]
            found |= set(zip(x[keep].tolist(), y[keep].tolist(), strict=True))
    return len(found & wanted) / len(wanted)


# -- grouping at scale --------------------------------------------------------------------


def scale(n: int, near: float, similar: float, tmp: Path) -> dict:
    rng = np.random.default_rng(SEED)
    vectors = clustered_vectors(n, 1280, seed=SEED)
    # 1% planted near copies: a vector nudged to about half the near distance.
    chosen = rng.choice(n, 2 * (n // 100), replace=False)
    sources, planted = chosen[: n // 100], chosen[n // 100 :]
    noise = rng.standard_normal((len(planted), 1280)).astype(np.float32)
    noise *= (near / 2) / np.linalg.norm(noise, axis=1, keepdims=True)
    nudged = vectors[sources] + noise
    vectors[planted] = nudged / np.linalg.norm(nudged, axis=1, keepdims=True)
    store = open_store(str(tmp / f"dup{n}.db"))
    store.ensure_schema(
        {"model": "synthetic", "weights": "none", "dim": "1280", "preprocessing": "none"}
    )
    start = time.perf_counter()
    store.begin_bulk(n)
    for lo in range(0, n, 2000):
        store.upsert(
            Item(f"v{i:06d}", f"/x/{i}", f"h{i}", 1, 1, vectors[i])
            for i in range(lo, min(n, lo + 2000))
        )
    store.end_bulk()
    build = time.perf_counter() - start
    out = {"vectors": n, "dim": 1280, "planted_pairs": len(planted), "index_build_s": build}
    for level, distance in (("near", near), ("similar", similar)):
        start = time.perf_counter()
        report = duplicates.find(store, level, distance)
        out[level] = {
            "distance": distance,
            "seconds": time.perf_counter() - start,
            "groups": len(report.groups),
            "grouped_images": sum(len(g.ids) for g in report.groups),
            "largest_group": max((len(g.ids) for g in report.groups), default=0),
            # Pairs found among those of 2,000 sampled images, vs comparing every pair.
            "pair_recall_sample": pair_recall(vectors, distance, rng.choice(n, 2000, False)),
        }
        print(f"{n} vectors, {level} ({distance}): {out[level]}", flush=True)
    start = time.perf_counter()
    duplicates.load_vectors(store, 1280)
    out["load_vectors_s"] = time.perf_counter() - start
    times = []
    for i in rng.choice(n, 200, replace=False):
        t = time.perf_counter()
        store.knn(vectors[i], 10)
        times.append(time.perf_counter() - t)
    out["knn_per_image_ms"] = float(np.mean(times)) * 1000
    out["knn_per_image_extrapolated_s"] = float(np.mean(times)) * n
    out["search_mode"] = store.search_mode()
    store.close()
    return out


def markdown(result: dict) -> str:
    lines = [
        "# Duplicate levels: calibration and grouping time",
        "",
        f"`{result['command']}` - {result['when']}, {result['machine']}.",
        "",
        "## Calibration (../shared/data/caltech101-dev, 500 photos)",
        "",
        f"Positives: each photo against {EDITS_PER_PHOTO} edited copies of itself "
        f"({', '.join(EDITS)}; ~{500 * EDITS_PER_PHOTO // len(EDITS)} copies per edit, "
        "parameters in the script's docstring). Hard negatives: the 4,750 pairs of "
        f"distinct photos of one class. near = the largest distance with precision >= "
        f"{NEAR_PRECISION} on all classes and on each half of them (2 folds by class), the "
        "smallest of the three; similar = the largest distance at which a pair of distinct photos "
        f"is at least {SIMILAR_PRECISION:.0%} likely to be of one class (4,750 same-class vs "
        "120,000 cross-class pairs).",
        "",
        "| model | weights | near | precision | recall | held-out precision / recall at "
        "each fold's own cut | similar | same-class precision / recall at similar |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result["calibration"]:
        ns, ss = c["near_scores"], c["similar_scores"]
        folds = "; ".join(f"{f['precision']:.3f} / {f['recall']:.3f}" for f in c["held_out"])
        lines.append(
            f"| {c['model']} | {c['weights']} | {c['near']:.4f} | {ns['precision']:.4f} | "
            f"{ns['recall']:.4f} | {folds} | {c['similar']:.4f} | "
            f"{ss['precision']:.3f} / {ss['recall']:.3f} |"
        )
    lines += [
        "",
        "Grouping (duplicates.radius_pairs, an inverted file probing "
        f"{duplicates.PROBES} lists) against comparing every pair, over the photos and "
        "their edited copies: pair recall "
        + "; ".join(
            f"{c['model']} near {c['grouping_pair_recall']['near']:.4f}, similar "
            f"{c['grouping_pair_recall']['similar']:.4f}"
            for c in result["calibration"]
        )
        + ".",
    ]
    lines += ["", "Recall at the near distance, per edit:", ""]
    names = list(EDITS)
    lines.append("| model | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for c in result["calibration"]:
        lines.append(
            f"| {c['model']} | "
            + " | ".join(f"{c['recall_per_edit'][e]:.3f}" for e in names)
            + " |"
        )
    for c in result["calibration"]:
        if c["near_copies_in_caltech"]:
            lines.append("")
            lines.append(
                f"{c['model']}: distinct Caltech files closer than 0.05 (counted as "
                f"negatives): {c['near_copies_in_caltech']}"
            )
    if result.get("scale"):
        s = result["scale"]
        lines += [
            "",
            f"## Grouping {s['vectors']:,} vectors ({s['dim']}-d synthetic, "
            f"{s['planted_pairs']:,} planted near copies), SQLite",
            "",
            "| level | distance | seconds | groups | images in groups | largest | pair recall |",
            "|---|---|---|---|---|---|---|",
        ]
        for level in ("near", "similar"):
            r = s[level]
            lines.append(
                f"| {level} | {r['distance']} | {r['seconds']:.1f} | {r['groups']:,} | "
                f"{r['grouped_images']:,} | {r['largest_group']} | {r['pair_recall_sample']:.4f} |"
            )
        lines += [
            "",
            "Pair recall: of the pairs within the distance that involve 2,000 sampled "
            "images, the share found (the truth: those images compared with every other). "
            f"Of the time, reading the vectors: {s['load_vectors_s']:.1f} s. Per-image KNN "
            f"through the store instead ({s['search_mode']}, k=10): "
            f"{s['knn_per_image_ms']:.1f} ms a query, {s['knn_per_image_extrapolated_s']:.0f} s "
            "for every image.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="model(s) to calibrate")
    parser.add_argument("--weights", help="weights for --model (one model)")
    parser.add_argument("--scale", type=int, default=100_000, help="vectors for the timing")
    parser.add_argument("--only-scale", action="store_true")
    parser.add_argument("--no-scale", action="store_true")
    parser.add_argument("--commit", action="store_true", help="write bench/results/duplicates.*")
    args = parser.parse_args()
    started = time.time()
    result: dict = {
        "command": "python bench/duplicates.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{len(__import__('os').sched_getaffinity(0))} cores",
        "calibration": [],
    }
    results = HERE / "results" / "duplicates.json"
    if args.only_scale and results.exists():
        result["calibration"] = json.loads(results.read_text())["calibration"]
    else:
        for name in args.model or MODELS:
            c = calibrate(name, args.weights)
            print(json.dumps(c, indent=2), flush=True)
            result["calibration"].append(c)
    if not args.no_scale:
        lite2 = next((c for c in result["calibration"] if c["model"] == MODELS[1]), None)
        near, similar = (lite2["near"], lite2["similar"]) if lite2 else (0.5, 0.9)
        with tempfile.TemporaryDirectory() as tmp:
            result["scale"] = scale(args.scale, near, similar, Path(tmp))
    result["seconds"] = time.time() - started
    text = markdown(result)
    print(text)
    if args.commit:
        results.write_text(json.dumps(result, indent=2) + "\n")
        results.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
