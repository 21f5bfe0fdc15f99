"""What an anonymous client can ask of a search is bounded, and every refusal is a 4xx in
the one error shape naming the limit: k, offset, k + offset, max_distance, filters (how
many, how long), query images per search, and /duplicates paging. Each case runs on
every public route that takes the option.

The fake model embeds (the model is not the point); the index, app and forms are real.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from support import assert_error, image_bytes

from imagefinder import query
from imagefinder.config import Settings
from imagefinder.indexer import index_folder
from imagefinder.metadata import MAX_FILTERS, MAX_VALUE
from imagefinder.server.app import create_app
from imagefinder.service import Service
from imagefinder.store import open_store


@pytest.fixture(scope="module")
def client(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("bounds")
    for i in range(6):
        (folder / f"img{i}.png").write_bytes(image_bytes((40, 30), (40 * i, 90, 200), "PNG"))
    db = str(folder / "index.db")
    store = open_store(db)
    index_folder(folder, store, model)
    store.set_metadata((f"img{i}", {"even": str(i % 2 == 0).lower()}) for i in range(6))
    store.close()
    service = Service(Settings(db=db, images_dir=str(folder)))
    service.embedder = model
    with TestClient(create_app(service=service)) as c:
        yield c
    service.close()


PNG = image_bytes((40, 30), (80, 90, 200), "PNG")


def form(fields: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Fields, a name repeated as often as given (as httpx takes them)."""
    out: dict[str, list[str]] = {}
    for name, value in fields:
        out.setdefault(name, []).append(value)
    return out


def upload(client, fields: list[tuple[str, str]], files: int = 1):
    parts = [("file", (f"q{i}.png", PNG, "image/png")) for i in range(files)]
    return client.post("/similarity-search", files=parts, data=form(fields))


def similar(client, fields: list[tuple[str, str]]):
    return client.get("/images/img1/similar", params=fields)


def text(client, fields: list[tuple[str, str]]):
    # The fake model embeds no text: options are checked before that is found out.
    return client.post("/text-search", data=form([("q", "a red car"), *fields]))


ROUTES = [upload, similar, text]
TOO_MANY_FILTERS = [("filter", f"c{i}=v") for i in range(MAX_FILTERS + 1)]


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.__name__)
@pytest.mark.parametrize(
    "fields, says",
    [
        ([("k", "0")], "k"),
        ([("k", str(query.MAX_K + 1))], "k"),
        ([("k", "1e9")], "k"),
        ([("offset", "-1")], "offset"),
        ([("offset", str(query.MAX_DEPTH))], "offset"),
        ([("offset", "9" * 400)], "offset"),
        ([("k", "100"), ("offset", "901")], "k + offset must be at most 1000"),
        ([("max_distance", "-0.1")], "max_distance"),
        ([("max_distance", "nan")], "max_distance"),
        ([("max_distance", "inf")], "max_distance"),
        ([("max_distance", "near")], "max_distance"),
        (TOO_MANY_FILTERS, "filter"),
        ([("filter", "even")], "is not column=value"),
        ([("filter", "even=" + "x" * (MAX_VALUE + 1))], f"longer than {MAX_VALUE}"),
        ([("filter", "x" * 100 + "=1")], "longer than 64"),
        ([("filter", "even=true"), ("filter", "even=false")], "names 'even' twice"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, str) else None,
)
def test_out_of_range_options_are_refused_on_every_search_route(client, route, fields, says):
    error = assert_error(route(client, fields), 422, "invalid_request")
    assert says in error["message"], error


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.__name__)
def test_the_largest_allowed_request_is_answered(client, route):
    """The limits themselves are allowed: the deepest page, the most filter pairs."""
    fields = [("k", str(query.MAX_K)), ("offset", str(query.MAX_DEPTH - query.MAX_K))]
    fields += [("filter", f"c{i}=v") for i in range(MAX_FILTERS - 1)] + [("max_distance", "0")]
    response = route(client, fields)
    if route is text:
        assert_error(response, 422, "text_not_supported")
        return
    assert response.status_code == 200, response.text
    assert response.json()["results"] == [] and response.json()["next_offset"] is None


def test_query_images_per_search_are_capped(client):
    assert upload(client, [("k", "3")], files=query.MAX_QUERIES).status_code == 200
    error = assert_error(upload(client, [], files=query.MAX_QUERIES + 1), 422, "invalid_request")
    assert f"at most {query.MAX_QUERIES} images" in error["message"]
    # Far more parts than that: the form parser's own cap answers, in the same shape.
    many = [("file", ("q.png", b"x", "image/png"))] * 1001
    assert_error(client.post("/similarity-search", files=many), 400)


def test_several_query_images_together_stay_under_the_body_cap(client):
    """The byte cap is on the whole request, not per image: ten images of just under
    the cap each are refused before they are read."""
    cap = client.app.state.service.settings.max_upload_bytes
    big = b"\xff\xd8" + b"\0" * (cap // 2)
    parts = [("file", (f"q{i}.jpg", big, "image/jpeg")) for i in range(3)]
    assert_error(client.post("/similarity-search", files=parts), 413, "too_large")


@pytest.mark.parametrize(
    "params, says",
    [
        ({"level": "twins"}, "level"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"index": "x" * 65}, "index"),
    ],
)
def test_duplicates_paging_is_bounded(client, params, says):
    error = assert_error(client.get("/duplicates", params=params), 422, "invalid_request")
    assert says in error["message"], error


def test_a_duplicates_page_past_the_end_is_empty(client):
    body = client.get("/duplicates", params={"level": "exact", "offset": "9" * 400}).json()
    assert body["groups"] == [] and body["next_offset"] is None
