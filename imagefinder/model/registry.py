"""The models ImageFinder knows, by name. Importing this module loads no torch, so the
CLI can list choices and an index's meta can be checked before a model is loaded.

``--model``, ``IMAGEFINDER_MODEL``, the index meta and ``info`` all name models by
the keys of ``MODELS``. Tests register a fake model of their own with ``register``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ModelUnavailable

# fp32 and bf16 (autocast) run in PyTorch; bf16-ov and int8 in OpenVINO (optional, see
# ovmodel.py).
PRECISIONS = ("fp32", "bf16", "bf16-ov", "int8")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# weights argument (a name, a file path, or None for the default) -> (torch module that
# maps a (N, 3, S, S) batch to (N, dim) features, the weights' identity for the meta).
Builder = Callable[[str | None], tuple[Any, str]]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # "module:function" (imported only when the model is loaded), or the function itself.
    builder: str | Builder

    @property
    def preprocessing(self) -> str:
        return (
            f"resize-short-side {self.input_size} bilinear, center-crop "
            f"{self.input_size}, mean {list(self.mean)}, std {list(self.std)}"
        )

    def build(self, weights: str | None) -> tuple[Any, str]:
        builder = self.builder
        if isinstance(builder, str):
            module, _, name = builder.partition(":")
            builder = getattr(importlib.import_module(module), name)
        return builder(weights)


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
    )
)


def spec_for(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelUnavailable(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS)}"
        ) from None
