"""A deterministic fake model, registered only in tests: colour statistics, not a CNN.

It runs the real pipeline (decode, preprocess, batched forward, L2 normalisation,
the index's identity checks) in milliseconds, so tests about the API, the stores and
the CLI need neither efficientnet-lite0 nor torchvision. Tests where the model
itself or retrieval quality is the point keep the real models.

Features of a 32x32 centre crop: a 4x4x4 joint colour histogram (square-rooted, as
in the Hellinger kernel) and the mean colour of a 4x4 grid, then a fixed, seeded
random projection to ``DIM`` dimensions, so every dimension carries signal as CNN
features do. Same pixels, same vector; near-identical pictures land close.

``fake-clip`` is the same kind of model with a text tower, for text search: a text naming
colours (``"red"``, ``"dark blue"``) embeds as a flat picture of those colours would, so
"red" finds the red pictures. It has another projection and dimension, so the two
fakes' vectors never mix.

Subprocesses (a live server, the scripts) register them by running through this file:
``python tests/fake_model.py -m uvicorn main:app ...`` or
``python tests/fake_model.py extract_image_features.py ...``.

``FAKE_MODEL_BATCH_SECONDS`` (env) makes each forward pass take at least that long, for
a test that must catch a run in the middle (a kill mid-extraction) whatever the CPU.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__":
    # Run as a script, this file's folder comes first on sys.path, not the project's: the
    # project must win over any installed copy of the package (an editable install of
    # another checkout), or the subprocess would test that copy's code.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imagefinder.model.registry import (  # noqa: E402
    Built,
    DuplicateThresholds,
    ModelSpec,
    register,
)

NAME = "fake-colour"
DIM = 128
SEED = 20261129
_BINS = 4
_GRID = 4
_RAW = _BINS**3 + 3 * _GRID * _GRID


class ColourFeatures(torch.nn.Module):
    def __init__(self, seed: int = SEED, dim: int = DIM) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(_RAW, dim, generator=generator) / _RAW**0.5
        self.register_buffer("projection", projection)
        self.register_buffer("mean", torch.tensor(SPEC.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(SPEC.std).view(1, 3, 1, 1))
        self.batch_seconds = float(os.environ.get("FAKE_MODEL_BATCH_SECONDS", "0"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_seconds:
            time.sleep(self.batch_seconds)
        rgb = (x.float() * self.std + self.mean).clamp(0, 1)  # back to [0, 1]
        n = rgb.shape[0]
        levels = (rgb * _BINS).long().clamp(max=_BINS - 1)
        bins = (levels[:, 0] * _BINS + levels[:, 1]) * _BINS + levels[:, 2]
        histogram = torch.zeros(n, _BINS**3).scatter_add_(
            1, bins.view(n, -1), torch.ones(n, bins[0].numel())
        )
        histogram = (histogram / bins[0].numel()).sqrt()
        grid = torch.nn.functional.adaptive_avg_pool2d(rgb, _GRID).reshape(n, -1)
        return torch.cat([histogram, grid], dim=1) @ self.projection


def build(weights: str | None) -> tuple[torch.nn.Module, str]:
    return ColourFeatures(), f"seed-{SEED}"


SPEC = register(
    ModelSpec(
        NAME,
        DIM,
        32,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        build,
        # Calibrated like the real models (bench/duplicates.py --model fake-colour,
        # bench/results/duplicates.md); no pair of distinct photos is 90% likely to be of
        # one class by colour alone, so similar is no looser than near.
        duplicates=DuplicateThresholds(f"seed-{SEED}", near=0.1279, similar=0.1279),
        default_weights=f"seed-{SEED}",
        named_weights=None,
    )
)

# A second image model of another dimension: for tests of two models meeting one index.
OTHER = "fake-colour-64"
OTHER_DIM = 64
register(
    ModelSpec(
        OTHER,
        OTHER_DIM,
        32,
        SPEC.mean,
        SPEC.std,
        lambda weights: (ColourFeatures(SEED, OTHER_DIM), f"seed-{SEED}-64"),
        default_weights=f"seed-{SEED}-64",
        named_weights=None,
    )
)

TEXT_NAME = "fake-clip"
TEXT_DIM = 64
COLOURS = {
    "red": (0.85, 0.1, 0.1),
    "green": (0.1, 0.7, 0.1),
    "blue": (0.1, 0.1, 0.85),
    "yellow": (0.9, 0.85, 0.1),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "grey": (0.5, 0.5, 0.5),
}


def tokenize(texts) -> torch.Tensor:
    """Each text -> the mean RGB of the colours it names (grey when none)."""
    out = []
    for text in texts:
        named = [COLOURS[w] for w in text.lower().replace(",", " ").split() if w in COLOURS]
        out.append(torch.tensor(named).mean(0) if named else torch.tensor(COLOURS["grey"]))
    return torch.stack(out)


def build_text(weights: str | None) -> Built:
    module = ColourFeatures(SEED + 1, TEXT_DIM)

    def encode_text(rgb: torch.Tensor) -> torch.Tensor:
        flat = rgb.view(-1, 3, 1, 1).expand(-1, 3, 32, 32)
        return module((flat - module.mean) / module.std)

    return Built(module, f"seed-{SEED + 1}", tokenize=tokenize, encode_text=encode_text)


TEXT_SPEC = register(
    ModelSpec(
        TEXT_NAME,
        TEXT_DIM,
        32,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        build_text,
        text=True,
        default_weights=f"seed-{SEED + 1}",
        named_weights=None,
    )  # fmt: skip
)


def ray_setup() -> None:
    """Ray's ``worker_process_setup_hook``: a worker that imported this module has the
    fakes registered (tests/test_ray.py)."""


def command(*args: str) -> list[str]:
    """The command line that runs ``args`` (a script, or ``-m module ...``) in a
    subprocess with the fake model registered."""
    return [sys.executable, __file__, *args]


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["-m"]:
        sys.argv = [args[1], *args[2:]]
        # This file stays __main__, so processes the module spawns (uvicorn --workers)
        # import it again as their main, and register the fake too.
        runpy.run_module(args[1], run_name="__main__", alter_sys=False)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")
