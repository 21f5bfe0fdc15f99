"""Metadata: the catalogue CSV's columns beyond url,id travel through download and
extract into the index, come back in results, and filter searches; POST /images takes
them as form fields; extract over a folder leaves them alone; copy carries them.

The fake model embeds (the model is not the point); stores, servers and files are real.
"""

from __future__ import annotations

import csv
import json

import fake_model
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from image_server import ImageServer
from support import assert_error, image_bytes

from imagefinder.catalog import parse_catalog
from imagefinder.cli import cli
from imagefinder.config import Settings
from imagefinder.errors import CatalogError, InvalidRequest
from imagefinder.indexer import index_folder
from imagefinder.metadata import parse_filter, read_sidecar
from imagefinder.server.app import create_app
from imagefinder.service import Service
from imagefinder.store import open_store
from imagefinder.store.transfer import copy_index

TOKEN = "metadata-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 210), "green": (30, 170, 40)}


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_csv_columns_beyond_url_and_id_are_metadata():
    rows = parse_catalog(
        b"url,id,Category, brand ,price,\n"
        b"http://a.test/1.jpg,one,shoes,Acme,9.90,\n"
        b"http://a.test/2.jpg,two,hats,,12,\n"
    )
    assert [(r.id, r.metadata, r.problem) for r in rows] == [
        ("one", {"Category": "shoes", "brand": "Acme", "price": "9.90"}, None),
        ("two", {"Category": "hats", "price": "12"}, None),  # an empty cell is no value
    ]


@pytest.mark.parametrize(
    "header, message",
    [
        (b"url,id,colour,colour\n", "column 'colour' appears twice"),
        (b"url,id,a=b\n", "contains '=' or a control character"),
        (b"url,id," + b"x" * 65 + b"\n", "longer than 64 characters"),
    ],
)
def test_a_bad_metadata_column_is_one_error_naming_line_1(header, message):
    with pytest.raises(CatalogError, match=message) as e:
        parse_catalog(header + b"http://a.test/1.jpg,one,x,y\n", name="cat.csv")
    assert str(e.value).startswith("cat.csv:1: ")


def test_a_row_with_an_oversized_value_is_skipped_with_its_reason():
    rows = parse_catalog(b"url,id,note\nhttp://a.test/1.jpg,one," + b"x" * 1001 + b"\n")
    assert rows[0].problem == "the value of 'note' is longer than 1000 characters"


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["category"], "is not column=value"),
        (["=shoes"], "is not column=value"),
        (["category="], "is not column=value"),
        (["a=1", "a=2"], "names 'a' twice"),
        ([f"c{i}=v" for i in range(9)], "at most 8"),
        (["id=3"], "the catalogue's own column"),
    ],
)
def test_bad_filters_are_refused_with_the_fix(pairs, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_filter(pairs)


def test_a_filter_is_split_at_its_first_equals_sign():
    assert parse_filter([" size = 10=ten ", "brand=Acme", "brand=Acme"]) == (
        ("brand", "Acme"),
        ("size", "10=ten"),
    )


# -- from the CSV to the index, through the real commands ------------------------------


@pytest.fixture(scope="module")
def image_server():
    with ImageServer() as s:
        yield s


def write_catalogue(path, server, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "id", "category", "brand"])
        for image_id, category, brand in rows:
            writer.writerow([server.url(f"/img/{image_id}.jpg"), image_id, category, brand])


