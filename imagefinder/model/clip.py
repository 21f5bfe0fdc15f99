"""CLIP through open_clip: an image tower and a text tower into one space, so an index of
CLIP image vectors also answers text queries.

Weights come from an open_clip pretrained tag (from open_clip's cache, downloaded when
the machine has network), or from a local open_clip checkpoint through ``--weights``.
Preprocessing and tokenizer are open_clip's own for the architecture.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelUnavailable
from .registry import Built, file_weights_id


class _QuietRandomInit(logging.Filter):
    """open_clip warns that a model it creates without weights is random: ours get their
    weights right after, from a checkpoint, and a failure there raises."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


logging.getLogger().addFilter(_QuietRandomInit())

HF_HOST = "huggingface.co"
# The files open_clip publishes on the Hugging Face hub, preferred first.
HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class _ImageTower(torch.nn.Module):
    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model.encode_image(x)
        return out


def build_vit_b_32(weights: str | None) -> Built:
    # laion2b_s34b_b79k over openai: higher ImageNet zero-shot accuracy (66.6% against
    # 63.3%, open_clip's results table) and an open training set.
    return build("clip-vit-b-32", "ViT-B-32", "laion2b_s34b_b79k", weights)


def build(name: str, arch: str, default_tag: str, weights: str | None) -> Built:
    try:
        import open_clip
    except ImportError:
        raise ModelUnavailable(f"{name} needs open_clip: pip install 'imagefinder[clip]'") from None
    choice = weights or default_tag
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if Path(choice).expanduser().is_file():
        path = Path(choice).expanduser()
        model = open_clip.create_model(arch, load_weights=False)
        _load(open_clip, model, path, name)
        weights_id = file_weights_id(path)
    elif choice in tags:
        model = _from_tag(open_clip, name, arch, choice)
        weights_id = choice
    else:
        raise ModelUnavailable(
            f"{choice}: no such weights file, and not an open_clip pretrained tag of {arch} "
            f"(tags: {', '.join(tags)})"
        )
    model.eval()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    tokenizer = open_clip.get_tokenizer(arch)

    def tokenize(texts: Sequence[str]) -> torch.Tensor:
        tokens: torch.Tensor = tokenizer(list(texts))
        return tokens

    return Built(_ImageTower(model), weights_id, preprocess, tokenize, model.encode_text)


def _load(open_clip: Any, model: Any, path: Path, name: str) -> None:
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as e:  # torch/safetensors raise many types for a bad file
        first = " ".join(str(e).split())[:300]
        raise ModelUnavailable(f"{path} is not an open_clip {name} checkpoint: {first}") from e


def _cached(open_clip: Any, cfg: dict[str, Any]) -> Path | None:
    """The tag's checkpoint if open_clip already downloaded it on this machine."""
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo = cfg["hf_hub"].strip("/")
        for filename in HF_FILES:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str):
                return Path(found)
    if cfg.get("url"):
        path = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if path.is_file():
            return path
    return None


def _online() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.getaddrinfo(HF_HOST, 443)
    except OSError:
        return False
    return True


def _from_tag(open_clip: Any, name: str, arch: str, tag: str) -> Any:
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    quick_gelu = bool(cfg.get("quick_gelu", False))
    cached = _cached(open_clip, cfg)
    if cached is not None:
        # Straight from the cache: the hub client would first ask the network for news.
        model = open_clip.create_model(arch, load_weights=False, force_quick_gelu=quick_gelu)
        _load(open_clip, model, cached, name)
        return model
    where = f"the Hugging Face repo {cfg['hf_hub'].strip('/')}" if cfg.get("hf_hub") else cfg["url"]
    fix = (
        f'On a machine with network, run: python -c "import open_clip; '
        f"open_clip.create_model('{arch}', pretrained='{tag}')\" and copy its cache "
        f"(~/.cache/huggingface) here, or download {HF_FILES[1]} from {where} and pass "
        f"--weights PATH (or set IMAGEFINDER_WEIGHTS=PATH). To work fully offline without "
        f"text search, use --model efficientnet-lite2."
    )
    if not _online():
        raise ModelUnavailable(
            f"{name} weights {tag!r} are not cached and there is no network to download them. {fix}"
        )
    try:
        return open_clip.create_model(arch, pretrained=tag)
    except Exception as e:
        first = " ".join(str(e).split())[:300]
        raise ModelUnavailable(
            f"{name} weights {tag!r} could not be downloaded ({first}). {fix}"
        ) from e
