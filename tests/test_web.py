"""The browsing routes: the page, catalogue images, cached thumbnails, similar images.

Most tests run over a tiny catalogue of PIL images; the similar-image tests use the
Caltech photos. Both are indexed with the tests' fake model: these routes serve files
and neighbours, whatever model made the vectors.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support import assert_error, image_bytes

from imagefinder.config import Settings
from imagefinder.indexer import index_folder
from imagefinder.redact import public_path
from imagefinder.server.app import create_app
from imagefinder.server.thumbs import SIDE, cache_dir
from imagefinder.service import Service
from imagefinder.store import is_postgres, open_store


def build_catalogue(settings: Settings, model) -> Path:
    """Three real images, one in a sub-folder so its id has a '/', indexed."""
    folder = Path(settings.images_dir)
    (folder / "red").mkdir(parents=True)
    (folder / "red" / "one.jpg").write_bytes(image_bytes((320, 240), (220, 40, 40)))
    (folder / "two.png").write_bytes(image_bytes((90, 300), (30, 160, 60), fmt="PNG"))
    (folder / "three.gif").write_bytes(image_bytes((64, 64), (30, 60, 200), fmt="GIF"))
    store = open_store(settings.db)
    summary = index_folder(folder, store, model)
    store.close()
    assert summary.indexed == 3, summary.problems
    return folder


IDS = ("red/one", "two", "three")


@pytest.fixture(scope="module")
def shared(tmp_path_factory, model):
    """One catalogue for the tests that only read (module-wide: indexing costs)."""
    root = tmp_path_factory.mktemp("web")
    settings = Settings(db=str(root / "index.db"), images_dir=str(root / "images"))
    folder = build_catalogue(settings, model)
    # Without the lifespan: nothing here needs the model, so none is loaded.
    service = Service(settings)
    yield settings, folder, TestClient(create_app(service=service))
    service.close()


@pytest.fixture
def client(shared) -> TestClient:
    return shared[2]


@pytest.fixture
def fresh(settings, tmp_path, model):
    """A catalogue of its own, for tests that change files or watch the cache fill."""
    if is_postgres(settings.db):
        settings = settings.with_(thumbs_dir=str(tmp_path / "thumbs"))
    folder = build_catalogue(settings, model)
    service = Service(settings)
    yield TestClient(create_app(service=service)), folder
    service.close()


def thumbs_in(client: TestClient) -> list[Path]:
    service = client.app.state.service
    folder = cache_dir(service.settings, service.store)
    return sorted(folder.iterdir()) if folder.exists() else []


# -- the page ------------------------------------------------------------------------


def test_the_page_and_its_files_are_served_from_the_package(shared):
    settings, _, client = shared
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<input id="file"' in html and '<label for="file"' in html
    # The upload cap, so the page can refuse a huge file without sending it.
    cap = f'name="imagefinder-max-upload-bytes" content="{settings.max_upload_bytes}"'
    assert cap in html and "{{" not in html
    for asset, kind in [("/static/app.css", "text/css"), ("/static/app.js", "javascript")]:
        assert f'"{asset}"' in html
        response = client.get(asset)
        assert response.status_code == 200
        assert kind in response.headers["content-type"]
        # Works offline: no CDN, no web fonts, nothing fetched from elsewhere.
        assert not re.search(r"https?://|@import|@font-face", response.text), asset
    assert not re.search(r"(src|href)=\"https?://", html)


# -- catalogue images ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_id", "name", "media_type"),
    [("red/one", "red/one.jpg", "image/jpeg"), ("two", "two.png", "image/png")],
)
def test_a_catalogue_image_is_served_as_it_is_on_disk(shared, image_id, name, media_type):
    _, catalogue, client = shared
    response = client.get(f"/images/{image_id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.content == (catalogue / name).read_bytes()
    assert response.headers["cache-control"] == "no-cache"
    again = client.get(f"/images/{image_id}", headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304
    assert again.content == b""


def test_an_id_with_a_slash_may_arrive_encoded(client):
    assert client.get("/images/red%2Fone").status_code == 200
    assert client.get("/images/red%2Fone/thumbnail").status_code == 200


# -- thumbnails ----------------------------------------------------------------------


def test_a_thumbnail_is_a_small_jpeg_with_caching_headers(client):
    response = client.get("/images/red/one/thumbnail")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["cache-control"] == "no-cache"
    assert re.fullmatch(r'"[0-9a-f]+"', response.headers["etag"])
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.format == "JPEG"
    assert max(thumb.size) == SIDE and thumb.size == (SIDE, SIDE * 240 // 320)
    tall = Image.open(io.BytesIO(client.get("/images/two/thumbnail").content))
    assert tall.size[1] == SIDE and tall.size[0] < SIDE  # aspect ratio kept
    small = Image.open(io.BytesIO(client.get("/images/three/thumbnail").content))
    assert small.size == (64, 64)  # never enlarged


def test_a_thumbnail_is_made_once_then_served_from_the_cache(fresh):
    client, _ = fresh
    assert thumbs_in(client) == []
    first = client.get("/images/red/one/thumbnail")
    [cached] = thumbs_in(client)
    assert cached.read_bytes() == first.content
    # Swap the cached file: if the next answer is the swapped bytes, it came from the cache.
    marker = image_bytes((20, 10), (1, 2, 3))
    cached.write_bytes(marker)
    second = client.get("/images/red/one/thumbnail")
    assert second.status_code == 200
    assert second.content == marker
    assert second.headers["etag"] == first.headers["etag"]
    assert thumbs_in(client) == [cached]


@pytest.mark.parametrize("form", ["{etag}", "W/{etag}", '"other", {etag}', "*"])
def test_if_none_match_gets_a_304(client, form):
    etag = client.get("/images/red/one/thumbnail").headers["etag"]
    response = client.get(
        "/images/red/one/thumbnail", headers={"If-None-Match": form.format(etag=etag)}
    )
    assert response.status_code == 304
    assert response.headers["etag"] == etag
    assert response.content == b""


def test_a_stale_etag_gets_the_image(client):
    response = client.get("/images/red/one/thumbnail", headers={"If-None-Match": '"0123abc"'})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"


def test_a_changed_image_gets_a_new_thumbnail_and_the_old_one_is_dropped(fresh):
    client, catalogue = fresh
    before = client.get("/images/red/one/thumbnail")
    path = catalogue / "red" / "one.jpg"
    st = path.stat()
    path.write_bytes(image_bytes((200, 200), (10, 200, 240)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = client.get("/images/red/one/thumbnail")
    assert after.status_code == 200
    assert after.headers["etag"] != before.headers["etag"]
    assert Image.open(io.BytesIO(after.content)).size == (200, 200)
    assert [p.read_bytes() for p in thumbs_in(client)] == [after.content]
    stale = client.get(
        "/images/red/one/thumbnail", headers={"If-None-Match": before.headers["etag"]}
    )
    assert stale.status_code == 200


def test_cache_files_are_named_by_hashes_never_by_ids(fresh):
    client, _ = fresh
    for image_id in IDS:
        assert client.get(f"/images/{image_id}/thumbnail").status_code == 200
    names = [p.name for p in thumbs_in(client)]
    assert len(names) == 3
    assert all(re.fullmatch(r"[0-9a-f]{64}-[0-9a-f]{20}\.jpg", n) for n in names), names


def test_the_cache_sits_beside_a_sqlite_index_or_where_configured(fresh, settings):
    client, _ = fresh
    service = client.app.state.service
    folder = cache_dir(service.settings, service.store)
    if is_postgres(settings.db):
        assert folder == Path(service.settings.thumbs_dir)
        default = cache_dir(service.settings.with_(thumbs_dir=""), service.store)
        assert default.parent == Path("data", "thumbs")
        assert re.fullmatch("[0-9a-f]{16}", default.name)
    else:
        assert folder == Path(settings.db + ".thumbs")
    assert client.get("/images/two/thumbnail").status_code == 200
    assert [p.parent for p in thumbs_in(client)] == [folder]


# -- unknown ids, missing files, missing index -----------------------------------------


@pytest.mark.parametrize("suffix", ["", "/thumbnail"])
def test_an_unknown_id_is_a_404_in_the_error_shape(client, suffix):
    error = assert_error(client.get(f"/images/nope{suffix}"), 404, "unknown_id")
    assert "nope" in error["message"]


@pytest.mark.parametrize("suffix", ["", "/thumbnail", "/similar"])
def test_an_id_with_a_nul_is_a_404_on_every_store(fresh, suffix):
    client, _ = fresh
    assert_error(client.get(f"/images/red%2Fone%00{suffix}"), 404, "unknown_id")


@pytest.mark.parametrize("suffix", ["", "/thumbnail"])
def test_a_file_gone_from_disk_is_a_404_naming_the_fix(fresh, suffix):
    client, catalogue = fresh
    (catalogue / "two.png").unlink()
    error = assert_error(client.get(f"/images/two{suffix}"), 404, "file_missing")
    assert "extract_image_features.py" in error["message"] and "--prune" in error["message"]


@pytest.mark.parametrize("suffix", ["", "/thumbnail", "/similar"])
def test_without_an_index_the_answer_names_the_build_command(settings, suffix):
    service = Service(settings)
    try:
        response = TestClient(create_app(service=service)).get(f"/images/x{suffix}")
    finally:
        service.close()
    error = assert_error(response, 503, "index_missing")
    assert (
        f"extract_image_features.py --folder {public_path(settings.images_dir)}" in error["message"]
    )
    assert settings.images_dir not in error["message"]  # an absolute path: never public


# -- ids never reach the filesystem ----------------------------------------------------

SECRET = b"not for the web"


@pytest.fixture(scope="module")
def outside(shared) -> dict[str, Path]:
    """Files right beside the catalogue folder that no request may reach."""
    beside = shared[1].parent
    files = {"jpg": beside / "secret.jpg", "txt": beside / "secret.txt"}
    files["jpg"].write_bytes(image_bytes((40, 40), (9, 9, 9), comment=SECRET))
    files["txt"].write_bytes(SECRET)
    return files


TRAVERSALS = [
    "..%2Fsecret",
    "..%2Fsecret.jpg",
    "..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "red%2F..%2F..%2Fsecret",
    "%2e%2e%2fsecret",
    "..%5Csecret",
    "....%2F%2Fsecret",
    "%2Fetc%2Fpasswd",
    "red%2Fone%00",
    "%00",
    "red%2Fone.jpg",
    "red%2F.%2Fone",
    "file:%2F%2F%2Fetc%2Fpasswd",
    "{abs_jpg}",
    "{abs_txt}",
    "{abs_jpg_raw}",
]


@pytest.mark.parametrize("suffix", ["", "/thumbnail"])
@pytest.mark.parametrize("attempt", TRAVERSALS)
def test_ids_are_never_paths(shared, outside, attempt, suffix):
    _, _, client = shared
    path = "/images/" + attempt.format(
        abs_jpg=quote(str(outside["jpg"]), safe=""),
        abs_txt=quote(str(outside["txt"]), safe=""),
        abs_jpg_raw=str(outside["jpg"]).lstrip("/"),
    )
    response = client.get(path + suffix)
    assert response.status_code in (404, 422), (path, response.status_code)
    assert_error(response, response.status_code)
    assert SECRET not in response.content
    assert b"root:" not in response.content
    # Whatever the cache holds was made for a catalogue id, named by its hash.
    known = {hashlib.sha256(i.encode()).hexdigest() for i in IDS}
    assert {p.name.split("-")[0] for p in thumbs_in(client)} <= known


# -- similar images (Caltech) ----------------------------------------------------------


@pytest.fixture(scope="module")
def caltech_client(caltech_index):
    with TestClient(create_app(Settings(db=str(caltech_index)))) as client:
        yield client


def test_similar_has_the_search_shape_and_excludes_the_image_itself(caltech_client, caltech_dir):
    similar = caltech_client.get("/images/pagoda/image_0004/similar", params={"k": 5})
    assert similar.status_code == 200, similar.text
    body = similar.json()
    upload = caltech_client.post(
        "/similarity-search",
        files={"file": ("q.jpg", (caltech_dir / "pagoda" / "image_0004.jpg").read_bytes())},
        data={"k": "6"},
    ).json()
    assert set(body) == set(upload) == {"model", "metric", "results", "next_offset"}
    assert (body["model"], body["metric"]) == (upload["model"], upload["metric"])
    ids = [r["id"] for r in body["results"]]
    assert len(ids) == 5 and "pagoda/image_0004" not in ids
    # The upload of the same file finds itself first, then the same neighbours.
    assert upload["results"][0]["id"] == "pagoda/image_0004"
    assert ids == [r["id"] for r in upload["results"][1:]]
    # Re-ranked (αQE, DBA), so not necessarily increasing; but the same distances.
    for mine, theirs in zip(body["results"], upload["results"][1:], strict=True):
        assert mine["distance"] == pytest.approx(theirs["distance"], abs=1e-4)


def test_similar_defaults_to_three(caltech_client):
    response = caltech_client.get("/images/accordion/image_0002/similar")
    assert len(response.json()["results"]) == 3


@pytest.mark.parametrize("k", ["0", "101", "three"])
def test_similar_refuses_a_bad_k(caltech_client, k):
    assert_error(caltech_client.get(f"/images/accordion/image_0002/similar?k={k}"), 422)


@pytest.mark.parametrize("attempt", ["nope", "..%2F..%2Fetc%2Fpasswd", "%00", "accordion"])
def test_similar_of_an_unknown_id_is_a_404(caltech_client, attempt):
    assert_error(caltech_client.get(f"/images/{attempt}/similar"), 404, "unknown_id")


def test_the_schema_documents_the_image_routes(caltech_client):
    paths = caltech_client.get("/openapi.json").json()["paths"]
    thumbnail = paths["/images/{image_id}/thumbnail"]["get"]["responses"]
    assert list(thumbnail["200"]["content"]) == ["image/jpeg"]
    assert {"304", "404", "422", "503"} <= set(thumbnail)
    image = paths["/images/{image_id}"]["get"]["responses"]
    assert {"image/jpeg", "image/png"} <= set(image["200"]["content"])
    similar = paths["/images/{image_id}/similar"]["get"]["responses"]
    assert similar["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "SearchResponse"
    )
    assert similar["404"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert "text/html" in paths["/"]["get"]["responses"]["200"]["content"]
