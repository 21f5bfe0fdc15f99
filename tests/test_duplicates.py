"""Duplicates at three levels (exact, near, similar), in an index and against a search.

The catalogue is real Caltech photos with real edited copies (re-encoded, resized, a
byte-for-byte copy); the fake model embeds them, with thresholds calibrated for it by
bench/duplicates.py like the real models'. Stores and servers are real.
"""

from __future__ import annotations

import io
import json
import shutil

import fake_model
import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image
from support import assert_error, clustered_vectors, image_bytes

from imagefinder import duplicates
from imagefinder.cli import cli
from imagefinder.config import Settings
from imagefinder.errors import NotCalibrated
from imagefinder.indexer import index_folder
from imagefinder.model.embedder import load_embedder
from imagefinder.server.app import create_app
from imagefinder.service import Service
from imagefinder.store import open_store

NEAR = fake_model.SPEC.duplicates.near
PHOTOS = {
    "flamingo": "flamingo_head/image_0003.jpg",
    "pagoda": "pagoda/image_0004.jpg",
    "camera": "camera/image_0011.jpg",
    "ant": "ant/image_0005.jpg",
    "ewer": "ewer/image_0001.jpg",
}


def reencoded(path, quality: int = 45, scale: float = 1.0) -> bytes:
    img = Image.open(path).convert("RGB")
    if scale != 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture
def catalogue(tmp_path, caltech_dir):
    """Five distinct photos; a re-encoded copy of one, a smaller copy of another, a
    byte-for-byte copy of a third."""
    folder = tmp_path / "catalogue"
    folder.mkdir()
    for name, rel in PHOTOS.items():
        shutil.copy(caltech_dir / rel, folder / f"{name}.jpg")
    (folder / "flamingo-reencoded.jpg").write_bytes(reencoded(caltech_dir / PHOTOS["flamingo"]))
    (folder / "camera-small.jpg").write_bytes(reencoded(caltech_dir / PHOTOS["camera"], 85, 0.6))
    shutil.copy(caltech_dir / PHOTOS["pagoda"], folder / "pagoda-copy.jpg")
    return folder


@pytest.fixture
def indexed(catalogue, db_location, model):
    store = open_store(db_location)
    index_folder(catalogue, store, model)
    yield store
    store.close()


def ids(report: duplicates.Report) -> list[list[str]]:
    return [sorted(g.ids) for g in report.groups]


def test_each_level_groups_what_it_promises(indexed):
    exact = duplicates.find(indexed, "exact")
    assert ids(exact) == [["pagoda", "pagoda-copy"]]
    assert exact.max_distance is None and exact.images == 8
    near = duplicates.find(indexed, "near")
    assert near.max_distance == NEAR
    assert sorted(ids(near)) == [
        ["camera", "camera-small"],
        ["flamingo", "flamingo-reencoded"],
        ["pagoda", "pagoda-copy"],
    ]
    for group in near.groups:
        assert group.distances[0] == 0.0 and 0 <= group.distances[1] <= NEAR
    # similar is never tighter than near
    assert set(map(tuple, ids(near))) <= set(map(tuple, ids(duplicates.find(indexed, "similar"))))


def test_a_distance_of_ones_own_replaces_the_level(indexed):
    assert duplicates.find(indexed, "near", max_distance=0.0).groups[0].ids == [
        "pagoda",
        "pagoda-copy",
    ]
    # Unit vectors are at most 2 apart: one group of everything.
    everything = duplicates.find(indexed, "near", max_distance=2.0)
    assert ids(everything) == [
        sorted([*PHOTOS, "camera-small", "flamingo-reencoded", "pagoda-copy"])
    ]


def test_a_model_without_calibration_offers_exact_only(tmp_path, catalogue):
    store = open_store(str(tmp_path / "clip.db"))
    index_folder(catalogue, store, load_embedder(fake_model.TEXT_NAME))
    with pytest.raises(NotCalibrated, match="no near threshold is calibrated for fake-clip"):
        duplicates.find(store, "near")
    assert ids(duplicates.find(store, "exact")) == [["pagoda", "pagoda-copy"]]
    assert ["pagoda", "pagoda-copy"] in ids(duplicates.find(store, "near", max_distance=1e-4))
    store.close()


