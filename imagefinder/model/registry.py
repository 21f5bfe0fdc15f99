"""The models ImageFinder knows, by name. Importing this module loads no torch, so the
CLI can list choices and an index's meta can be checked before a model is loaded.

``--model``, ``IMAGEFINDER_MODEL``, the index meta, ``info`` and ``/health`` all name
models by the keys of ``MODELS``. Tests register fake models of their own with
``register``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelUnavailable
from ..files import sha256_file

# fp32 and bf16 (autocast) run in PyTorch; bf16-ov and int8 in OpenVINO (optional, see
# ovmodel.py).
PRECISIONS = ("fp32", "bf16", "bf16-ov", "int8")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The statistics OpenAI's CLIP was trained with; open_clip's ViT configs use them too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Built:
    """What a builder returns: the image tower, the weights' identity, and where the model
    needs them, its own image preprocessing and its text tower."""

    # maps a (N, 3, S, S) preprocessed batch to (N, dim) features
    module: Any
    weights_id: str
    # RGB PIL image -> (3, S, S) float tensor; None: the spec's resize/crop/normalise
    preprocess: Callable[[Any], Any] | None = None
    # texts -> (N, L) token tensor, and tokens -> (N, dim) features (models with text)
    tokenize: Callable[[Sequence[str]], Any] | None = None
    encode_text: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class DuplicateThresholds:
    """L2 distances between two images' vectors at or below which they are the same
    picture (``near``: re-encoded, resized, cropped a little, rotated by EXIF,
    overlaid or colour-shifted) or look alike (``similar``). Measured by
    bench/duplicates.py on real photos (bench/results/duplicates.md), for the weights
    named: vectors of other weights are another space, and get no thresholds."""

    weights: str
    near: float
    similar: float


# weights argument (a name, a file path, or None for the default) -> Built, or the older
# (module, weights_id) pair.
Builder = Callable[[str | None], "Built | tuple[Any, str]"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # "module:function" (imported only when the model is loaded), or the function itself.
    builder: str | Builder
    # The model embeds text into the same space as images (text search).
    text: bool = False
    # How the model's own preprocessing works, when the builder supplies one (recorded in
    # the index meta: vectors made with another preprocessing never mix).
    own_preprocessing: str | None = None
    # What --weights takes, for help texts and errors.
    weights_help: str = "a local weights file"
    # Calibrated duplicate levels; None: never measured (no weights to measure with).
    duplicates: DuplicateThresholds | None = None
    # How the index names the weights a builder loads when given none.
    default_weights: str = "bundled"
    # The names --weights takes besides a file; None: only the builder knows them.
    named_weights: tuple[str, ...] | None = ()

    @property
    def preprocessing(self) -> str:
        if self.own_preprocessing:
            return self.own_preprocessing
        return (
            f"resize-short-side {self.input_size} bilinear, center-crop "
            f"{self.input_size}, mean {list(self.mean)}, std {list(self.std)}"
        )

    def meta(self, weights_id: str, weights_path: str | None = None) -> dict[str, str]:
        """The index meta of vectors made by this model with those weights."""
        meta = {
            "model": self.name,
            "weights": weights_id,
            "dim": str(self.dim),
            "preprocessing": self.preprocessing,
        }
        if weights_path:
            # Where the API finds the same file again (IMAGEFINDER_WEIGHTS overrides).
            meta["weights_path"] = weights_path
        return meta

    def identity(self, weights: str | None) -> dict[str, str]:
        """The meta the model will report once loaded with ``weights``, found without
        loading it (no torch): for a process that only drives others which load it (the
        Ray engine's driver). Whether a file holds usable weights, only loading tells."""
        path = weights_file(weights)
        if path is not None:
            return self.meta(file_weights_id(path), str(path))
        if weights is None:
            return self.meta(self.default_weights)
        if self.named_weights is not None and weights not in self.named_weights:
            raise ModelUnavailable(
                f"{weights}: no such weights file, and not weights {self.name} knows by "
                f"name; --weights takes {self.weights_help}"
            )
        return self.meta(weights)

    def build(self, weights: str | None) -> Built:
        builder = self.builder
        if isinstance(builder, str):
            module, _, name = builder.partition(":")
            builder = getattr(importlib.import_module(module), name)
        built = builder(weights)
        if isinstance(built, tuple):
            return Built(*built)
        return built


def weights_file(weights: str | None) -> Path | None:
    """``weights`` as the absolute path of an existing file, or None (a name, or none)."""
    if weights and Path(weights).expanduser().is_file():
        return Path(weights).expanduser().resolve()
    return None


def file_weights_id(path: str | Path) -> str:
    """How the index names weights that came from a file: a prefix of its hash."""
    return "sha256:" + sha256_file(path)[:16]


MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    MODELS[spec.name] = spec
    return spec


register(
    ModelSpec(
        "resnet50",
        2048,
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "imagefinder.model.cnn:build_resnet50",
        weights_help="IMAGENET1K_V1 (default), IMAGENET1K_V2, or a local .pth state dict",
        default_weights="IMAGENET1K_V1",
        named_weights=("IMAGENET1K_V1", "IMAGENET1K_V2"),
    )
)
register(
    ModelSpec(
        "efficientnet-lite0",
        1280,
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "imagefinder.model.cnn:build_efficientnet_lite0",
        weights_help="bundled (default) or a local .pth state dict",
        # bench/results/duplicates.md: near precision 0.995, recall 0.922.
        duplicates=DuplicateThresholds("bundled", near=0.589, similar=0.9602),
    )
)
register(
    ModelSpec(
        "efficientnet-lite2",
        1280,
        260,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "imagefinder.model.cnn:build_efficientnet_lite2",
        weights_help="bundled (default) or a local .pth state dict",
        # bench/results/duplicates.md: near precision 0.994, recall 0.860.
        duplicates=DuplicateThresholds("bundled", near=0.5052, similar=0.9072),
    )
)
# resnet50, vgg16 and clip-vit-b-32 have no duplicate thresholds: no weights of theirs
# load here to measure with, and a distance guessed for one model means nothing for
# another. Their indexes offer the exact level (and --max-distance) only.
# fc7: the 4096-d output of the second fully connected layer, after its ReLU (see
# cnn.build_vgg16 for why this layer rather than pooled conv5 features).
register(
    ModelSpec(
        "vgg16",
        4096,
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "imagefinder.model.cnn:build_vgg16",
        weights_help="IMAGENET1K_V1 (default) or a local .pth state dict",
        default_weights="IMAGENET1K_V1",
        named_weights=("IMAGENET1K_V1",),
    )
)
register(
    ModelSpec(
        "clip-vit-b-32",
        512,
        224,
        CLIP_MEAN,
        CLIP_STD,
        "imagefinder.model.clip:build_vit_b_32",
        text=True,
        own_preprocessing=(
            f"open_clip ViT-B-32: resize-short-side 224 bicubic, center-crop 224, "
            f"mean {list(CLIP_MEAN)}, std {list(CLIP_STD)}"
        ),
        weights_help="an open_clip pretrained tag (default laion2b_s34b_b79k; also openai, "
        "...) or a local open_clip checkpoint (.pt, .bin, .safetensors)",
        default_weights="laion2b_s34b_b79k",
        named_weights=None,  # open_clip's tags
    )
)


def spec_for(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelUnavailable(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS)}"
        ) from None


def embeds_text(name: str | None) -> bool:
    """Whether the model called ``name`` (an index's meta) can embed text queries."""
    spec = MODELS.get(name or "")
    return bool(spec and spec.text)