def test_download_and_extract_carry_metadata_to_the_index(image_server, tmp_path, model):
    csv_path, images, db = tmp_path / "cat.csv", tmp_path / "images", tmp_path / "index.db"
    write_catalogue(csv_path, image_server, [("a", "shoes", "Acme"), ("b", "hats", "")])
    # The image server is on 127.0.0.1, which the downloader refuses unless told.
    download = ["download", "--csv_file", str(csv_path), "--output-dir", str(images)]
    download.append("--allow-private")
    downloaded = run(*download)
    assert downloaded.exit_code == 0, downloaded.output
    _, sidecar, refused = read_sidecar(images / "metadata.csv")
    assert sidecar == {"a": {"category": "shoes", "brand": "Acme"}, "b": {"category": "hats"}}
    assert refused == []

    args = ["extract", "--folder", str(images), "--db", str(db), "--model", fake_model.NAME]
    extracted = run(*args)
    assert extracted.exit_code == 0, extracted.output
    assert f"metadata: 2 images updated from {images / 'metadata.csv'}" in extracted.stderr
    store = open_store(str(db))
    assert store.metadata_of(["a", "b"]) == sidecar

    # Set otherwise (as POST /images would): a later extract leaves it alone...
    store.set_metadata([("a", {"category": "boots"})])
    again = run(*args)
    assert again.exit_code == 0 and "metadata:" not in again.stderr
    assert store.metadata_of(["a"]) == {"a": {"category": "boots"}}
    # ...until the CSV changes: it is the source of the images it lists.
    write_catalogue(csv_path, image_server, [("a", "sandals", "Acme"), ("b", "hats", "Hatco")])
    assert run(*download).exit_code == 0
    changed = run(*args)
    assert "metadata: 2 images updated" in changed.stderr
    assert store.metadata_of(["a", "b"]) == {
        "a": {"category": "sandals", "brand": "Acme"},
        "b": {"category": "hats", "brand": "Hatco"},
    }
    store.close()

    found = run(
        "search", str(images / "a.jpg"), "--db", str(db), "--filter", "brand=Hatco", "--json"
    )
    assert found.exit_code == 0, found.output
    body = json.loads(found.stdout)
    assert [(r["id"], r["metadata"]) for r in body["results"]] == [
        ("b", {"category": "hats", "brand": "Hatco"})
    ]
    text = run("search", str(images / "a.jpg"), "--db", str(db), "--filter", "category=hats")
    # The server gave every image the same bytes: b is an exact copy of a.
    assert text.stdout.split("  ")[1:] == ["b", "[exact]", "brand=Hatco category=hats\n"]


def test_extract_reads_a_metadata_file_given_by_option_and_reports_bad_rows(tmp_path, model):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, rgb in COLOURS.items():
        (folder / f"{name}.png").write_bytes(image_bytes((40, 30), rgb, "PNG"))
    meta = tmp_path / "products.csv"
    meta.write_text(f"id,colour,note\nred,warm,\nblue,cold,{'x' * 1001}\nnobody,none,\n")
    db = tmp_path / "index.db"
    args = ["extract", "--folder", str(folder), "--db", str(db), "--model", fake_model.NAME]
    result = run(*args, "--metadata", str(meta))
    assert result.exit_code == 0, result.output
    assert f"skipping {meta}:3: the value of 'note' is longer than 1000 characters" in result.stderr
    assert "metadata: 1 images updated" in result.stderr  # unknown ids are not images
    store = open_store(str(db))
    assert store.metadata_of(["red", "blue", "green"]) == {"red": {"colour": "warm"}}
    store.close()


# -- the API -------------------------------------------------------------------------


@pytest.fixture
def client(tmp_path, db_location, model):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, rgb in COLOURS.items():
        for shade in range(4):
            colour = tuple(c + 6 * shade for c in rgb)
            (folder / f"{name}{shade}.png").write_bytes(image_bytes((48, 36), colour, "PNG"))
    store = open_store(db_location)
    index_folder(folder, store, model)
    store.set_metadata(
        (f"{name}{shade}", {"shade": str(shade), "warm": "yes" if name == "red" else "no"})
        for name in COLOURS
        for shade in range(4)
    )
    store.close()
    settings = Settings(db=db_location, images_dir=str(folder), api_token=TOKEN)
    service = Service(settings)
    service.embedder = model
    with TestClient(create_app(service=service)) as c:
        yield c
    service.close()


def search(client, data: bytes, **form):
    return client.post(
        "/similarity-search", files={"file": ("q.png", data, "image/png")}, data=form
    )