def test_thresholds_hold_only_for_the_weights_they_were_measured_with():
    meta = {"model": fake_model.NAME, "weights": f"seed-{fake_model.SEED}"}
    assert duplicates.level_distance(meta, "near") == NEAR
    with pytest.raises(NotCalibrated):
        duplicates.level_distance({**meta, "weights": "sha256:other"}, "near")
    assert duplicates.near_distance({"model": "resnet50", "weights": "IMAGENET1K_V1"}) is None


# -- the grouping itself ------------------------------------------------------------


@pytest.mark.parametrize("radius", [0.3, 0.6, 0.9])
def test_radius_pairs_find_what_comparing_every_pair_finds(radius):
    rng = np.random.default_rng(int(radius * 10))
    m = clustered_vectors(3000, 128, seed=int(radius * 10))
    copies = rng.choice(3000, 60, replace=False)
    noisy = m[copies[:30]] + 0.02 * rng.standard_normal((30, 128)).astype(np.float32)
    m[copies[30:]] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    d = np.sqrt(np.maximum(2 - 2 * m @ m.T, 0))
    want = {(a, b) for a, b in zip(*np.nonzero(d <= radius), strict=True) if a < b}
    got = set()
    for a, b in duplicates.radius_pairs(m, radius):
        assert (d[a, b] <= radius + 1e-5).all()  # never a pair beyond the distance
        got |= {(min(x, y), max(x, y)) for x, y in zip(a.tolist(), b.tolist(), strict=True)}
    assert len(want) >= 30 and len(got & want) / len(want) >= 0.999


