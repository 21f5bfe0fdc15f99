"""Settings, read from ``IMAGEFINDER_*`` environment variables in one place.

Tests build a ``Settings`` directly (or via ``from_env`` with a dict), so nothing
else in the package reads ``os.environ``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import ConfigError

PREFIX = "IMAGEFINDER_"
# The pixel cap. Decoding a picture this large costs at most about 4 bytes a pixel
# (~260 MB; formats that need more per pixel get fewer pixels, see imagecost.py): the
# most one upload may cost, measured by bench/hostile.py.
DEFAULT_MAX_PIXELS = 64_000_000
# What IMAGEFINDER_DB calls a plain location (no name=): the server's one index.
DEFAULT_INDEX = "default"
INDEX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# Numbers that would otherwise fail later, far from their cause (a batch size of 0
# stopped an extraction half-way with "range() arg 3 must not be zero").
RANGES: dict[str, tuple[int, int]] = {
    "threads": (1, 1024),
    "batch_size": (1, 4096),
    "max_upload_bytes": (1, 1 << 40),
    "max_pixels": (1, 1 << 40),
    "ef_search": (1, 100_000),
    "nprobe": (1, 100_000),
    "max_concurrency": (1, 1024),
    "max_queue": (0, 100_000),
    "body_timeout": (1, 3600),
    "decode_processes": (0, 1024),
    "job_max_rows": (1, 10_000_000),
    "job_max_csv_bytes": (1, 1 << 32),
    "job_max_files": (1, 100_000),
    "job_max_bytes": (1, 1 << 40),
    "job_queue": (1, 10_000),
    "job_batch_size": (1, 4096),
    "ray_keep_warm": (0, 86_400),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "metrics": ("token", "public", "off"),
    "log_format": ("text", "json"),
}


@dataclass(frozen=True)
class Settings:
    # One index location (a SQLite path or a postgresql:// URL), or several as
    # comma-separated name=location pairs (see ``indexes``).
    db: str = "data/imagefinder.db"
    images_dir: str = "data/images"
    model: str = "resnet50"
    weights: str | None = None
    precision: str = "fp32"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Images per forward pass: 8 beat 16 and 32 on 2 cores (bench/bench.py --sweep).
    batch_size: int = 8
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Uploads decoded and embedded at once (each may hold ~4 bytes x max_pixels while it
    # decodes), and how many more may wait for a slot before the server answers 503 busy.
    max_concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_queue: int = field(default_factory=lambda: 4 * (os.cpu_count() or 1))
    # Worker processes that decode uploads for the server (0: decode in the server's own
    # process); by default one per decoding slot.
    decode_processes: int | None = None
    # Seconds an upload body may take before it must average 10 KB/s (then 408).
    body_timeout: int = 10
    api_token: str | None = None
    cors_origins: tuple[str, ...] = ()
    ef_search: int | None = None  # None: each store's own default
    # SQLite's inverted file: lists probed per 10 results (None: the store's default).
    nprobe: int | None = None
    # Search every vector instead of through the approximate index (HNSW, or SQLite's
    # inverted file); ef_search sizes the approximate candidate list.
    exact: bool = False
    # Thumbnail cache; empty means beside a SQLite index (<db>.thumbs), or under
    # data/thumbs/ for a server index.
    thumbs_dir: str | None = None
    # αQE on searches that do not say (``expand``); DBA for new indexes (an index keeps
    # its own setting). Both on: they won on the dev split (bench/results/quality.md).
    expand: bool = True
    dba: bool = True
    # Ingestion jobs (POST /jobs): at most this many CSV rows and CSV bytes, uploaded
    # files and request bytes per job, and jobs queued or running at once.
    job_max_rows: int = 100_000
    job_max_csv_bytes: int = 16 * 1024 * 1024
    job_max_files: int = 1_000
    job_max_bytes: int = 512 * 1024 * 1024
    job_queue: int = 20
    # Images per forward pass of a job in the server: a search waits for the job's forward
    # in flight (one inference thread per model), so small ones keep searches fast.
    job_batch_size: int = 2
    # Let a job's CSV name loopback, private and link-local addresses (a test server):
    # off, because a URL a client sends must not reach this machine's own services.
    job_allow_private: bool = False
    # A Ray cluster (``ray://host:10001``, or ``auto``) that runs the server's CSV jobs
    # (pip install 'imagefinder[ray]'); unset: jobs run inside the server.
    ray_address: str | None = None
    # Seconds a job's models stay loaded on a running Ray cluster for the next job
    # (raymodels.py); 0: every job starts its own. Not for a cluster a command starts.
    ray_keep_warm: int = 300
    # GET /metrics: "token" (default: the API token is required), "public", or "off".
    metrics: str = "token"
    # One line per request, and the server's own messages: "text" or "json".
    log_format: str = "text"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``IMAGEFINDER_<FIELD>`` variables, then apply overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            if f.name in CHOICES:
                values[f.name] = raw.strip().lower()
            elif f.name == "cors_origins":
                values[f.name] = tuple(o.strip() for o in raw.split(",") if o.strip())
            elif f.type in ("int", "int | None"):
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ConfigError(
                        f"{PREFIX}{f.name.upper()}={raw!r} is not a whole number"
                    ) from None
            elif f.type == "bool":
                flag = raw.strip().lower()
                if flag not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ConfigError(
                        f"{PREFIX}{f.name.upper()}={raw!r} is not 1/0 (or true/false)"
                    )
                values[f.name] = flag in ("1", "true", "yes", "on")
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self) -> None:
        if self.decode_processes is None:
            object.__setattr__(self, "decode_processes", self.max_concurrency)
        for name, (low, high) in RANGES.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ConfigError(
                    f"{PREFIX}{name.upper()}={value} is out of range; use {low} to {high:,}"
                )
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{PREFIX}{name.upper()}={getattr(self, name)!r} is not one of "
                    + ", ".join(allowed)
                )
        self.indexes  # noqa: B018 (a malformed IMAGEFINDER_DB fails here, at startup)

    @property
    def indexes(self) -> tuple[tuple[str, str], ...]:
        """The indexes ``db`` names, as (name, location) pairs; the first is the default.

        ``db`` is one location (named ``default``), or ``name=location`` pairs separated
        by commas, e.g. ``images=data/r50.db,text=data/clip.db``. A name is letters,
        digits, ``_``, ``-`` and ``.``, so a path or URL with an ``=`` of its own (a
        PostgreSQL ``?sslmode=...``) still reads as one location."""
        text = self.db.strip()
        head = text.split(",", 1)[0]
        name, sep, _ = head.partition("=")
        if not sep or not INDEX_NAME.fullmatch(name.strip()):
            return ((DEFAULT_INDEX, text),)
        pairs: list[tuple[str, str]] = []
        for part in text.split(","):
            name, sep, location = (x.strip() for x in part.partition("="))
            if not part.strip():
                continue
            if not sep or not INDEX_NAME.fullmatch(name) or not location:
                raise ConfigError(
                    f"{PREFIX}DB: {part.strip()!r} is not name=location; write each index "
                    f"as name=location (name: letters, digits, '_', '-', '.'), separated "
                    f"by commas"
                )
            if any(name == n for n, _ in pairs):
                raise ConfigError(f"{PREFIX}DB names the index {name!r} twice")
            pairs.append((name, location))
        return tuple(pairs)

    @property
    def location(self) -> str:
        """The default index's location (the first of ``indexes``)."""
        return self.indexes[0][1]

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
