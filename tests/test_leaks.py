"""Nothing secret or local leaks to an anonymous client, and every answer carries the
headers that stop a browser from sniffing, framing or leaking referrers.

- Database URLs: every credential is masked wherever a URL is shown (``user:pass``,
  ``?password=``, ``sslpassword``, ``passfile``, ``sslkey``...); public answers show
  only ``postgresql://host:port/database``.
- Public routes (``/health``, errors, the page) show no absolute filesystem path:
  ``/health`` names a SQLite index by its file name, messages use ``.../name``.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from support import image_bytes

from imagefinder.config import Settings
from imagefinder.indexer import index_folder
from imagefinder.redact import public_path, redact
from imagefinder.server.app import create_app
from imagefinder.service import Service
from imagefinder.store import display_location, open_store, public_location

SECRETS = ("hunter2", "pw-two", "/secret/", "keyfile", "alice")

URL = (
    "postgresql://alice:hunter2@127.0.0.1:1/images"
    "?sslpassword=pw-two&passfile=/secret/pgpass&sslkey=/secret/keyfile&sslmode=require"
)


def test_every_credential_in_a_database_url_is_masked_for_display():
    shown = display_location(URL)
    for secret in ("hunter2", "pw-two", "/secret/pgpass", "/secret/keyfile"):
        assert secret not in shown
    # What helps the operator stays: user, host, port, database, non-secret options.
    assert shown.startswith("postgresql://alice:***@127.0.0.1:1/images?")
    assert "sslmode=require" in shown
    assert display_location("postgresql://u@h/db?password=x") == "postgresql://u@h/db?password=***"
    assert "s3" not in display_location("postgres://h/db?Password=s3&application_name=a")


def test_public_forms_show_no_user_no_parameters_and_no_folders():
    assert public_location(URL) == "postgresql://127.0.0.1:1/images"
    assert public_location("postgresql://postgres:@/db?host=/home/me/pg") == "postgresql:///db"
    assert public_location("/srv/data/index.db") == "index.db"
    assert public_path("/srv/photos") == ".../photos"
    assert public_path("data/images") == "data/images"  # relative: as configured
    assert public_path("../elsewhere/images") == ".../images"


def test_redact_strips_absolute_paths_and_credentials_but_keeps_urls_and_words():
    message = (
        "cannot open /var/lib/finder/index.db: see https://example.com/docs/x and "
        f"{URL} or password=letmein; C:\\Users\\bob\\w.pth"
    )
    out = redact(message)
    assert "/var/lib" not in out and ".../index.db" in out
    assert "https://example.com/docs/x" in out
    assert "letmein" not in out and "hunter2" not in out and "bob" not in out
    assert "postgresql://127.0.0.1:1/images" in out


@pytest.fixture
def secret_server(tmp_path) -> TestClient:
    """A server whose database URL is full of secrets and whose database is down."""
    service = Service(Settings(db=URL, images_dir=str(tmp_path / "secret" / "images")))
    client = TestClient(create_app(service=service))
    yield client
    service.close()


def test_an_unreachable_database_leaks_nothing_on_public_routes(secret_server, tmp_path):
    answers = [
        secret_server.get("/health"),
        secret_server.post("/similarity-search", files={"file": ("q.jpg", image_bytes())}),
        secret_server.get("/images/x"),
        secret_server.get("/images/x/similar"),
        secret_server.get("/"),
    ]
    health = answers[0].json()
    assert health["status"] == "error" and health["index"] == "postgresql://127.0.0.1:1/images"
    assert answers[1].status_code == 503
    for response in answers:
        for secret in (*SECRETS, str(tmp_path)):
            assert secret not in response.text, (response.request.url, secret, response.text)


@pytest.fixture
def indexed(tmp_path, model):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "red.png").write_bytes(image_bytes((40, 30), (220, 20, 20), fmt="PNG"))
    # A file named .jpg that is really a GIF: served as what it is.
    (folder / "fake.jpg").write_bytes(image_bytes((40, 30), (20, 20, 220), fmt="GIF"))
    store = open_store(tmp_path / "index.db")
    index_folder(folder, store, model)
    store.close()
    service = Service(Settings(db=str(tmp_path / "index.db"), images_dir=str(folder)))
    service.embedder = model
    yield TestClient(create_app(service=service)), tmp_path
    service.close()


@pytest.mark.sqlite_only
def test_every_answer_carries_the_security_headers(indexed):
    client, tmp_path = indexed
    answers = {
        "page": client.get("/"),
        "health": client.get("/health"),
        "image": client.get("/images/red"),
        "thumbnail": client.get("/images/red/thumbnail"),
        "search": client.post("/similarity-search", files={"file": ("q.jpg", image_bytes())}),
        "404": client.get("/images/nope"),
        "422": client.get("/images/red/similar?k=0"),
        "docs": client.get("/docs"),
        "static": client.get("/static/app.js"),
    }
    for name, response in answers.items():
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff", name
        assert headers["referrer-policy"] == "no-referrer", name
        assert "frame-ancestors 'none'" in headers["content-security-policy"], name
        assert str(tmp_path) not in response.text, name
    page_policy = answers["page"].headers["content-security-policy"]
    assert "script-src 'self'" in page_policy and "unsafe-inline" not in page_policy
    assert answers["health"].json()["index"] == "index.db"
    assert "default-src 'none'" in answers["image"].headers["content-security-policy"]


@pytest.mark.sqlite_only
def test_catalogue_images_are_served_as_what_their_bytes_are(indexed):
    client, _ = indexed
    png, gif = client.get("/images/red"), client.get("/images/fake")
    assert png.headers["content-type"] == "image/png"
    assert gif.headers["content-type"] == "image/gif"  # named .jpg, sniffed as GIF
    assert gif.headers["x-content-type-options"] == "nosniff"