def test_components_join_chains_of_pairs():
    rng = np.random.default_rng(1)
    n = 500
    a, b = rng.integers(0, n, 300), rng.integers(0, n, 300)
    components = duplicates.Components(n)
    for lo in range(0, 300, 50):  # pairs arrive in blocks, as radius_pairs yields them
        components.union(a[lo : lo + 50], b[lo : lo + 50])
    parent = list(range(n))

    def root(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for x, y in zip(a, b, strict=True):
        parent[root(x)] = root(y)
    naive: dict[int, list[int]] = {}
    for i in range(n):
        naive.setdefault(root(i), []).append(i)
    assert sorted(g.tolist() for g in components.groups()) == sorted(
        g for g in naive.values() if len(g) > 1
    )
    assert components.degree.sum() == 600


# -- the command and the API ----------------------------------------------------------


def test_the_duplicates_command(indexed, db_location):
    runner = CliRunner()
    text = runner.invoke(cli, ["duplicates", "--db", db_location])
    assert text.exit_code == 0, text.output
    assert "group 1 (2 images)" in text.stdout
    assert f"3 groups, 6 of 8 images; level near (distance <= {NEAR:g})" in text.stderr
    as_json = runner.invoke(cli, ["duplicates", "--db", db_location, "--level", "exact", "--json"])
    body = json.loads(as_json.stdout)
    assert body["groups"] == [
        {"images": [{"id": "pagoda", "distance": 0.0}, {"id": "pagoda-copy", "distance": 0.0}]}
    ]
    refused = runner.invoke(
        cli, ["duplicates", "--db", db_location, "--level", "exact", "--max-distance", "1"]
    )
    assert refused.exit_code == 2 and "compares file contents" in refused.output


@pytest.fixture
def client(indexed, db_location, catalogue, model):
    service = Service(Settings(db=db_location, images_dir=str(catalogue)))
    service.embedder = model
    with TestClient(create_app(service=service)) as c:
        yield c
    service.close()


def test_get_duplicates_lists_groups_a_page_at_a_time(client):
    whole = client.get("/duplicates", params={"level": "near"})
    assert whole.status_code == 200, whole.text
    body = whole.json()
    assert (body["level"], body["max_distance"], body["images"]) == ("near", NEAR, 8)
    assert body["total_groups"] == 3 and body["next_offset"] is None
    first = client.get("/duplicates", params={"level": "near", "limit": 2}).json()
    rest = client.get("/duplicates", params={"level": "near", "limit": 2, "offset": 2}).json()
    assert first["next_offset"] == 2 and rest["next_offset"] is None
    assert first["groups"] + rest["groups"] == body["groups"]
    assert_error(client.get("/duplicates", params={"level": "twins"}), 422, "invalid_request")


def test_search_results_say_whether_they_are_copies_of_the_query(client, caltech_dir):
    def first(data: bytes, **form) -> list[dict]:
        response = client.post(
            "/similarity-search", files={"file": ("q.jpg", data, "image/jpeg")}, data=form
        )
        assert response.status_code == 200, response.text
        return response.json()["results"]

    same = first((caltech_dir / PHOTOS["pagoda"]).read_bytes())
    assert {r["id"]: r["match"] for r in same[:2]} == {"pagoda": "exact", "pagoda-copy": "exact"}
    edited = first(reencoded(caltech_dir / PHOTOS["ewer"], 35))
    assert (edited[0]["id"], edited[0]["match"]) == ("ewer", "near")
    other = first(image_bytes((64, 48), (10, 200, 250)))
    assert all(r["match"] is None for r in other)
    similar = client.get("/images/flamingo/similar", params={"k": 1}).json()["results"]
    assert similar == [
        {
            "id": "flamingo-reencoded",
            "distance": pytest.approx(similar[0]["distance"]),
            "match": "near",
            "metadata": {},
        }
    ]


def test_several_query_images_leave_themselves_out(client, caltech_dir):
    files = [
        ("file", ("a.jpg", (caltech_dir / PHOTOS["flamingo"]).read_bytes(), "image/jpeg")),
        ("file", ("b.jpg", (caltech_dir / PHOTOS["camera"]).read_bytes(), "image/jpeg")),
    ]
    response = client.post("/similarity-search", files=files, data={"k": "6"})
    assert response.status_code == 200, response.text
    results = {r["id"]: r["match"] for r in response.json()["results"]}
    assert "flamingo" not in results and "camera" not in results
    # Their edited copies are not the query: they come back, marked near to one of them.
    assert results["flamingo-reencoded"] == "near" and results["camera-small"] == "near"
    too_many = [files[0]] * 11
    assert_error(client.post("/similarity-search", files=too_many), 422, "invalid_request")


def test_one_report_is_computed_at_a_time_and_reused(client):
    gate = client.app.state.duplicates_gate
    first = client.get("/duplicates", params={"level": "near"}).json()
    # While a report is being computed (the gate's one place taken), another request is
    # told to come back rather than hold a server thread; a report made already is
    # served from memory.
    with gate.admit():
        assert client.get("/duplicates", params={"level": "near"}).json() == first
        busy = client.get("/duplicates", params={"level": "exact"})
        error = assert_error(busy, 503, "busy")
        assert "duplicate report being computed" in error["message"]
        assert 1 <= int(busy.headers["Retry-After"]) <= 60
    assert client.get("/duplicates", params={"level": "exact"}).status_code == 200


def test_exact_copies_pair_at_a_radius_below_float_rounding():
    # |a|^2 + |b|^2 - 2ab in float32 is off by ~1e-7 of the norms: for vectors of norm
    # 100 that is ~1e-3, far more than the squared radius (1e-6). Copies must still pair.
    rng = np.random.default_rng(7)
    m = rng.standard_normal((200, 64)).astype(np.float32)
    m *= 100 / np.linalg.norm(m, axis=1, keepdims=True)
    m[190:] = m[:10]
    found = {
        (int(a), int(b))
        for rows, cols in duplicates.radius_pairs(m, 1e-3)
        for a, b in zip(rows, cols, strict=True)
    }
    assert found == {(i, i + 190) for i in range(10)} | {(i + 190, i) for i in range(10)}