def test_results_carry_metadata_and_filters_keep_k_results(client):
    blue = image_bytes((48, 36), COLOURS["blue"], "PNG")
    plain = search(client, blue, k="3").json()["results"]
    assert all(r["id"].startswith("blue") for r in plain)
    assert all(r["metadata"]["warm"] == "no" for r in plain)
    warm = search(client, blue, k="3", filter="warm=yes")
    assert warm.status_code == 200, warm.text
    assert [r["id"][:3] for r in warm.json()["results"]] == ["red"] * 3
    both = search(client, blue, k="5", filter=["warm=yes", "shade=2"]).json()["results"]
    assert [(r["id"], r["metadata"]) for r in both] == [("red2", {"shade": "2", "warm": "yes"})]
    similar = client.get("/images/green1/similar", params={"k": 2, "filter": "shade=3"})
    assert similar.status_code == 200, similar.text
    found = similar.json()["results"]
    assert [r["id"] for r in found][0] == "green3" and len(found) == 2
    assert all(r["metadata"]["shade"] == "3" for r in found)
    assert_error(search(client, blue, filter="nonsense"), 422, "invalid_request")


def test_post_images_takes_metadata_fields(client):
    data = image_bytes((48, 36), (250, 250, 20), "PNG")

    def post(image_id, **fields):
        return client.post(
            "/images",
            headers=AUTH,
            files={"file": ("y.png", data, "image/png")},
            data={"id": image_id, **fields},
        )

    assert post("yellow", category="fruit", brand="Sunny").status_code == 201
    first = search(client, data, k="1").json()["results"][0]
    assert first["id"] == "yellow"
    assert first["metadata"] == {"category": "fruit", "brand": "Sunny"}
    assert post("yellow").status_code == 201  # replaced, no fields: metadata kept
    assert search(client, data, k="1").json()["results"][0]["metadata"] == first["metadata"]
    assert post("yellow", category="lemon").status_code == 201  # fields replace it all
    assert search(client, data, k="1").json()["results"][0]["metadata"] == {"category": "lemon"}
    refused = post("banana", url="http://x")
    assert_error(refused, 422, "invalid_request")
    assert "catalogue's own column" in refused.json()["error"]["message"]
    assert search(client, data, k="2", filter="category=lemon").json()["results"][0]["id"] == (
        "yellow"
    )


def test_copy_carries_metadata(tmp_path, db_location, model):
    folder = tmp_path / "few"
    folder.mkdir()
    for name, rgb in COLOURS.items():
        (folder / f"{name}.png").write_bytes(image_bytes((40, 30), rgb, "PNG"))
    source = open_store(str(tmp_path / "source.db"))
    index_folder(folder, source, model)
    source.set_metadata([("red", {"hot": "yes"}), ("blue", {"hot": "no"})])
    target = open_store(db_location)
    copy_index(source, target)
    assert target.metadata_of(["red", "blue", "green"]) == {
        "red": {"hot": "yes"},
        "blue": {"hot": "no"},
    }
    assert [i for i, _ in target.knn(source.vector_of("blue"), 3, where=(("hot", "yes"),))] == [
        "red"
    ]
    source.close()
    target.close()


def test_sharded_runs_each_apply_their_own_share(tmp_path, model):
    from imagefinder.indexer import apply_metadata, in_shard

    folder = tmp_path / "photos"
    folder.mkdir()
    names = [f"img{i}" for i in range(12)]
    for i, name in enumerate(names):
        (folder / f"{name}.png").write_bytes(image_bytes((32, 24), (20 * i, 90, 200), "PNG"))
    store = open_store(str(tmp_path / "index.db"))
    index_folder(folder, store, model)
    sidecar = tmp_path / "metadata.csv"
    sidecar.write_text("id,n\n" + "".join(f"{name},{i}\n" for i, name in enumerate(names)))
    written = [apply_metadata(store, sidecar, shard=(i, 2))[0] for i in range(2)]
    # The second shard does not take the first's record of the file as its own.
    assert written == [sum(in_shard(n, (i, 2)) for n in names) for i in range(2)]
    assert sum(written) == 12
    assert store.metadata_of(names) == {name: {"n": str(i)} for i, name in enumerate(names)}
    assert [apply_metadata(store, sidecar, shard=(i, 2))[0] for i in range(2)] == [0, 0]
    store.close()


