"""One indexing pipeline per process, so each one's peak RSS is its own.

``python bench/pipelines.py naive|imagefinder|forward --folder DIR --db PATH ...``
prints one JSON line. ``run()`` starts that process and adds the child's peak RSS
(``ru_maxrss`` from ``wait4``). Timings start after the model is loaded and warmed
up (``WARMUP`` forwards of the batch shape the run uses): they measure files to
committed rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Forwards before the clock starts: oneDNN and the allocator take a few to settle,
# which a short run would otherwise pay and a long indexing job would not.
WARMUP = 5


def naive(args) -> dict:
    """The seeds' way: per image a full decode, a squashing resize, batch 1, insert, commit."""
    import torch
    from PIL import Image
    from torchvision import transforms

    from imagefinder.files import sha256_file
    from imagefinder.indexer import scan
    from imagefinder.model.registry import spec_for
    from imagefinder.store import Item
    from imagefinder.store.sqlite import SQLiteStore

    torch.set_num_threads(args.threads)
    spec = spec_for(args.model)
    model, weights_id = spec.build(args.weights)
    model.eval()
    transform = transforms.Compose(
        [
            transforms.Resize((spec.input_size, spec.input_size)),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )
    store = SQLiteStore(args.db)
    store.ensure_schema(
        {
            "model": spec.name,
            "weights": weights_id,
            "dim": str(spec.dim),
            "preprocessing": "naive: resize to 224x224 (aspect not kept), full decode",
        }
    )
    files, _ = scan(Path(args.folder))
    with torch.inference_mode():
        for _ in range(WARMUP):
            model(torch.zeros(1, 3, spec.input_size, spec.input_size))
    start = time.perf_counter()
    for c in files:
        img = Image.open(c.path).convert("RGB")
        with torch.inference_mode():
            out = model(transform(img).unsqueeze(0))
        vector = torch.nn.functional.normalize(out, dim=1)[0].numpy()
        store.upsert([Item(c.id, str(c.path), sha256_file(c.path), c.size, c.mtime_ns, vector)])
    seconds = time.perf_counter() - start
    return {"images": store.count(), "seconds": seconds}


def imagefinder(args) -> dict:
    """The project's pipeline, exactly as ``imagefinder extract`` runs it."""
    import torch

    from imagefinder.indexer import index_folder
    from imagefinder.store.sqlite import SQLiteStore

    embedder, load_seconds = _load(args, args.folder)
    size = embedder.spec.input_size
    for _ in range(WARMUP):
        embedder.embed_tensors(torch.zeros(args.batch_size, 3, size, size))
    store = SQLiteStore(args.db)
    start = time.perf_counter()
    summary = index_folder(
        args.folder,
        store,
        embedder,
        batch_size=args.batch_size,
        workers=args.workers,
        overlap=args.overlap,
    )
    seconds = time.perf_counter() - start
    return {
        "images": store.count(),
        "seconds": seconds,
        "skipped": summary.skipped,
        "load_seconds": load_seconds,
    }


def forward(args) -> dict:
    """The model alone on ready tensors: the ceiling for the whole pipeline."""
    import torch

    embedder, load_seconds = _load(args, args.calibration)
    size = embedder.spec.input_size
    per_batch = {}
    for bs in args.batch_sizes:
        x = torch.randn(bs, 3, size, size)
        embedder.embed_tensors(x)  # warm-up: oneDNN builds its kernels per shape
        windows = []
        for _ in range(3):  # the median of three windows: one lucky window is no ceiling
            n, start = 0, time.perf_counter()
            while n < args.images or time.perf_counter() - start < args.min_seconds:
                embedder.embed_tensors(x)
                n += bs
            windows.append(n / (time.perf_counter() - start))
        per_batch[bs] = sorted(windows)[1]
    best = max(per_batch, key=per_batch.get)
    return {
        "images_per_s": per_batch[best],
        "best_batch": best,
        "per_batch": per_batch,
        "load_seconds": load_seconds,
    }


def _load(args, calibration_folder):
    """The embedder as ``imagefinder extract`` loads it (int8 calibrates on the folder)."""
    from imagefinder.indexer import calibration_sample
    from imagefinder.model.embedder import load_embedder

    start = time.perf_counter()
    calibration = ()
    if args.precision == "int8" and calibration_folder:
        calibration = calibration_sample(calibration_folder)
    embedder = load_embedder(args.model, args.weights, args.precision, args.threads, calibration)
    return embedder, time.perf_counter() - start


PIPELINES = {"naive": naive, "imagefinder": imagefinder, "forward": forward}


def run(pipeline: str, timeout: float = 1800, env: dict | None = None, **options) -> dict:
    """Run ``pipeline`` in a child process; its JSON result plus its peak RSS in MB."""
    cmd = [sys.executable, str(Path(__file__).resolve()), pipeline]
    for key, value in options.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd += [flag] if value else []
            continue
        cmd += [flag, *map(str, value)] if isinstance(value, list | tuple) else [flag, str(value)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, **(env or {})}, text=True
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    if "images_per_s" not in result:
        result["images_per_s"] = result["images"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pipeline", choices=PIPELINES)
    parser.add_argument("--folder")
    parser.add_argument("--db")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--weights")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--overlap", action="store_true", help="decode beside inference")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--images", type=int, default=64, help="forward: images per batch size")
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--calibration", help="forward: folder of int8 calibration images")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    print(json.dumps(PIPELINES[args.pipeline](args)))


if __name__ == "__main__":
    main()
