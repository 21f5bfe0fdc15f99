"""Settings, read from ``IMAGEFINDER_*`` environment variables in one place.

Tests build a ``Settings`` directly (or via ``from_env`` with a dict), so nothing
else in the package reads ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import ConfigError

PREFIX = "IMAGEFINDER_"


@dataclass(frozen=True)
class Settings:
    db: str = "data/imagefinder.db"
    images_dir: str = "data/images"
    model: str = "resnet50"
    weights: str | None = None
    precision: str = "fp32"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Images per forward pass: 8 beat 16 and 32 on 2 cores (bench/bench.py --sweep).
    batch_size: int = 8
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 100_000_000
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

    def __post_init__(self) -> None:
        for name in ("ef_search", "nprobe"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{PREFIX}{name.upper()}={value} must be at least 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``IMAGEFINDER_<FIELD>`` variables, then apply overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            if f.name == "cors_origins":
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

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
