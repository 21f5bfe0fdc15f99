"""A loaded model behind one call: ``Embedder.embed_batch(images) -> float32 array``.

Vectors come out L2-normalised, so the index's L2 distance ranks like cosine.
Weights are never silently random: a model either loads its pretrained weights
or raises ``ModelUnavailable`` saying how to get them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, ImageError, TextNotSupported
from ..images import load_rgb, square_crop
from .batcher import Batcher
from .registry import PRECISIONS, Built, ModelSpec, spec_for, weights_file

# Calibration images are decoded under this cap: they come from the user's own folder.
CALIBRATION_MAX_PIXELS = 100_000_000


class Embedder:
    """A loaded model plus the exact preprocessing its vectors depend on."""

    def __init__(
        self,
        spec: ModelSpec,
        module: torch.nn.Module,
        weights_id: str,
        precision: str,
        weights_path: str | None = None,
        built: Built | None = None,
    ):
        _check_precision(precision)
        self.spec = spec
        self.weights_id = weights_id
        # The model's own image transform (open_clip) replaces the resize/crop/normalise.
        self._own_preprocess = built.preprocess if built else None
        self._tokenize = built.tokenize if built else None
        self._encode_text = built.encode_text if built else None
        self.weights_path = weights_path
        self.precision = precision
        # The OpenVINO model for bf16-ov/int8 (set by load_embedder).
        self.accelerated: Callable[[np.ndarray], np.ndarray] | None = None
        self.module = module.eval().to(memory_format=torch.channels_last)
        self._mean = torch.tensor(spec.mean).view(3, 1, 1) * 255.0
        self._std = torch.tensor(spec.std).view(3, 1, 1) * 255.0
        # One forward at a time, all on one thread: torch already spreads a batch over
        # every core, and concurrent forwards only fight over them (see batcher.py).
        self._batcher = Batcher(self._forward)
        self._text_batcher = Batcher(self._text_forward) if self._encode_text else None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def batcher(self) -> Batcher:
        """Where every forward runs (its queue depth and batch sizes feed /metrics)."""
        return self._batcher

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def embeds_text(self) -> bool:
        return self._text_batcher is not None

    @property
    def min_side(self) -> int:
        """Smallest decode size that loses nothing (JPEG draft target)."""
        return self.spec.input_size

    def meta(self) -> dict[str, str]:
        return self.spec.meta(self.weights_id, self.weights_path)

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """RGB image -> normalised (3, S, S) float tensor. Thread-safe."""
        if self._own_preprocess is not None:
            tensor: torch.Tensor = self._own_preprocess(img)
            return tensor
        return self.normalise(square_crop(img, self.spec.input_size))

    def normalise(self, pixels: np.ndarray) -> torch.Tensor:
        """(S, S, 3) uint8 pixels from ``square_crop`` -> the model's (3, S, S) input."""
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8)).permute(2, 0, 1)
        return (x.float() - self._mean) / self._std

    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """(N, 3, S, S) preprocessed batch -> (N, dim) unit float32 vectors. Thread-safe:
        concurrent calls are merged into one forward."""
        return self._batcher(batch)

    def _forward(self, batch: torch.Tensor) -> np.ndarray:
        if self.accelerated is not None:
            out = torch.from_numpy(self.accelerated(batch.numpy()))
            return torch.nn.functional.normalize(out, dim=1).numpy()
        batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.precision == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = self.module(batch)
            else:
                out = self.module(batch)
        out = out.float()
        out = torch.nn.functional.normalize(out, dim=1)
        return out.numpy().astype(np.float32, copy=False)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, dim) unit float32 vectors in the images' space. Thread-safe."""
        if self._text_batcher is None or self._tokenize is None:
            raise TextNotSupported(
                f"{self.name} embeds images only; text search needs a model with a text "
                f"tower, such as --model clip-vit-b-32"
            )
        return self._text_batcher(self._tokenize(list(texts)))

    def _text_forward(self, tokens: Any) -> np.ndarray:
        assert self._encode_text is not None
        with torch.inference_mode():
            out = self._encode_text(tokens).float()
        return torch.nn.functional.normalize(out, dim=1).numpy().astype(np.float32, copy=False)

    def embed_batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_tensors(torch.stack([self.preprocess(i) for i in images]))


def load_embedder(
    name: str = "resnet50",
    weights: str | None = None,
    precision: str = "fp32",
    threads: int | None = None,
    calibration: Sequence[str | Path] = (),
) -> Embedder:
    """Load a model by name. ``weights`` is a torchvision weights name or a file path.

    ``calibration``: image files to quantise with, needed once per weights for int8.
    """
    _check_precision(precision)
    spec = spec_for(name)
    if threads:
        torch.set_num_threads(threads)
    built = spec.build(weights)
    module = built.module
    path = weights_file(weights)
    embedder = Embedder(
        spec, module, built.weights_id, precision, str(path) if path else None, built
    )
    if precision in ("bf16-ov", "int8"):
        from . import ovmodel

        def samples() -> list[torch.Tensor]:
            out = []
            for f in calibration:
                try:
                    img = load_rgb(f, CALIBRATION_MAX_PIXELS, spec.input_size)
                    out.append(embedder.preprocess(img))
                except (ImageError, OSError):
                    continue  # the extraction itself reports unreadable files
            return out

        embedder.accelerated = ovmodel.load(
            module, spec.name, built.weights_id, precision, spec.input_size, threads, samples
        )
    return embedder


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
