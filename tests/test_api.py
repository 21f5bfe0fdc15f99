"""The HTTP API through FastAPI's TestClient, over a real index of real photos,
embedded with the tests' fake model (the model is not the point here).

Every error leaves in one shape: ``{"error": {"status", "code", "message"}}``.
"""

from __future__ import annotations

import time
from pathlib import Path

import fake_model
import pytest
from fastapi.testclient import TestClient
from support import assert_error, image_bytes

from imagefinder.indexer import index_folder
from imagefinder.redact import public_path
from imagefinder.server.app import BODY_SLACK, create_app
from imagefinder.server.health import TTL as HEALTH_TTL
from imagefinder.service import Service
from imagefinder.store import is_postgres, open_store, public_location

CLASSES = ("accordion", "pagoda", "trilobite")
# For what the API decides before it ever reaches the index: one store is enough.
STORE_UNUSED = pytest.mark.sqlite_only


@pytest.fixture
def indexed(settings, caltech_dir, model):
    """Six Caltech photos (two per class) indexed with the fake model at ``settings.db``."""
    chosen = {
        f"{label}/{p.stem}"
        for label in CLASSES
        for p in sorted((caltech_dir / label).glob("*.jpg"))[:2]
    }
    store = open_store(settings.db)
    summary = index_folder(caltech_dir, store, model, select=chosen.__contains__)
    store.close()
    assert summary.indexed == 6
    return sorted(chosen)


def make_client(settings, model=None, **changes) -> TestClient:
    service = Service(settings.with_(**changes))
    if model is not None:
        # The session's already-loaded model: the very one the index was built with.
        service.embedder = model
    return TestClient(create_app(service=service))


@pytest.fixture
def client(settings, indexed, model):
    with make_client(settings, model) as c:
        yield c


@pytest.fixture
def bare_client(settings):
    """No index behind it: for what the API decides before it looks at the index."""
    with make_client(settings) as c:
        yield c


def search(client: TestClient, data: bytes, name="query.jpg", ctype="image/jpeg", **form):
    return client.post("/similarity-search", files={"file": (name, data, ctype)}, data=form)


def photo(caltech_dir, image_id: str) -> bytes:
    return (caltech_dir / f"{image_id}.jpg").read_bytes()


# -- searching ---------------------------------------------------------------------


def test_search_returns_the_three_nearest_by_default(client, indexed, caltech_dir):
    query = indexed[2]
    response = search(client, photo(caltech_dir, query))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["metric"]) == (fake_model.NAME, "l2")
    results = body["results"]
    assert len(results) == 3
    assert all(
        isinstance(r["id"], str) and set(r) == {"id", "distance", "match", "metadata"}
        for r in results
    )
    # The photo itself is in the index: it comes first, at distance ~0.
    assert results[0]["id"] == query and results[0]["distance"] == pytest.approx(0, abs=1e-3)
    assert len({r["id"] for r in results}) == 3


def test_without_expansion_results_come_nearest_first(client, indexed, caltech_dir):
    response = search(client, photo(caltech_dir, indexed[2]), k="6", expand="false")
    distances = [r["distance"] for r in response.json()["results"]]
    assert len(distances) == 6 and distances == sorted(distances)


@STORE_UNUSED
@pytest.mark.parametrize("expand", ["maybe", "2"])
def test_a_bad_expand_is_422(bare_client, jpeg, expand):
    error = assert_error(search(bare_client, jpeg, expand=expand), 422, "invalid_request")
    assert error["message"].startswith("expand: ")


def test_k_sets_how_many_come_back(client, caltech_dir, indexed):
    for k, expected in (("1", 1), ("5", 5), ("100", 6)):
        response = search(client, photo(caltech_dir, indexed[0]), k=k)
        assert response.status_code == 200, response.text
        assert len(response.json()["results"]) == expected, k


@STORE_UNUSED
@pytest.mark.parametrize("k", ["0", "101", "abc", "-1", "2.5"])
def test_a_bad_k_is_422(bare_client, jpeg, k):
    error = assert_error(search(bare_client, jpeg, k=k), 422)
    assert error["code"] == "invalid_request"
    assert error["message"].startswith("k: ")


@STORE_UNUSED
def test_a_missing_file_is_422(bare_client):
    error = assert_error(bare_client.post("/similarity-search", data={"k": "3"}), 422)
    assert "file" in error["message"]
    error = assert_error(bare_client.post("/similarity-search", json={"file": "x"}), 422)
    assert "file" in error["message"]


def test_the_upload_is_judged_by_its_bytes_not_its_name(client, jpeg):
    as_text = search(client, jpeg, name="x.txt", ctype="text/plain")
    assert as_text.status_code == 200, as_text.text
    assert len(as_text.json()["results"]) == 3
    error = assert_error(search(client, b"just some text", name="x.jpg", ctype="image/jpeg"), 400)
    assert error["code"] == "not_an_image"


UNUSABLE = {
    "text": (b"%PDF-1.4 not an image", "not_an_image", "not a supported image"),
    "corrupt-jpeg": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x13" * 400, "not_an_image", ""),
    "truncated-jpeg": (image_bytes((300, 300))[:1500], "not_an_image", "truncated"),
    "truncated-png": (image_bytes(fmt="PNG")[:-30], "not_an_image", ""),
    "empty": (b"", "empty_upload", "empty"),
}


