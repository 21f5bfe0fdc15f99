"""Thumbnails: small JPEGs of catalogue images, made once and kept on disk.

The cache is a folder beside a SQLite index (``<db>.thumbs/``), or the one
``IMAGEFINDER_THUMBS_DIR`` names. File names are hashes, never ids: an id is
only ever a key into the index, so no id can name a path. A name is ``<sha256(id)>-<version>.jpg`` where the version hashes the
content hash the index recorded plus the file's current size and mtime, so an
image replaced on disk or re-indexed gets a new thumbnail (and a new ETag).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..config import Settings
from ..files import new_temp
from ..images import load_rgb
from ..store import FileState, Store

SIDE = 256
QUALITY = 82
# Part of every version: bump it when SIDE or QUALITY change so old files are not served.
RECIPE = f"v1-{SIDE}-{QUALITY}"


@dataclass(frozen=True)
class Version:
    """Which rendering of one catalogue file a client holds; cheap to compute (one stat)."""

    id_key: str
    tag: str

    @property
    def filename(self) -> str:
        return f"{self.id_key}-{self.tag}.jpg"


def cache_dir(settings: Settings, store: Store) -> Path:
    """Where thumbnails of ``store``'s images live (``IMAGEFINDER_THUMBS_DIR`` wins)."""
    if settings.thumbs_dir:
        return Path(settings.thumbs_dir)
    if store.kind == "sqlite":
        return Path(f"{store.location}.thumbs")
    # A server index has no folder of its own; one per database keeps them apart.
    return Path("data") / "thumbs" / hashlib.sha256(store.location.encode()).hexdigest()[:16]


def version_of(image_id: str, state: FileState) -> Version:
    """The version of ``image_id``'s file as it is on disk now. Raises OSError if it is gone."""
    st = os.stat(state.path)
    id_key = hashlib.sha256(image_id.encode("utf-8", "surrogatepass")).hexdigest()
    stamp = f"{state.sha256}:{st.st_size}:{st.st_mtime_ns}:{RECIPE}"
    return Version(id_key, hashlib.sha256(stamp.encode()).hexdigest()[:20])


def cached(cache: Path, version: Version) -> Path | None:
    """The thumbnail for ``version`` if it was made already."""
    target = cache / version.filename
    return target if target.is_file() else None


def thumbnail(
    cache: Path,
    version: Version,
    source: str | Path,
    max_pixels: int,
    decode: Callable[..., Image.Image] = load_rgb,
) -> Path:
    """The cached thumbnail for ``version``, made from ``source`` if not there yet.

    Raises ImageError if ``source`` no longer decodes, OSError if it cannot be read.
    """
    target = cache / version.filename
    if target.is_file():
        return target
    img = decode(source, max_pixels, min_side=SIDE)
    img.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    cache.mkdir(parents=True, exist_ok=True)
    # Write then rename: concurrent requests for one image never see half a file.
    fd, tmp = new_temp(cache, ".tmp-", ".jpg")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, "JPEG", quality=QUALITY, optimize=True)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _drop_stale(cache, version)
    return target


def _drop_stale(cache: Path, version: Version) -> None:
    """Remove this id's thumbnails of earlier versions of its file."""
    for old in cache.glob(f"{version.id_key}-*.jpg"):
        if old.name != version.filename:
            old.unlink(missing_ok=True)
