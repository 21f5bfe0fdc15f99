"""Benchmark photos, generated locally: 12 MP JPEGs upscaled from the Caltech photos.

Nothing here is committed: photos go to a cache directory outside the repo and are
reused across runs (they are deterministic functions of the Caltech photos).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CALTECH = ROOT.parent / "shared" / "data" / "caltech101-dev"
CACHE = Path(
    os.environ.get("IMAGEFINDER_BENCH_CACHE", Path.home() / ".cache" / "imagefinder-bench")
)
LARGE_SIZE = (4000, 3000)
LARGE_QUALITY = 90


def caltech_photos(limit: int | None = None) -> list[Path]:
    """Caltech photos in a fixed order that spreads over the classes."""
    by_class = [sorted(d.glob("*.jpg")) for d in sorted(CALTECH.iterdir()) if d.is_dir()]
    order = [p for row in zip(*by_class, strict=False) for p in row]
    order += sorted(set(p for c in by_class for p in c) - set(order))
    return order[:limit] if limit else order


def large_photos(count: int) -> Path:
    """A folder of ``count`` 4000x3000 quality-90 JPEGs upscaled from Caltech photos."""
    folder = CACHE / f"large-{LARGE_SIZE[0]}x{LARGE_SIZE[1]}-q{LARGE_QUALITY}"
    folder.mkdir(parents=True, exist_ok=True)
    for src in caltech_photos(count):
        dst = folder / f"{src.parent.name}-{src.stem}.jpg"
        if dst.exists():
            continue
        with Image.open(src) as img:
            big = img.convert("RGB").resize(LARGE_SIZE, Image.Resampling.BICUBIC)
        tmp = dst.with_suffix(".tmp")
        big.save(tmp, "JPEG", quality=LARGE_QUALITY)
        tmp.replace(dst)
    return subset(folder, count)


def subset(folder: Path, count: int) -> Path:
    """A folder of symlinks to the first ``count`` files of ``folder`` (an exact corpus size)."""
    files = sorted(folder.glob("*.jpg"))[:count]
    out = folder.parent / f"{folder.name}-first{count}"
    out.mkdir(exist_ok=True)
    for f in files:
        link = out / f.name
        if not link.exists():
            link.symlink_to(f)
    return out


def caltech_subset(count: int | None) -> Path:
    """The Caltech photos (all, or ``count`` spread over the classes), class folders kept.

    A subset is a tree of symlinks; indexes record resolved paths, so evaluate them
    against ``CALTECH`` itself.
    """
    if not count:
        return CALTECH
    out = CACHE / f"caltech-first{count}"
    for src in caltech_photos(count):
        link = out / src.parent.name / src.name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(src)
    return out
