"""The opt-in fast precisions, through OpenVINO: ``bf16-ov`` and ``int8``.

On a CPU with AVX-512 BF16/VNNI, OpenVINO runs ResNet50 about 2x (bf16) and 4x (int8,
quantised with NNCF) faster than PyTorch fp32, and its thread pool degrades gracefully
when other work shares the cores. Both packages are optional
(``pip install 'imagefinder[openvino]'``) and imported only here, only when asked for.

Converting a model takes tens of seconds and int8 also needs calibration images, so
the result is cached on disk, keyed by model, weights, precision and OpenVINO version,
beside torch's own downloaded weights: ``torch.hub.get_dir()/imagefinder-openvino``
(``~/.cache/torch/hub/...``, or under ``$TORCH_HOME``). The vectors
stay interchangeable with fp32 ones (bench/bench.py measures cosine and retrieval
quality), so an index does not record which precision wrote it.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelUnavailable


class OpenVINOUnavailable(ModelUnavailable):
    pass


def cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "imagefinder-openvino"


def _import() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise OpenVINOUnavailable(
            "--precision bf16-ov and int8 need OpenVINO (and NNCF for int8): "
            "pip install 'imagefinder[openvino]'"
        ) from e
    return openvino


def cached_path(model: str, weights_id: str, precision: str) -> Path:
    ov = _import()
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}-{weights_id}-{precision}")
    version = hashlib.sha1(ov.__version__.encode()).hexdigest()[:8]
    return cache_dir() / f"{key}-ov{version}.xml"


class OVModel:
    """A compiled OpenVINO model: ``(N, 3, S, S)`` float32 array -> ``(N, dim)`` array."""

    def __init__(self, xml: Path, precision: str, threads: int | None):
        ov = _import()
        config: dict[str, str | int] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if precision == "bf16-ov":
            config["INFERENCE_PRECISION_HINT"] = "bf16"
        self.compiled = ov.Core().compile_model(str(xml), "CPU", config)
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            result = self._request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
            return np.array(result[self.compiled.output(0)], dtype=np.float32)


def load(
    module: torch.nn.Module,
    model: str,
    weights_id: str,
    precision: str,
    input_size: int,
    threads: int | None,
    calibration: Callable[[], Sequence[torch.Tensor]] | None = None,
) -> OVModel:
    """The cached OpenVINO model for these weights, converting (and quantising) if needed.

    ``calibration`` yields preprocessed ``(3, S, S)`` tensors; int8 needs it once, the
    first time these weights are quantised.
    """
    xml = cached_path(model, weights_id, precision)
    if not xml.is_file():
        samples = _calibration(calibration) if precision == "int8" else []
        _convert(module, xml, precision, input_size, samples)
    return OVModel(xml, precision, threads)


def _calibration(
    calibration: Callable[[], Sequence[torch.Tensor]] | None,
) -> list[torch.Tensor]:
    tensors = list(calibration()) if calibration else []
    if not tensors:
        raise OpenVINOUnavailable(
            "--precision int8 quantises the model once, calibrated on sample images, "
            "and no images were given; run `imagefinder extract --precision int8` on a "
            "folder of images first"
        )
    return tensors


def _convert(
    module: torch.nn.Module,
    xml: Path,
    precision: str,
    input_size: int,
    samples: list[torch.Tensor],
) -> None:
    ov = _import()
    example = torch.zeros(1, 3, input_size, input_size)
    with torch.inference_mode(False), torch.no_grad():
        converted = ov.convert_model(
            module.float().to(memory_format=torch.contiguous_format),
            example_input=example,
            input=[(-1, 3, input_size, input_size)],
        )
    if precision == "int8":
        converted = _quantise(converted, samples)
    xml.parent.mkdir(parents=True, exist_ok=True)
    # Write beside, then rename: a concurrent or killed run never leaves half a model.
    tmp = xml.with_name(f".{xml.stem}.{os.getpid()}.xml")
    ov.save_model(converted, str(tmp), compress_to_fp16=False)
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    tmp.replace(xml)


def _quantise(converted: Any, samples: list[torch.Tensor]) -> Any:
    try:
        import nncf
    except ImportError as e:
        raise OpenVINOUnavailable(
            "--precision int8 needs NNCF to quantise the model: pip install 'imagefinder[openvino]'"
        ) from e
    data = [t[None].numpy() for t in samples]
    return nncf.quantize(
        converted,
        nncf.Dataset(data),
        subset_size=len(data),
        preset=nncf.QuantizationPreset.PERFORMANCE,
    )
