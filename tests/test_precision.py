"""The faster precisions give the same vectors (near enough), and concurrent callers
share one inference thread. OpenVINO is optional: its tests skip when it is absent."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from imagefinder.errors import ModelUnavailable
from imagefinder.images import load_rgb
from imagefinder.indexer import calibration_sample
from imagefinder.model.embedder import load_embedder


@pytest.fixture(scope="module")
def photos(caltech_dir) -> list:
    return calibration_sample(caltech_dir, 12)


@pytest.fixture(scope="module")
def batch(lite0, photos) -> torch.Tensor:
    return torch.stack([lite0.preprocess(load_rgb(p, 10**8, lite0.min_side)) for p in photos])


@pytest.fixture(scope="module")
def reference(lite0, batch) -> np.ndarray:
    return lite0.embed_tensors(batch)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


def test_concurrent_callers_get_their_own_rows(lite0, batch, reference):
    out: dict[int, np.ndarray] = {}

    def one(i: int) -> None:
        out[i] = lite0.embed_tensors(batch[i : i + 1])[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = np.stack([out[i] for i in range(len(batch))])
    np.testing.assert_allclose(merged, reference, atol=1e-4)


def test_a_failed_forward_reaches_its_caller_and_the_model_stays_usable(lite0, batch, reference):
    with pytest.raises(RuntimeError):
        lite0.embed_tensors(torch.zeros(1, 3, 4, 4))
    np.testing.assert_allclose(lite0.embed_tensors(batch[:2]), reference[:2], atol=1e-4)


def test_torch_bf16_vectors_match_fp32(batch, reference):
    bf16 = load_embedder("efficientnet-lite0", precision="bf16")
    assert cosines(bf16.embed_tensors(batch), reference).min() > 0.99


@pytest.fixture
def model_cache(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.getbasetemp() / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(folder))  # converted models live under torch's hub dir
    return folder / "hub" / "imagefinder-openvino"


def test_openvino_bf16_is_converted_once_and_matches_fp32(model_cache, batch, reference):
    pytest.importorskip("openvino")
    first = load_embedder("efficientnet-lite0", precision="bf16-ov", threads=2)
    assert cosines(first.embed_tensors(batch), reference).min() > 0.99
    (xml,) = model_cache.glob("efficientnet-lite0-bundled-bf16-ov-*.xml")
    converted_at = xml.stat().st_mtime_ns
    again = load_embedder("efficientnet-lite0", precision="bf16-ov", threads=2)
    assert xml.stat().st_mtime_ns == converted_at  # the cache, keyed by weights, was reused
    np.testing.assert_allclose(again.embed_tensors(batch), first.embed_tensors(batch), atol=1e-5)


def test_int8_needs_calibration_images_the_first_time(model_cache):
    pytest.importorskip("nncf")
    with pytest.raises(ModelUnavailable, match="calibrated on sample images"):
        load_embedder("efficientnet-lite0", precision="int8")


def test_int8_calibrated_on_photos_stays_close_to_fp32(model_cache, photos, batch, reference):
    pytest.importorskip("nncf")
    int8 = load_embedder("efficientnet-lite0", precision="int8", threads=2, calibration=photos)
    assert cosines(int8.embed_tensors(batch), reference).mean() > 0.95
    # Quantised once: later loads need no calibration images.
    assert load_embedder("efficientnet-lite0", precision="int8").accelerated is not None
