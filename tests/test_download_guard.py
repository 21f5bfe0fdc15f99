"""The downloader against hostile servers and catalogues: addresses it must not reach,
servers that trickle, and text built to fool a terminal or a spreadsheet.

- Loopback, private, link-local (and IPv6 forms embedding them) are refused after DNS
  resolution and on every redirect, unless ``--allow-private``.
- Each file has an overall deadline: a server trickling bytes costs at most that.
- Manifest cells never start a formula and hold no control character; nothing printed
  carries one either.
"""

from __future__ import annotations

import csv
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner
from support import image_bytes

from imagefinder.catalog import Row
from imagefinder.cli import cli
from imagefinder.download import Downloader, DownloadOptions
from imagefinder.netguard import Guard, is_public

JPEG = image_bytes((32, 24))
FAKE_SUCCESS = "\x1b[2J\x1b[H999 downloaded, 0 failed"


class Server:
    """127.0.0.x serving ``/img.jpg``, ``/to?url``, ``/trickle.jpg``, ``/slow-head``,
    and ``/evil`` (a non-image whose Content-Type carries escape sequences)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                server.hits.append(self.path)
                if self.path.startswith("/to?"):
                    self.send_response(302)
                    self.send_header("Location", self.path[4:])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/trickle.jpg":  # one byte every 0.2 s, forever
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(JPEG) * 100))
                    self.end_headers()
                    for byte in (JPEG * 100)[:200]:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.2)
                elif self.path == "/slow-head":  # the status line, then headers a byte a time
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    for byte in b"X-Padding: " + b"a" * 200:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.2)
                elif self.path == "/evil":
                    body = b"<html>not an image</html>"
                    self.send_response(200)
                    self.send_header("Content-Type", FAKE_SUCCESS)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(JPEG)))
                    self.end_headers()
                    self.wfile.write(JPEG)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None
        self.base = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("2a00:1450:4001:80b::200e", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
    ],
)
def test_only_globally_routable_unicast_addresses_are_public(address, public):
    assert is_public(address) is public


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_private_address_is_refused_after_dns_and_never_contacted(server, tmp_path, host):
    url = server.base.replace("127.0.0.1", host) + "/img.jpg"
    outcome = Downloader(tmp_path, DownloadOptions(retries=2)).fetch_row(Row(2, url, "x"))
    assert outcome.status == "failed"
    assert (
        "private, loopback or link-local" in outcome.reason and "--allow-private" in outcome.reason
    )
    assert "after" not in outcome.reason  # refused at once, not retried
    assert server.hits == []
    allowed = DownloadOptions(allow_private=True)
    assert Downloader(tmp_path, allowed).fetch_row(Row(2, url, "x")).status == "downloaded"


class OnlyFirstLoopback(Guard):
    """A policy that trusts 127.0.0.1 alone, to stand for "a public server" offline."""

    def allowed(self, address: str) -> bool:
        return address == "127.0.0.1"


def test_every_redirect_hop_is_checked_after_dns(server, tmp_path):
    inner = Server("127.0.0.2")  # "the private network"
    try:
        downloader = Downloader(tmp_path, DownloadOptions(retries=0))
        downloader.guard = OnlyFirstLoopback()
        for target in (
            inner.base + "/img.jpg",
            inner.base.replace("127.0.0.2", "127.0.0.2.nip"),
        ):
            url = f"{server.base}/to?{target}"
            outcome = downloader.fetch_row(Row(2, url, "x"))
            assert outcome.status == "failed"
        first = downloader.fetch_row(Row(2, f"{server.base}/to?{inner.base}/img.jpg", "y"))
        assert first.reason.startswith(
            f"redirected to {inner.base}/img.jpg: 127.0.0.2 is a private"
        )
        assert inner.hits == []  # never contacted
        direct = downloader.fetch_row(Row(2, f"{server.base}/to?{server.base}/img.jpg", "z"))
        assert direct.status == "downloaded"  # an allowed hop is followed
    finally:
        inner.close()


@pytest.mark.parametrize("path", ["/trickle.jpg", "/slow-head"])
def test_a_trickling_server_costs_at_most_the_deadline(server, tmp_path, path):
    options = DownloadOptions(timeout=5.0, deadline=2.0, retries=3, allow_private=True)
    started = time.monotonic()
    outcome = Downloader(tmp_path, options).fetch_row(Row(2, server.base + path, "x"))
    elapsed = time.monotonic() - started
    assert outcome.status == "failed" and "2 s deadline" in outcome.reason, outcome
    # Each read got a byte well within the 5 s timeout: only the deadline ends it.
    assert elapsed < 2.0 + 1.0, elapsed
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_manifest_cells_never_start_a_formula_and_output_has_no_control_bytes(server, tmp_path):
    rows = [
        ('=HYPERLINK("http://x")', server.base + "/img.jpg"),
        ("@SUM(A1)", server.base + "/img.jpg"),
        ("+1", server.base + "/img.jpg"),
        ("-2", server.base + "/img.jpg"),
        ("\tx", server.base + "/img.jpg"),
        ("evil", server.base + "/evil"),
        ("fine", "=cmd|' /C calc'!A0"),
    ]
    csv_path = tmp_path / "c.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "url"])
        writer.writerows(rows)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        ["download", "--csv_file", str(csv_path), "--output-dir", str(out), "--retries", "0",
         "--allow-private"],
    )  # fmt: skip
    assert "\x1b" not in result.output and "\x1b" not in result.stderr
    assert "\\x1b[2J" in result.stderr  # shown, escaped, not acted on
    text = (out / "manifest.csv").read_text()
    assert "\x1b" not in text
    with open(out / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    for row in manifest:
        for key in ("id", "url", "reason", "path"):
            assert not row[key].startswith(("=", "+", "-", "@", "\t", "\r")), (key, row)
    by_line = {int(r["line"]): r for r in manifest}
    assert by_line[2]["id"] == '\'=HYPERLINK("http://x")'
    assert by_line[8]["url"] == "'=cmd|' /C calc'!A0"


def test_every_failing_row_is_reported_once_however_many(tmp_path):
    """20,000 rows that fail at once (private addresses): each named once on stderr. The
    time for 100,000 is measured by bench/hostile.py --downloader."""
    n = 20_000
    csv_path = tmp_path / "c.csv"
    csv_path.write_text(
        "url,id\n" + "".join(f"http://127.0.0.1:9/{i}.jpg,r{i}\n" for i in range(n))
    )
    result = CliRunner().invoke(
        cli, ["download", "--csv_file", str(csv_path), "--output-dir", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    lines = [
        line for line in result.stderr.splitlines() if line.startswith(f"skipping {csv_path}:")
    ]
    assert len(lines) == n == len({line.split()[1] for line in lines})
