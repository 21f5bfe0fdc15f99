"""Writing over the API: POST /images and DELETE /images/{id}, behind a bearer token.

Everything is real but the model, the tests' fake (the model is not the point here): a
SQLite index and a catalogue folder in tmp dirs, the app in-process through
Starlette's TestClient.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import fake_model
import pytest
from fastapi.testclient import TestClient
from support import assert_error, image_bytes

from imagefinder.config import Settings
from imagefinder.indexer import index_folder
from imagefinder.server.app import create_app
from imagefinder.service import Service
from imagefinder.store import open_store

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RED = image_bytes((96, 64), (220, 30, 30))
BLUE_PNG = image_bytes((80, 80), (20, 40, 230), fmt="PNG")


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def make_client(tmp_path, model):
    """A client over a fresh, empty index, built from ``Settings`` overrides."""
    services = []

    def make(**overrides) -> TestClient:
        settings = Settings(
            db=str(tmp_path / "index.db"),
            images_dir=str(tmp_path / "images"),
            model=fake_model.NAME,
            api_token=TOKEN,
        ).with_(**overrides)
        service = Service(settings)
        if settings.model == fake_model.NAME:
            service.embedder = model  # the session's model, instead of loading another
        services.append(service)
        return TestClient(create_app(service=service))

    yield make
    for service in services:
        service.close()


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def post(client: TestClient, image_id: str, data: bytes, name: str = "upload.jpg", **kw):
    return client.post("/images", files={"file": (name, data)}, data={"id": image_id}, **kw)


# -- the key -----------------------------------------------------------------------------


def test_without_a_configured_token_writes_are_refused_never_open(make_client, tmp_path):
    client = make_client(api_token="")
    for response in (
        post(client, "a", RED, headers=AUTH),
        post(client, "a", RED),
        client.delete("/images/a", headers=AUTH),
    ):
        error = assert_error(response, 403, "writes_disabled")
        assert "IMAGEFINDER_API_TOKEN" in error["message"]
    assert not (tmp_path / "images").exists()
    assert not (tmp_path / "index.db").exists()


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Basic {TOKEN}",
        TOKEN,
        "Bearer \u00fcnicode".encode("latin-1"),  # a non-ASCII byte must not crash compare_digest
    ],
)
def test_a_missing_or_wrong_token_is_a_401_with_a_bearer_challenge(client, tmp_path, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    for response in (
        post(client, "a", RED, headers=headers),
        client.delete("/images/a", headers=headers),
    ):
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert not (tmp_path / "images").exists()


def test_the_scheme_name_is_case_insensitive(client):
    assert post(client, "a", RED, headers={"Authorization": f"bearer {TOKEN}"}).status_code == 201


def test_search_and_health_stay_public(client):
    assert post(client, "a", RED, headers=AUTH).status_code == 201
    assert client.get("/health").json()["vectors"] == 1
    found = client.post("/similarity-search", files={"file": ("q.jpg", RED)})
    assert found.status_code == 200, found.text
    assert found.json()["results"][0]["id"] == "a"


def test_the_schema_documents_the_bearer_scheme_on_writes_only(client):
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
    }
    assert schema["paths"]["/images"]["post"]["security"] == [{"HTTPBearer": []}]
    assert schema["paths"]["/images/{image_id}"]["delete"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/similarity-search"]["post"]


def test_settings_read_the_token_and_cors_origins_from_the_environment():
    settings = Settings.from_env(
        {
            "IMAGEFINDER_API_TOKEN": "abc",
            "IMAGEFINDER_CORS_ORIGINS": "https://a.example, https://b.example,",
        }
    )
    assert settings.api_token == "abc"
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert Settings.from_env({}).api_token is None
    assert Settings.from_env({}).cors_origins == ()


# -- adding and replacing ---------------------------------------------------------------


def test_the_first_post_creates_the_index_with_the_configured_model(client, tmp_path):
    assert not (tmp_path / "index.db").exists()
    response = post(client, "red-1", RED, headers=AUTH)
    assert response.status_code == 201, response.text
    assert response.json() == {
        "id": "red-1",
        "replaced": False,
        "format": "JPEG",
        "bytes": len(RED),
    }
    health = client.get("/health").json()
    assert (health["status"], health["model"], health["vectors"]) == ("ok", fake_model.NAME, 1)
    nearest = client.post("/similarity-search", files={"file": ("q.jpg", RED)}).json()["results"]
    assert nearest[0]["id"] == "red-1"
    assert nearest[0]["distance"] < 1e-3


def test_a_broken_first_upload_creates_no_index(client, tmp_path):
    assert_error(post(client, "a", RED[: len(RED) // 2], headers=AUTH), 400, "not_an_image")
    assert not (tmp_path / "index.db").exists()
    assert not (tmp_path / "images").exists()
    assert client.get("/health").json()["status"] == "missing"


def test_an_image_is_saved_as_id_dot_decoded_format_with_its_row(client, tmp_path):
    # PNG bytes under a .jpg name and a lying content type: the bytes decide.
    response = client.post(
        "/images",
        files={"file": ("holiday.jpg", BLUE_PNG, "image/jpeg")},
        data={"id": "blue.v2"},
        headers=AUTH,
    )
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "PNG"
    images = tmp_path / "images"
    assert files_under(images) == {"blue.v2.png"}  # and no temporary file left behind
    saved = images / "blue.v2.png"
    assert saved.read_bytes() == BLUE_PNG
    state = open_store(tmp_path / "index.db").file_state("blue.v2")
    st = saved.stat()
    assert state.path == str(saved.resolve())
    assert state.sha256 == hashlib.sha256(BLUE_PNG).hexdigest()
    assert (state.size, state.mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_posting_an_id_again_replaces_the_image_file_and_vector(client, tmp_path):
    assert post(client, "item", RED, headers=AUTH).json()["replaced"] is False
    response = post(client, "item", BLUE_PNG, name="new.png", headers=AUTH)
    assert response.status_code == 201, response.text
    assert response.json()["replaced"] is True
    assert files_under(tmp_path / "images") == {"item.png"}  # the old .jpg is gone
    assert client.get("/health").json()["vectors"] == 1
    found = client.post("/similarity-search", files={"file": ("q.png", BLUE_PNG)}).json()
    assert found["results"][0]["id"] == "item"
    assert found["results"][0]["distance"] < 1e-3


def test_an_extract_over_the_catalogue_folder_sees_api_writes_as_unchanged(client, tmp_path, model):
    for i in range(3):
        post(client, f"p{i}", image_bytes((50 + i, 40), (40 * i, 90, 20)), headers=AUTH)
    summary = index_folder(tmp_path / "images", open_store(tmp_path / "index.db"), model)
    assert (summary.indexed, summary.unchanged, summary.skipped) == (0, 3, 0)


@pytest.mark.parametrize(
    "image_id",
    ["../../x", "/etc/passwd", "a/b", "..", ".hidden", "-rf", "a b", "x" * 129, "nul\x00byte"],
)
def test_an_unsafe_id_is_refused_and_nothing_is_written(client, tmp_path, image_id):
    before = files_under(tmp_path)
    error = assert_error(post(client, image_id, RED, headers=AUTH), 422, "invalid_id")
    assert "id" in error["message"]
    assert files_under(tmp_path) == before


def test_a_missing_id_or_file_is_a_422_in_the_error_shape(client):
    assert_error(client.post("/images", files={"file": ("a.jpg", RED)}, headers=AUTH), 422)
    assert_error(client.post("/images", data={"id": "a"}, headers=AUTH), 422)
    assert_error(post(client, "", RED, headers=AUTH), 422)


def test_without_an_index_and_without_the_model_a_post_is_a_503(make_client, tmp_path):
    client = make_client(model="no-such-model")
    error = assert_error(post(client, "a", RED, headers=AUTH), 503, "model_unavailable")
    assert "no-such-model" in error["message"]
    assert not (tmp_path / "images").exists()


# -- deleting ----------------------------------------------------------------------------


def test_delete_removes_the_row_and_the_file_it_owns(client, tmp_path):
    post(client, "gone", RED, headers=AUTH)
    post(client, "kept", BLUE_PNG, headers=AUTH)
    response = client.delete("/images/gone", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json() == {"id": "gone", "file_removed": True}
    assert files_under(tmp_path / "images") == {"kept.png"}
    assert client.get("/health").json()["vectors"] == 1
    results = client.post("/similarity-search", files={"file": ("q.jpg", RED)}).json()["results"]
    assert [r["id"] for r in results] == ["kept"]
    assert_error(client.delete("/images/gone", headers=AUTH), 404, "unknown_id")


def test_delete_takes_ids_with_slashes_and_leaves_files_outside_the_catalogue(
    make_client, tmp_path, model
):
    """A folder indexed in place has ids like ``red/one``; its files are the user's."""
    folder = tmp_path / "photos"
    (folder / "red").mkdir(parents=True)
    (folder / "red" / "one.jpg").write_bytes(RED)
    (folder / "two.png").write_bytes(BLUE_PNG)
    index_folder(folder, open_store(tmp_path / "index.db"), model)
    client = make_client()
    response = client.delete("/images/red/one", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json() == {"id": "red/one", "file_removed": False}
    assert (folder / "red" / "one.jpg").read_bytes() == RED
    assert client.get("/health").json()["vectors"] == 1


def test_delete_without_an_index_is_a_404_and_creates_nothing(client, tmp_path):
    assert_error(client.delete("/images/nothing", headers=AUTH), 404, "unknown_id")
    assert files_under(tmp_path) == set()


# -- CORS --------------------------------------------------------------------------------


def preflight(client: TestClient, origin: str, method: str = "POST"):
    return client.options(
        "/images",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization",
        },
    )


def test_cors_is_off_by_default(client):
    assert "access-control-allow-origin" not in preflight(client, "https://shop.example").headers
    response = client.get("/health", headers={"Origin": "https://shop.example"})
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_only_the_configured_origins(make_client):
    client = make_client(cors_origins=("https://shop.example",))
    allowed = preflight(client, "https://shop.example")
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://shop.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    refused = preflight(client, "https://evil.example")
    assert "access-control-allow-origin" not in refused.headers
    simple = client.get("/health", headers={"Origin": "https://shop.example"})
    assert simple.headers["access-control-allow-origin"] == "https://shop.example"
