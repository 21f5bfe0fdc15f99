"""The registry's models load and embed as the index expects.

efficientnet-lite2 loads its bundled weights. VGG16 and CLIP have no weights on this
machine: each loads a randomly initialised state dict / open_clip checkpoint saved to a
local file, through ``--weights``, exactly as real weights would load. Nothing here
claims anything about their retrieval quality.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from imagefinder.cli import cli
from imagefinder.config import Settings
from imagefinder.errors import ModelUnavailable
from imagefinder.model.embedder import load_embedder
from imagefinder.model.registry import MODELS, embeds_text
from imagefinder.server.app import create_app
from imagefinder.store import open_store

pytestmark = pytest.mark.sqlite_only


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def photos(tmp_path_factory, caltech_dir):
    folder = tmp_path_factory.mktemp("photos")
    for label in ("pagoda", "ewer"):
        for src in sorted((caltech_dir / label).glob("*.jpg"))[:2]:
            shutil.copy(src, folder / f"{label}-{src.name}")
    return folder


@pytest.fixture(scope="module")
def vgg16_weights(tmp_path_factory):
    from torchvision.models import vgg16

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(vgg16(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    import open_clip

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"
    torch.save(open_clip.create_model("ViT-B-32", load_weights=False).state_dict(), path)
    return path


def unit_rows(vectors: np.ndarray) -> bool:
    return np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def some_images() -> list[Image.Image]:
    return [Image.new("RGB", (320, 240), (200, 40, 40)), Image.new("RGB", (150, 400), "navy")]


# -- the registry --------------------------------------------------------------------


def test_every_model_is_offered_by_the_cli_with_its_weights():
    help_text = run("extract", "--help").output
    for name in ("resnet50", "efficientnet-lite0", "efficientnet-lite2", "vgg16", "clip-vit-b-32"):
        assert name in MODELS and name in help_text
    assert embeds_text("clip-vit-b-32") and not embeds_text("vgg16")
    assert not embeds_text("no-such-model")
    assert (MODELS["efficientnet-lite2"].input_size, MODELS["vgg16"].dim) == (260, 4096)


def test_an_unknown_model_is_refused_with_the_choices(tmp_path):
    result = CliRunner(env={"IMAGEFINDER_MODEL": "vgg19"}).invoke(
        cli, ["extract", "--folder", str(tmp_path), "--db", str(tmp_path / "x.db")]
    )
    assert result.exit_code == 1
    assert "unknown model 'vgg19'; choose one of: resnet50," in result.stderr


# -- efficientnet-lite2: bundled weights -----------------------------------------------


def test_lite2_loads_its_bundled_weights_at_260_pixels():
    lite2 = load_embedder("efficientnet-lite2")
    assert lite2.meta()["weights"] == "bundled" and lite2.dim == 1280
    assert lite2.preprocess(some_images()[1]).shape == (3, 260, 260)
    vectors = lite2.embed_batch(some_images())
    assert vectors.shape == (2, 1280) and unit_rows(vectors)
    assert "resize-short-side 260" in lite2.meta()["preprocessing"]


# -- VGG16: a local state dict -------------------------------------------------------


def test_vgg16_indexes_from_a_local_state_dict_with_fc7_vectors(photos, vgg16_weights, tmp_path):
    db = tmp_path / "vgg.db"
    result = run(
        "extract", "--folder", str(photos), "--db", str(db),
        "--model", "vgg16", "--weights", str(vgg16_weights),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    store = open_store(str(db))
    meta = store.meta()
    assert (meta["model"], meta["dim"]) == ("vgg16", "4096")
    assert meta["weights"].startswith("sha256:")
    assert meta["weights_path"] == str(vgg16_weights.resolve())
    vectors = np.stack([v for chunk in store.iter_vectors() for _, _, v in chunk])
    assert vectors.shape == (4, 4096) and unit_rows(vectors)
    # fc7 comes after a ReLU: no negative component.
    assert (vectors >= 0).all()
    info = json.loads(run("info", "--db", str(db), "--json").output)
    assert (info["model"], info["text_search"]) == ("vgg16", "no")
    # Another model's vectors never go into this index.
    mixed = run(
        "extract", "--folder", str(photos), "--db", str(db), "--model", "efficientnet-lite0"
    )
    assert mixed.exit_code == 1
    assert "built with model='vgg16'" in mixed.stderr and mixed.stderr.count("\n") == 1


def test_a_file_that_is_not_a_vgg16_state_dict_is_one_line(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ModelUnavailable, match="is not a VGG16 state dict: .*Missing key"):
        load_embedder("vgg16", str(wrong))


# -- CLIP: a local open_clip checkpoint ----------------------------------------------


@pytest.fixture(scope="module")
def clip(clip_weights):
    return load_embedder("clip-vit-b-32", str(clip_weights))


def test_clip_embeds_images_and_texts_into_one_unit_space(clip):
    images = clip.embed_batch(some_images())
    texts = clip.embed_texts(["a red square", "a tall navy rectangle", "x" * 900])
    assert images.shape == (2, 512) and texts.shape == (3, 512)
    assert unit_rows(images) and unit_rows(texts)
    assert clip.embeds_text and clip.meta()["model"] == "clip-vit-b-32"
    # open_clip's own transform: bicubic resize of the short side, centre crop, CLIP stats.
    assert clip.preprocess(some_images()[1]).shape == (3, 224, 224)
    assert clip.meta()["preprocessing"].startswith("open_clip ViT-B-32: resize-short-side 224")


def test_a_clip_index_answers_text_search_through_the_api(photos, clip_weights, clip, tmp_path):
    db = tmp_path / "clip.db"
    result = run(
        "extract", "--folder", str(photos), "--db", str(db),
        "--model", "clip-vit-b-32", "--weights", str(clip_weights),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert open_store(str(db)).meta()["weights"].startswith("sha256:")
    # The server finds the same checkpoint again through the path the index recorded.
    with TestClient(create_app(Settings(db=str(db), images_dir=str(photos)))) as client:
        health = client.get("/health").json()
        assert (health["model"], health["dim"], health["text"]) == ("clip-vit-b-32", 512, True)
        response = client.post("/text-search", data={"q": "a pagoda", "k": "3"})
        assert response.status_code == 200, response.text
        assert len(response.json()["results"]) == 3
        # Random weights: nothing is claimed about which images come back.
    mixed = run("extract", "--folder", str(photos), "--db", str(db), "--model", "vgg16")
    assert mixed.exit_code == 1 and "built with model='clip-vit-b-32'" in mixed.stderr


def test_clip_without_weights_says_exactly_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as a machine without network: fail fast
    with pytest.raises(ModelUnavailable) as caught:
        load_embedder("clip-vit-b-32")
    message = str(caught.value)
    assert "\n" not in message
    assert "'laion2b_s34b_b79k' are not cached" in message
    assert "--weights PATH" in message and "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message


def test_clip_refuses_a_name_that_is_neither_a_file_nor_a_tag():
    with pytest.raises(ModelUnavailable, match="not an open_clip pretrained tag of ViT-B-32"):
        load_embedder("clip-vit-b-32", "no-such-tag")


def test_clip_refuses_a_checkpoint_of_another_model(tmp_path, vgg16_weights):
    with pytest.raises(ModelUnavailable, match="is not an open_clip clip-vit-b-32 checkpoint"):
        load_embedder("clip-vit-b-32", str(vgg16_weights))


def test_every_builder_the_registry_names_exists_without_loading_weights():
    import importlib

    for spec in MODELS.values():
        if isinstance(spec.builder, str):
            module, _, name = spec.builder.partition(":")
            assert callable(getattr(importlib.import_module(module), name)), spec.builder


# -- a model's identity without loading it (the Ray engine's driver) ------------------


@pytest.mark.parametrize("weights", ["bundled", "vgg16-file", "clip-file", "clip-tag"])
def test_a_models_identity_is_what_it_reports_once_loaded(weights, vgg16_weights, clip_weights):
    model, arg = {
        "bundled": ("efficientnet-lite2", None),
        "vgg16-file": ("vgg16", str(vgg16_weights)),
        "clip-file": ("clip-vit-b-32", str(clip_weights)),
        "clip-tag": ("clip-vit-b-32", None),  # the default tag: its weights are not here
    }[weights]
    identity = MODELS[model].identity(arg)
    if weights == "clip-tag":
        assert identity["weights"] == "laion2b_s34b_b79k"
        with pytest.raises(ModelUnavailable):
            load_embedder(model, arg)
        return
    assert identity == load_embedder(model, arg).meta()


def test_a_weights_name_a_model_does_not_know_is_refused_without_loading(monkeypatch):
    monkeypatch.setattr(
        "imagefinder.model.registry.ModelSpec.build",
        lambda *a: pytest.fail("the model was loaded"),
    )
    with pytest.raises(ModelUnavailable, match="IMAGENET1K_V9: no such weights file"):
        MODELS["resnet50"].identity("IMAGENET1K_V9")
    with pytest.raises(ModelUnavailable, match="no such weights file"):
        MODELS["efficientnet-lite0"].identity("bundled.pth")
    assert MODELS["resnet50"].identity("IMAGENET1K_V2")["weights"] == "IMAGENET1K_V2"
    assert MODELS["resnet50"].identity(None)["weights"] == "IMAGENET1K_V1"
