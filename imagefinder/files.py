"""Files of the catalogue folder: content hashes, and ``<id>.<ext>`` written atomically.

A file is written to a hidden temporary name in its final folder (same filesystem,
so the rename is atomic) and renamed into place: a crash never leaves a half file
under a real name, and leftovers are swept on the next run.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .images import FORMATS, SUFFIXES

TEMP_PREFIX = ".imagefinder-"
TEMP_SUFFIX = ".part"


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def existing_file(output_dir: Path, image_id: str, names: set[str] | None = None) -> Path | None:
    """The file saved for ``image_id`` in ``output_dir``, whatever its format. ``names``:
    the folder's listing, if the caller has it (one set lookup instead of a stat)."""
    for ext in SUFFIXES:
        name = f"{image_id}.{ext}"
        if names is not None and name not in names:
            continue
        path = output_dir / name
        if path.is_file():
            return path
    return None


def umask() -> int:
    """The process's umask, read without changing it (os.umask can only swap it, which
    races with other threads creating files) where Linux tells it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_temp(folder: str | Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """``mkstemp`` with the permissions of an ordinary new file: mkstemp creates 0600,
    but a catalogue image or thumbnail is no secret, and the user's umask decides."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.fchmod(fd, 0o666 & ~umask())
    return fd, Path(tmp)


def temp_file(output_dir: Path, image_id: str) -> tuple[int, Path]:
    """A hidden temporary file beside the final one (same filesystem, so rename is atomic)."""
    return new_temp(output_dir, f"{TEMP_PREFIX}{image_id}.", TEMP_SUFFIX)


def place_file(tmp_path: Path, output_dir: Path, image_id: str, fmt: str) -> Path:
    """Rename a complete temporary file to ``<id>.<ext>`` (ext from the decoded format)."""
    final = output_dir / f"{image_id}.{FORMATS[fmt].extension}"
    os.replace(tmp_path, final)
    # A new copy in another format must not leave the old file as a twin.
    for ext in SUFFIXES:
        other = output_dir / f"{image_id}.{ext}"
        if other != final and other.exists():
            other.unlink()
    return final


def save_bytes(output_dir: Path, image_id: str, fmt: str, data: bytes) -> Path:
    """Write ``data`` as ``<id>.<ext>``: temp file, fsync, rename; never a half file."""
    output_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = temp_file(output_dir, image_id)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return place_file(tmp_path, output_dir, image_id, fmt)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def sweep_temp_files(output_dir: Path) -> int:
    """Remove temporary files a killed run left behind."""
    n = 0
    for path in output_dir.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        try:
            path.unlink()
            n += 1
        except OSError:
            pass
    return n
