"""Text search and several indexes behind one server, through the HTTP API.

The catalogue: flat-ish pictures in six colours. Two indexes over it: one with the
image-only fake model, one with ``fake-clip``, whose text tower reads colour names (see
fake_model.py), so "red" must find the red pictures and nothing else may answer text.
"""

from __future__ import annotations

import time

import fake_model
import pytest
import requests
from click.testing import CliRunner
from fastapi.testclient import TestClient
from support import LiveServer, assert_error, image_bytes

from imagefinder.cli import cli
from imagefinder.config import Settings
from imagefinder.errors import ConfigError
from imagefinder.indexer import index_folder
from imagefinder.model.embedder import load_embedder
from imagefinder.server.app import create_app
from imagefinder.server.health import TTL as HEALTH_TTL
from imagefinder.store import open_store

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 40, 210),
    "yellow": (230, 210, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
# Everything here is about the API, not the store: SQLite alone.
pytestmark = pytest.mark.sqlite_only


@pytest.fixture(scope="module")
def clip_model():
    return load_embedder(fake_model.TEXT_NAME)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, model, clip_model):
    """Three shades of each colour, indexed twice: ``colour.db`` (image-only fake model)
    and ``text.db`` (fake-clip). Returns (folder, colour db, text db)."""
    root = tmp_path_factory.mktemp("colours")
    folder = root / "images"
    for name, rgb in COLOURS.items():
        (folder / name).mkdir(parents=True)
        for shade in range(3):
            colour = tuple(min(255, c + 8 * shade) for c in rgb)
            (folder / name / f"{name}{shade}.png").write_bytes(image_bytes((48, 40), colour, "PNG"))
    dbs = []
    for embedder, db in ((model, root / "colour.db"), (clip_model, root / "text.db")):
        store = open_store(str(db))
        assert index_folder(folder, store, embedder).indexed == 18
        store.close()
        dbs.append(str(db))
    return folder, *dbs


def client_for(db: str, catalogue, **settings) -> TestClient:
    folder = catalogue[0]
    return TestClient(create_app(Settings(db=db, images_dir=str(folder), **settings)))


@pytest.fixture(scope="module")
def both(catalogue):
    """One server, two indexes: ``colour`` (the default, first) and ``text``."""
    _, colour, text = catalogue
    with client_for(f"colour={colour},text={text}", catalogue) as client:
        yield client


def text_search(client, q, **form):
    return client.post("/text-search", data={"q": q, **form})


# -- text search ---------------------------------------------------------------------


@pytest.mark.parametrize("colour", ["red", "blue", "yellow"])
def test_a_text_finds_the_pictures_it_describes(both, colour):
    response = text_search(both, f"something {colour}", index="text", k="3")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == fake_model.TEXT_NAME and body["metric"] == "l2"
    ids = [r["id"] for r in body["results"]]
    assert len(ids) == 3 and all(i.startswith(f"{colour}/") for i in ids), ids


@pytest.mark.parametrize("k", ["1", "5", "18", "100"])
def test_the_text_route_returns_k_results_in_the_search_shape(both, k):
    body = text_search(both, "green", index="text", k=k).json()
    assert len(body["results"]) == min(int(k), 18)
    assert all(set(r) == {"id", "distance", "match", "metadata"} for r in body["results"])


def test_text_and_image_vectors_share_one_space(clip_model):
    text = clip_model.embed_texts(["red", "a blue thing"])
    image = clip_model.embed_batch([image_bytes_as_image((220, 30, 30))])
    assert text.shape == (2, fake_model.TEXT_DIM) == (2, image.shape[1])
    assert (text @ image[0]).argmax() == 0  # "red" is the nearer text to a red picture


def image_bytes_as_image(rgb):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(image_bytes((48, 40), rgb, "PNG"))).convert("RGB")


