"""Hostile input: every upload route and the CSV downloader against files and rows
built to hurt. Each gets a 4xx in the one error shape (or a per-row reason), never a
500, never a file outside its folder; awkward but valid images get a normal answer.

Decisions this file pins down:

- A file is an image if its bytes fully decode as JPEG, PNG, GIF, WebP, BMP or TIFF;
  names and content types are ignored. So a JPEG named ``.txt`` is an image, and so
  is a JPEG with a zip appended (decoders stop at the end-of-image marker; the bytes
  are kept as sent). A file that starts like a GIF or JPEG but is HTML is not.
- Dimensions are checked from the header before any pixel is decoded: a bomb costs
  nothing but a 413.
"""

from __future__ import annotations

import functools
import io
import os
import select
import socket
import struct
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import fake_model
import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image
from support import LiveServer, assert_error, image_bytes

from imagefinder.cli import cli
from imagefinder.config import Settings
from imagefinder.images import FORMATS, sniff
from imagefinder.server.app import create_app
from imagefinder.service import Service
from imagefinder.store import open_store

TOKEN = "hostile-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CAP = 1024 * 1024  # the in-process app's upload cap, small so over-cap bodies are cheap


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def photo(size=(160, 120)) -> Image.Image:
    """A small picture with structure (a gradient plus a block), not a flat colour."""
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    arr = np.stack([np.tile(x, (size[1], 1))] * 3, axis=-1)
    arr[size[1] // 4 : size[1] // 2, size[0] // 4 : size[0] // 2] = (200, 20, 40)
    return Image.fromarray(arr, "RGB")


def with_declared_size(data: bytes, fmt: str, width: int, height: int) -> bytes:
    """``data`` with its header claiming another size (the pixels stay tiny)."""
    if fmt == "GIF":  # logical screen descriptor right after the signature
        return data[:6] + struct.pack("<HH", width, height) + data[10:]
    i = 2  # JPEG: walk the segments to the start-of-frame marker
    while True:
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            return data[: i + 5] + struct.pack(">HH", height, width) + data[i + 9 :]
        i += 2 + length


@functools.cache
def png_bomb() -> bytes:
    """20000 x 20000 pixels (400 MP, 1.2 GB as RGB) in about 50 KB."""
    return encode(Image.new("1", (20000, 20000)), "PNG")


def corrupt_png() -> bytes:
    data = bytearray(encode(photo(), "PNG"))
    start = data.index(b"IDAT") + 40
    data[start : start + 32] = bytes(32)
    return bytes(data)


def jpeg_with_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.js", "alert(document.cookie)")
    return encode(photo(), "JPEG") + buf.getvalue()


JPEG = encode(photo(), "JPEG")

# name -> (bytes, filename, status, code)
HOSTILE = {
    "png-bomb": (png_bomb, "bomb.png", 413, "too_many_pixels"),  # built when used: ~1 s
    "jpeg-claiming-65000x65000": (
        with_declared_size(JPEG, "JPEG", 65000, 65000),
        "huge.jpg",
        413,
        "too_many_pixels",
    ),
    "gif-claiming-65535x65535": (
        with_declared_size(encode(photo(), "GIF"), "GIF", 65535, 65535),
        "huge.gif",
        413,
        "too_many_pixels",
    ),
    "zero-bytes": (b"", "empty.jpg", 400, "empty_upload"),
    "truncated-jpeg": (JPEG[: len(JPEG) // 2], "half.jpg", 400, "not_an_image"),
    "truncated-png": (encode(photo(), "PNG")[:300], "half.png", 400, "not_an_image"),
    "corrupt-png": (corrupt_png(), "corrupt.png", 400, "not_an_image"),
    "random-bytes": (os.urandom(5000), "noise.jpg", 400, "not_an_image"),
    "gif-magic-then-html": (
        b"GIF89a<html><script>alert(1)</script></html>",
        "x.gif",
        400,
        "not_an_image",
    ),
    "jpeg-magic-then-js": (
        b"\xff\xd8\xff\xe0<script>fetch('/steal')</script>",
        "x.jpg",
        400,
        "not_an_image",
    ),
    "html-named-jpg": (b"<!doctype html><h1>hi</h1>", "page.jpg", 400, "not_an_image"),
    "svg-named-png": (
        b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><script>alert(1)'
        b"</script></svg>",
        "logo.png",
        400,
        "not_an_image",
    ),
    "text-named-jpg": (b"just some text\n" * 20, "notes.jpg", 400, "not_an_image"),
    "pdf-named-jpg": (b"%PDF-1.4\n1 0 obj<<>>endobj\n%%EOF\n", "doc.jpg", 400, "not_an_image"),
    # Under the body limit's framing slack but over the upload cap: read_upload refuses it.
    "just-over-the-cap": (JPEG + bytes(CAP), "big.jpg", 413, "too_large"),
    # Far over: the body limit refuses it from Content-Length before reading a byte.
    "far-over-the-cap": (JPEG + bytes(8 * CAP), "bigger.jpg", 413, "too_large"),
}


def exif_rotated(img: Image.Image, quality: int = 95) -> bytes:
    """``img`` stored turned a quarter, with EXIF Orientation 6 ("rotate 90 clockwise to
    view"), so a viewer that honours EXIF shows exactly ``img``."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif, quality=quality)


def animated_gif() -> bytes:
    frames = [
        photo(),
        photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        Image.new("RGB", (160, 120)),
    ]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)


def sixteen_bit_png() -> bytes:
    arr = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    return encode(Image.fromarray(arr), "PNG")


# name -> (bytes, filename, format the bytes are)
AWKWARD = {
    "1x1-jpeg": (encode(Image.new("RGB", (1, 1), (9, 99, 199)), "JPEG"), "dot.jpg", "JPEG"),
    "1x1-png": (encode(Image.new("RGBA", (1, 1), (9, 99, 199, 10)), "PNG"), "dot.png", "PNG"),
    "animated-gif": (animated_gif(), "anim.gif", "GIF"),
    "16-bit-png": (sixteen_bit_png(), "deep.png", "PNG"),
    "cmyk-jpeg": (encode(photo().convert("CMYK"), "JPEG"), "print.jpg", "JPEG"),
    "exif-rotated-jpeg": (exif_rotated(photo()), "phone.jpg", "JPEG"),
    "progressive-jpeg": (encode(photo(), "JPEG", progressive=True), "prog.jpg", "JPEG"),
    "greyscale-jpeg": (encode(photo().convert("L"), "JPEG"), "grey.jpg", "JPEG"),
    "transparent-png": (encode(photo().convert("RGBA"), "PNG"), "alpha.png", "PNG"),
    "webp": (encode(photo(), "WEBP"), "pic.webp", "WEBP"),
    "bmp": (encode(photo(), "BMP"), "pic.bmp", "BMP"),
    "tiff": (encode(photo(), "TIFF"), "scan.tif", "TIFF"),
    "jpeg-named-txt": (JPEG, "readme.txt", "JPEG"),
    "jpeg-with-zip-appended": (jpeg_with_zip(), "polyglot.jpg", "JPEG"),
}


def tree(root: Path) -> dict[str, int]:
    return {
        p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def api(tmp_path_factory, model):
    """The app in-process over a small real index (the fake model), writes enabled, a 1 MB
    upload cap."""
    root = tmp_path_factory.mktemp("hostile")
    settings = Settings(
        db=str(root / "index.db"),
        images_dir=str(root / "images"),
        model=fake_model.NAME,
        api_token=TOKEN,
        max_upload_bytes=CAP,
    )
    service = Service(settings)
    service.embedder = model
    client = TestClient(create_app(service=service))
    for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (20, 40, 230)]):
        response = client.post(
            "/images",
            files={"file": ("seed.jpg", image_bytes((120, 90), colour))},
            data={"id": f"seed-{i}"},
            headers=AUTH,
        )
        assert response.status_code == 201, response.text
    yield client, root
    service.close()


def upload(client: TestClient, route: str, name: str, data: bytes, filename: str, ctype=None):
    files = {"file": (filename, data, ctype or "application/octet-stream")}
    if route == "search":
        return client.post("/similarity-search", files=files, data={"k": "2"})
    return client.post("/images", files=files, data={"id": name}, headers=AUTH)


ROUTES = ["search", "add"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_upload_is_a_4xx_in_the_error_shape(api, route, case):
    client, root = api
    data, filename, status, code = HOSTILE[case]
    data = data() if callable(data) else data
    before = tree(root)
    assert_error(upload(client, route, case, data, filename), status, code)
    assert tree(root) == before  # nothing saved, nothing indexed
    assert client.get("/health").json()["vectors"] == 3


@pytest.mark.parametrize("route", ROUTES)
def test_an_upload_without_content_length_is_capped_while_it_streams(api, route):
    """A chunked body declares no size: the limit counts bytes as they arrive."""
    client, root = api
    boundary = "hostile-boundary"

    def body():
        if route == "add":
            yield f'--{boundary}\r\nContent-Disposition: form-data; name="id"\r\n\r\nx\r\n'.encode()
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            'filename="big.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode() + JPEG
        for _ in range(4):
            yield bytes(CAP)

    path = "/similarity-search" if route == "search" else "/images"
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", **AUTH}
    response = client.post(path, content=body(), headers=headers)
    assert_error(response, 413, "too_large")
    assert not (root / "images" / "x.jpg").exists()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", list(AWKWARD))
def test_an_awkward_but_valid_image_gets_a_normal_answer(api, route, case):
    client, root = api
    data, filename, fmt = AWKWARD[case]
    assert sniff(data) == fmt
    response = upload(client, route, case, data, filename, ctype="text/plain")
    if route == "search":
        assert response.status_code == 200, response.text
        assert len(response.json()["results"]) == 2
        return
    assert response.status_code == 201, response.text
    assert response.json()["format"] == fmt
    saved = root / "images" / f"{case}.{FORMATS[fmt].extension}"
    assert saved.read_bytes() == data  # kept byte for byte, named by what it is
    assert client.delete(f"/images/{case}", headers=AUTH).status_code == 200


def test_an_exif_rotated_copy_of_a_catalogue_photo_finds_that_photo_first(
    caltech_index, caltech_dir
):
    service = Service(Settings(db=str(caltech_index)))
    client = TestClient(create_app(service=service))
    original = sorted((caltech_dir / "pagoda").glob("*.jpg"))[3]
    upright = Image.open(original).convert("RGB")
    data = exif_rotated(upright)
    stored = Image.open(io.BytesIO(data))
    assert stored.size == upright.size[::-1]  # the pixels really are turned

    results = client.post("/similarity-search", files={"file": ("r.jpg", data)}).json()["results"]
    assert results[0]["id"] == f"pagoda/{original.stem}"
    # A near-duplicate (~0.01), not a lucky match: the fake model sees the layout of a
    # picture, so ignoring EXIF would give ~0.75 for this photo (and another photo first).
    assert results[0]["distance"] < 0.2, results
    service.close()


# -- a live server: streaming bodies, sizes declared up front ---------------------------


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def read_response(sock: socket.socket, timeout: float = 20.0) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length, read off a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def request_head(path: str, port: int, boundary: str, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n{extra}\r\n"
    ).encode()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """``uvicorn main:app`` with the default 20 MB cap (no index: no model to load)."""
    root = tmp_path_factory.mktemp("live-hostile")
    env = {
        "IMAGEFINDER_DB": str(root / "index.db"),
        "IMAGEFINDER_IMAGES_DIR": str(root / "images"),
        "IMAGEFINDER_API_TOKEN": TOKEN,
    }
    with LiveServer(env) as server:
        yield server, root


@pytest.mark.parametrize("path", ["/similarity-search", "/images"])
def test_a_200_mb_chunked_upload_is_refused_with_413_without_the_server_growing(live, path):
    server, root = live
    pid = server.proc.pid
    # Reset the peak-RSS counter so VmHWM below is the peak during this upload alone.
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = rss_mb(pid)
    boundary = "stream-boundary"
    auth = f"Authorization: Bearer {TOKEN}\r\n" if path == "/images" else ""
    block = os.urandom(1 << 20)
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            request_head(path, server.port, boundary, auth + "Transfer-Encoding: chunked\r\n")
        )
        part = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            'filename="endless.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode() + JPEG
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        # Generated on the fly: 200 chunks of 1 MB, stopping as soon as the server answers.
        while sent < 200 << 20 and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(block)
        status, headers, body = read_response(sock)
    assert status == 413, body
    assert b'"code":"too_large"' in body
    assert sent < 60 << 20, "the server read far past its 20 MB cap"
    peak = rss_mb(pid, "VmHWM")
    assert peak - before < 64, f"server RSS peaked {peak - before:.0f} MB over its {before:.0f} MB"
    assert not (root / "images").exists()  # nothing saved, not even a temporary file


def test_a_declared_1_gb_body_is_refused_before_a_byte_of_it_is_sent(live):
    server, _ = live
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            request_head("/similarity-search", server.port, "b", "Content-Length: 1073741824\r\n")
        )
        status, _, body = read_response(sock, timeout=10)
    assert status == 413, body


def test_the_token_is_checked_before_the_body_is_read(live):
    """An anonymous 10 MB upload is refused at once: the server never waits for it."""
    server, root = live
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request_head("/images", server.port, "b", "Content-Length: 10000000\r\n"))
        status, headers, body = read_response(sock, timeout=10)
    assert status == 401, body
    assert headers["www-authenticate"] == "Bearer"
    assert not (root / "images").exists()


# -- hostile catalogue rows ----------------------------------------------------------------


class RedirectServer:
    """127.0.0.1: ``/img.jpg`` is a JPEG, ``/redirect?to=URL`` answers 302 to URL."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                parts = urlsplit(self.path)
                if parts.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", parse_qs(parts.query)["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif parts.path.endswith(".jpg"):
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(JPEG)))
                    self.end_headers()
                    self.wfile.write(JPEG)
                else:
                    self.send_error(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_hostile_csv_rows_each_get_a_reason_and_nothing_lands_outside_the_folder(tmp_path):
    server = RedirectServer()
    work = tmp_path / "work"
    out = work / "images"
    outside = tmp_path / "outside"  # where an escaping id would land
    outside.mkdir()
    escape = f"../../outside/{'x' * 3}"
    rows = {  # id, url -> words the reason must contain
        "good": (f"{server.base}/img.jpg", None),
        escape: (f"{server.base}/a.jpg", "not safe"),
        str(outside / "abs"): (f"{server.base}/b.jpg", "not safe"),
        "..\\..\\win": (f"{server.base}/c.jpg", "not safe"),
        "sub/dir": (f"{server.base}/d.jpg", "not safe"),
        "nul\x00id": (f"{server.base}/e.jpg", "not safe"),
        "nul-url": (f"{server.base}/\x00.jpg", "control character"),
        "L" * 300: (f"{server.base}/f.jpg", "longer than"),
        "file-url": ("file:///etc/passwd", "scheme 'file'"),
        "ftp-url": ("ftp://127.0.0.1/x.jpg", "scheme 'ftp'"),
        "js-url": ("javascript:alert(1)", "scheme 'javascript'"),
        "to-file": (f"{server.base}/redirect?to=file:///etc/passwd", "redirected to a refused"),
        "to-ftp": (f"{server.base}/redirect?to=ftp://127.0.0.1/x.jpg", "redirected to a refused"),
        "to-js": (f"{server.base}/redirect?to=javascript:alert(1)", "redirected to a refused"),
    }
    lines = ["url,id"] + [f'"{url}","{image_id}"' for image_id, (url, _) in rows.items()]
    lines.append(f"{server.base}/again.jpg,good")  # a duplicate id
    work.mkdir()
    csv_path = work / "hostile.csv"
    csv_path.write_bytes("\n".join(lines).encode() + b"\n")
    before = tree(tmp_path)
    try:
        result = CliRunner().invoke(
            cli,
            [
                "download",
                "--csv_file",
                str(csv_path),
                "--output-dir",
                str(out),
                "--retries",
                "0",
                "--allow-private",
            ],
        )
    finally:
        server.close()
    assert result.exit_code == 0, result.output
    assert "1 downloaded" in result.stdout

    from imagefinder.catalog import read_catalog

    manifest = {r["line"]: r for r in _read_manifest(out / "manifest.csv")}
    csv_rows = read_catalog(csv_path)
    expected = list(rows.values()) + [(None, "duplicate id 'good' (first on line 2)")]
    for row, (_, words) in zip(csv_rows, expected, strict=True):
        outcome = manifest[row.line]
        if words is None:
            assert outcome["status"] == "downloaded", outcome
            continue
        assert outcome["status"] == "failed", outcome
        assert words in outcome["reason"], outcome
        # ...and the same reason, on one stderr line naming the row.
        assert any(
            words in line and (f":{row.line}:" in line or row.id in line)
            for line in result.stderr.splitlines()
        ), (words, result.stderr)

    after = tree(tmp_path)
    new = {path for path in after if path not in before}
    assert new == {"work/images/good.jpg", "work/images/manifest.csv"}
    assert list(outside.iterdir()) == []


def _read_manifest(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return [{**r, "line": int(r["line"])} for r in csv.DictReader(f)]


def test_the_index_is_untouched_by_every_refusal(api):
    """After all the hostile uploads above, the index holds exactly its seed images."""
    client, root = api
    store = open_store(root / "index.db")
    assert sorted(store.file_states()) == ["seed-0", "seed-1", "seed-2"]