@pytest.mark.sqlite_only
def test_openapi_documents_every_search_option(client):
    schema = client.get("/openapi.json").json()
    options = {"k", "offset", "max_distance", "filter", "index", "expand"}

    def resolve(node: dict) -> dict:
        """A schema's properties, its ``$ref`` and ``allOf`` parts included."""
        if "$ref" in node:
            node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
        found = dict(node.get("properties", {}))
        for part in node.get("allOf", []):
            found.update(resolve(part))
        return found

    def form_fields(path: str) -> dict:
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        (body,) = content.values()  # multipart, or urlencoded for a form without a file
        return resolve(body["schema"])

    for path in ("/similarity-search", "/text-search"):
        fields = form_fields(path)
        assert options <= set(fields), path
        assert all(fields[name].get("description") for name in options), path
    assert form_fields("/similarity-search")["file"]["type"] == "array"  # several files
    query = {
        p["name"]: p for p in schema["paths"]["/images/{image_id}/similar"]["get"]["parameters"]
    }
    assert options <= set(query) and all(query[name].get("description") for name in options)
    duplicates = {p["name"] for p in schema["paths"]["/duplicates"]["get"]["parameters"]}
    assert duplicates == {"level", "index", "offset", "limit"}
    assert "metadata" in schema["paths"]["/images"]["post"]["description"]
    result = schema["components"]["schemas"]["Neighbour"]["properties"]
    assert {"match", "metadata"} <= set(result) and result["match"]["description"]


def test_search_options_travel_to_a_running_server(tmp_path, model):
    from support import LiveServer

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, rgb in COLOURS.items():
        for shade in range(3):
            colour = tuple(c + 9 * shade for c in rgb)
            (folder / f"{name}{shade}.png").write_bytes(image_bytes((40, 30), colour, "PNG"))
    db = tmp_path / "index.db"
    store = open_store(str(db))
    index_folder(folder, store, model)
    store.set_metadata((p.stem, {"tone": p.stem[-1]}) for p in folder.glob("*.png"))
    store.close()
    args = [str(folder / "red0.png"), str(folder / "blue0.png"), "-k", "2", "--offset", "1"]
    args += ["--filter", "tone=1", "--max-distance", "2", "--json"]
    local = run("search", *args, "--db", str(db))
    assert local.exit_code == 0, local.output
    with LiveServer({"IMAGEFINDER_DB": str(db)}, fake_model=True) as server:
        remote = run("search", *args, "--server", server.url)
    assert remote.exit_code == 0, remote.output
    body = json.loads(local.stdout)
    assert json.loads(remote.stdout) == body
    # 3 images match: a page of 2 at offset 1 is the last.
    assert len(body["results"]) == 2 and body["next_offset"] is None
    assert all(r["metadata"] == {"tone": "1"} for r in body["results"])


def test_pages_cover_the_catalogue_once_and_the_last_says_so(client):
    query = image_bytes((48, 36), COLOURS["green"], "PNG")
    seen, offset, offsets = [], 0, []
    while offset is not None:
        body = search(client, query, k="5", offset=str(offset)).json()
        seen += [r["id"] for r in body["results"]]
        offsets.append(offset)
        offset = body["next_offset"]
    assert offsets == [0, 5, 10] and len(seen) == 12 == len(set(seen))
    whole = [r["id"] for r in search(client, query, k="12").json()["results"]]
    assert seen == whole
    near = search(client, query, k="12", max_distance="0.3").json()
    assert all(r["distance"] <= 0.3 for r in near["results"]) and len(near["results"]) < 12
    assert near["next_offset"] is None
    assert_error(search(client, query, k="100", offset="901"), 422, "invalid_request")