def test_an_image_only_index_answers_text_not_supported(both):
    error = assert_error(text_search(both, "red"), 422, "text_not_supported")
    assert "fake-colour" in error["message"] and "clip-vit-b-32" in error["message"]


@pytest.mark.parametrize(
    "form",
    [{"q": ""}, {"q": "x" * 1001}, {}, {"q": "red", "k": "0"}, {"q": "red", "k": "101"}],
)
def test_a_bad_text_query_is_422(both, form):
    response = both.post("/text-search", data={"index": "text", **form})
    assert_error(response, 422, "invalid_request")


def test_a_blank_text_is_refused_with_the_fix(both):
    error = assert_error(text_search(both, "   ", index="text"), 422, "invalid_request")
    assert "empty" in error["message"]


def test_cli_searches_by_text(catalogue):
    _, _, text = catalogue
    result = CliRunner().invoke(cli, ["search", "--text", "black", "--db", text, "-k", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2 and all(line.split()[1].startswith("black/") for line in lines)


def test_cli_text_search_on_an_image_index_is_one_line(catalogue):
    _, colour, _ = catalogue
    result = CliRunner().invoke(cli, ["search", "--text", "black", "--db", colour])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: the index 'default' holds fake-colour vectors")
    assert result.stderr.count("\n") == 1


def test_cli_search_needs_an_image_or_a_text(catalogue):
    result = CliRunner().invoke(cli, ["search", "--db", catalogue[1]])
    assert result.exit_code == 2 and "either an IMAGE or --text" in result.output


# -- several indexes -----------------------------------------------------------------


def test_index_selects_each_index_and_the_first_is_the_default(both, catalogue):
    query = (catalogue[0] / "blue" / "blue1.png").read_bytes()
    models = {}
    for index in (None, "colour", "text"):
        form = {"index": index} if index else {}
        response = both.post(
            "/similarity-search", files={"file": ("q.png", query, "image/png")}, data=form
        )
        assert response.status_code == 200, response.text
        body = response.json()
        first = body["results"][0]
        assert (first["id"], first["match"]) == ("blue/blue1", "exact")
        assert first["distance"] == pytest.approx(0, abs=1e-4)
        models[index] = body["model"]
    assert models == {
        None: fake_model.NAME,
        "colour": fake_model.NAME,
        "text": fake_model.TEXT_NAME,
    }


def test_similar_and_images_take_the_index_too(both):
    for index, model in (("colour", fake_model.NAME), ("text", fake_model.TEXT_NAME)):
        response = both.get("/images/red/red0/similar", params={"k": 2, "index": index})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == model
        assert [r["id"].split("/")[0] for r in response.json()["results"]] == ["red", "red"]
        thumb = both.get("/images/red/red0/thumbnail", params={"index": index})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize(
    "request_",
    [
        ("post", "/similarity-search"),
        ("post", "/text-search"),
        ("get", "/images/red/red0/similar"),
        ("get", "/images/red/red0"),
        ("get", "/images/red/red0/thumbnail"),
    ],
)
def test_an_unknown_index_is_404_naming_the_choices(both, request_):
    method, path = request_
    kwargs: dict = {"params": {"index": "nope"}}
    if method == "post":
        kwargs = {
            "data": {"index": "nope", "q": "red"},
            "files": {"file": ("q.png", image_bytes(fmt="PNG"), "image/png")}
            if path == "/similarity-search"
            else None,
        }
    error = assert_error(getattr(both, method)(path, **kwargs), 404, "unknown_index")
    assert "'nope'" in error["message"] and "colour, text" in error["message"]


def test_health_lists_every_index_and_keeps_the_default_at_the_top(both):
    health = both.get("/health").json()
    assert (health["status"], health["model"], health["vectors"]) == ("ok", fake_model.NAME, 18)
    listed = {i["name"]: i for i in health["indexes"]}
    assert list(listed) == ["colour", "text"]
    assert (listed["text"]["model"], listed["text"]["vectors"]) == (fake_model.TEXT_NAME, 18)
    assert (listed["colour"]["text"], listed["text"]["text"]) == (False, True)
    assert listed["text"]["dim"] == fake_model.TEXT_DIM


def test_one_index_is_named_default_in_health(catalogue):
    with client_for(catalogue[2], catalogue) as client:
        health = client.get("/health").json()
    assert [i["name"] for i in health["indexes"]] == ["default"]
    assert health["text"] is True


def test_the_page_offers_the_index_choice_and_the_text_box(both):
    page = both.get("/").text
    assert 'id="index"' in page and 'id="text-form"' in page


@pytest.mark.parametrize(
    ("db", "problem"),
    [
        ("a=x.db,b", "'b' is not name=location"),
        ("a=x.db,a=y.db", "names the index 'a' twice"),
        ("a=x.db,b c=y.db", "'b c=y.db' is not name=location"),
        ("a=x.db,b=", "'b=' is not name=location"),
    ],
)
def test_a_malformed_index_list_is_a_config_error(db, problem):
    with pytest.raises(ConfigError, match=problem):
        Settings(db=db)


@pytest.mark.parametrize(
    ("db", "expected"),
    [
        ("data/x.db", (("default", "data/x.db"),)),
        ("dir/a=b.db", (("default", "dir/a=b.db"),)),
        (
            "postgresql://u:p@h/db?sslmode=require",
            (("default", "postgresql://u:p@h/db?sslmode=require"),),
        ),
        (
            "img=r50.db, text=postgresql://h/db?sslmode=require",
            (("img", "r50.db"), ("text", "postgresql://h/db?sslmode=require")),
        ),
    ],
)
def test_index_lists_parse(db, expected):
    assert Settings(db=db).indexes == expected


def test_a_write_goes_to_every_index_each_with_its_own_model(tmp_path, model, clip_model):
    folder = tmp_path / "images"
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    for embedder, db in ((model, a), (clip_model, b)):
        store = open_store(str(db))
        store.ensure_schema(embedder.meta())
        store.close()
    settings = Settings(db=f"a={a},b={b}", images_dir=str(folder), api_token="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    with TestClient(create_app(settings)) as client:
        data = image_bytes((40, 40), COLOURS["green"], "PNG")
        added = client.post(
            "/images", files={"file": ("g.png", data, "image/png")}, data={"id": "g1"}, headers=auth
        )
        assert added.status_code == 201, added.text
        for index, model_name in (("a", fake_model.NAME), ("b", fake_model.TEXT_NAME)):
            body = client.get("/images/g1/similar", params={"index": index}).json()
            assert body["model"] == model_name and body["results"] == []
            assert client.get("/health").json()["indexes"][0]["vectors"] == 1
        found = text_search(client, "green", index="b").json()["results"]
        assert [r["id"] for r in found] == ["g1"]
        deleted = client.delete("/images/g1", headers=auth)
        assert deleted.status_code == 200, deleted.text
        time.sleep(HEALTH_TTL)  # /health answers from a short cache (a flood cannot queue it)
        assert [i["vectors"] for i in client.get("/health").json()["indexes"]] == [0, 0]


def test_a_live_server_serves_two_indexes(catalogue):
    folder, colour, text = catalogue
    env = {"IMAGEFINDER_DB": f"colour={colour},text={text}", "IMAGEFINDER_IMAGES_DIR": str(folder)}
    with LiveServer(env, fake_model=True) as server:
        health = requests.get(server.url + "/health", timeout=10).json()
        assert [i["name"] for i in health["indexes"]] == ["colour", "text"]
        found = requests.post(
            server.url + "/text-search", data={"q": "white", "index": "text", "k": 3}, timeout=10
        ).json()
        assert [r["id"].split("/")[0] for r in found["results"]] == ["white"] * 3
        refused = requests.post(server.url + "/text-search", data={"q": "white"}, timeout=10)
        assert_error(refused, 422, "text_not_supported")