def test_uploads_that_are_not_usable_images_are_400(client):
    for case, (data, code, words) in UNUSABLE.items():
        error = assert_error(search(client, data), 400)
        assert error["code"] == code, case
        assert words in error["message"].lower(), (case, error)


def test_an_upload_over_the_byte_cap_is_413(settings, indexed, model):
    big = image_bytes((600, 600), quality=100)
    cap = len(big) - 1
    with make_client(settings, model, max_upload_bytes=cap) as client:
        # Just over the cap: the body fits the framing slack, the file itself does not.
        error = assert_error(search(client, big), 413)
        assert error["code"] == "too_large" and f"{cap:,} bytes" in error["message"]
        # Far over: refused from Content-Length before anything is read.
        error = assert_error(search(client, big + b"\0" * (BODY_SLACK * 2)), 413)
        assert error["code"] == "too_large"
        assert search(client, image_bytes((64, 48))).status_code == 200


@STORE_UNUSED
def test_a_streamed_upload_without_content_length_is_capped_too(settings):
    boundary = "imagefinder-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + b"\xff" * (BODY_SLACK + 20_000)
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def chunks():  # an iterator: httpx sends it chunked, with no Content-Length
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    with make_client(settings, max_upload_bytes=10_000) as client:
        response = client.post(
            "/similarity-search",
            content=chunks(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert assert_error(response, 413)["code"] == "too_large"


def test_an_image_over_the_pixel_cap_is_413(settings, indexed, model):
    with make_client(settings, model, max_pixels=64 * 48 - 1) as client:
        error = assert_error(search(client, image_bytes((64, 48))), 413)
    assert error["code"] == "too_many_pixels" and "64x48" in error["message"]


# -- no index yet -----------------------------------------------------------------


def test_no_index_is_503_naming_the_command_that_builds_it(settings, jpeg):
    with make_client(settings) as client:
        error = assert_error(search(client, jpeg), 503)
        assert error["code"] == "index_missing"
        # Anyone may read it: the paths show their last part only, and no password.
        assert (
            f"python extract_image_features.py --folder {public_path(settings.images_dir)} "
            f"--db {public_location(settings.db) if is_postgres(settings.db) else public_path(settings.db)}"
        ) in error["message"]
        assert str(Path(settings.images_dir).parent) not in error["message"]
        health = client.get("/health").json()
        assert (health["status"], health["vectors"], health["model"]) == ("missing", 0, None)


def test_an_empty_index_is_503(settings, jpeg, model):
    store = open_store(settings.db)
    store.ensure_schema(model.meta())
    store.close()
    with make_client(settings, model) as client:
        error = assert_error(search(client, jpeg), 503)
        assert error["code"] == "index_empty"
        assert "extract_image_features.py" in error["message"]
        assert client.get("/health").json()["status"] == "empty"


def test_an_index_built_after_startup_is_used_without_a_restart(settings, caltech_dir, model):
    with make_client(settings) as client:  # loads no model: there is no index to say which
        assert client.get("/health").json()["model_loaded"] is False
        assert search(client, image_bytes()).status_code == 503
        store = open_store(settings.db)
        index_folder(caltech_dir / "pagoda", store, model)
        store.close()
        response = search(client, photo(caltech_dir, "pagoda/image_0001"), k="1")
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["id"] == "image_0001"
        time.sleep(HEALTH_TTL)  # /health answers from a short cache (a flood cannot queue it)
        assert client.get("/health").json()["model_loaded"] is True


# -- the rest of the surface ------------------------------------------------------


def test_health_reports_status_model_and_count(client, settings):
    response = client.get("/health")
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok"
    assert (health["model"], health["metric"], health["dim"]) == (
        fake_model.NAME,
        "l2",
        fake_model.DIM,
    )
    assert health["vectors"] == 6
    # Public: the file name of a SQLite index; host and database of a PostgreSQL one.
    assert health["index"] == public_location(settings.db)
    assert "/" not in health["index"].removeprefix("postgresql://").rstrip("/").split("/")[0]


@STORE_UNUSED
def test_docs_and_openapi_are_served(bare_client):
    docs = bare_client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = bare_client.get("/openapi.json").json()
    route = spec["paths"]["/similarity-search"]["post"]
    assert {"200", "400", "413", "422", "503"} <= set(route["responses"])
    assert "get" in spec["paths"]["/health"]


@STORE_UNUSED
def test_unknown_routes_and_methods_use_the_error_shape(bare_client):
    assert assert_error(bare_client.get("/nope"), 404)["code"] == "not_found"
    assert assert_error(bare_client.get("/similarity-search"), 405)["code"] == "method_not_allowed"


@STORE_UNUSED
@pytest.mark.parametrize(
    "content, ctype",
    [
        (b"garbage", "multipart/form-data; boundary=xyz"),
        (b"--xyz\r\nbroken", "multipart/form-data; boundary=xyz"),
        (b"garbage", "multipart/form-data"),
        (b"\x00" * 100, "application/octet-stream"),
    ],
    ids=["no-parts", "unterminated", "no-boundary", "octet-stream"],
)
def test_malformed_requests_are_4xx_never_500(bare_client, content, ctype):
    response = bare_client.post(
        "/similarity-search", content=content, headers={"Content-Type": ctype}
    )
    assert 400 <= response.status_code < 500, response.text
    assert_error(response, response.status_code)
