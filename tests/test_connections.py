"""Connections an attacker opens and never finishes: idle sockets, request heads or
bodies sent a byte at a time, more sockets than the server has file descriptors.

``imagefinder serve`` closes a connection whose request head is not in within
``--timeout-headers`` seconds, keeps its open connections under a cap below the
open-file limit (closing the longest-idle one to admit a new one), and both it and
``uvicorn main:app`` cut off an upload body that arrives too slowly (408). Through all
of it /health answers. (uvicorn alone cannot time out idle sockets or slow heads: the
README gives the reverse-proxy settings for deployments that run it directly.)
"""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from pathlib import Path

import fake_model
import pytest
import requests
from support import LiveServer, image_bytes

from imagefinder.indexer import index_folder
from imagefinder.store import open_store


@pytest.fixture(scope="module")
def index(tmp_path_factory, model) -> Path:
    root = tmp_path_factory.mktemp("connections")
    folder = root / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.jpg").write_bytes(image_bytes((40, 30), (80 * i, 60, 200)))
    store = open_store(root / "index.db")
    index_folder(folder, store, model)
    store.close()
    return root / "index.db"


def serve(index: Path, tmp_path: Path, *options: str, **kwargs) -> LiveServer:
    command = ["-m", "imagefinder", "serve", "--db", str(index), *options]
    env = {"IMAGEFINDER_BODY_TIMEOUT": "2"}
    return LiveServer(env, fake_model=True, command=command, log=tmp_path / "log", **kwargs)


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds (reading any answer)."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def health_ok(url: str, tries: int = 20) -> bool:
    return all(requests.get(url + "/health", timeout=5).status_code == 200 for _ in range(tries))


@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_thousand_idle_sockets_neither_stop_health_nor_stay_open(index, tmp_path, many_files):
    with serve(index, tmp_path, "--timeout-headers", "2") as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(1000)]
        try:
            assert health_ok(server.url)
            time.sleep(2.5)
            still_open = [s for s in idle if not closed_by_server(s, 0.05)]
            assert len(still_open) == 0, f"{len(still_open)} idle sockets still open"
        finally:
            for s in idle:
                s.close()


def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(index, tmp_path):
    with serve(index, tmp_path, "--timeout-headers", "2") as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(OSError):
            for byte in b"X-Slow: " + b"a" * 100:
                sock.sendall(bytes([byte]))
                time.sleep(0.25)
                if time.monotonic() - started > 8:
                    break
        assert closed_by_server(sock, 1.0)
        assert time.monotonic() - started < 5
        sock.close()
        assert health_ok(server.url, 3)


@pytest.mark.parametrize("how", ["serve", "uvicorn"])
def test_an_upload_body_dripped_a_byte_at_a_time_gets_408_and_is_closed(index, tmp_path, how):
    if how == "serve":
        server = serve(index, tmp_path)
    else:
        env = {"IMAGEFINDER_DB": str(index), "IMAGEFINDER_BODY_TIMEOUT": "2"}
        server = LiveServer(env, fake_model=True, log=tmp_path / "log")
    with server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(
            b"POST /similarity-search HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
        )
        started = time.monotonic()
        answer = b""
        sock.settimeout(0.3)
        with contextlib.suppress(OSError):
            while time.monotonic() - started < 10:
                sock.sendall(b"x")
                with contextlib.suppress(TimeoutError):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"code":"request_timeout"' in answer
        assert time.monotonic() - started < 6
        assert closed_by_server(sock, 2.0)
        sock.close()
        assert health_ok(server.url, 3)


def test_more_idle_sockets_than_file_descriptors_do_not_lock_health_out(index, tmp_path):
    """The server may open 256 files in all: 300 idle sockets would exhaust them. The
    longest-idle connections are closed to admit new ones, so /health still gets in,
    and the log does not fill with accept() errors."""
    log = tmp_path / "log"
    with serve(index, tmp_path, "--timeout-headers", "30", open_files=256) as server:
        idle = []
        try:
            for _ in range(300):
                with contextlib.suppress(OSError):
                    idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
            assert health_ok(server.url, 5)
        finally:
            for s in idle:
                s.close()
    lines = log.read_text(errors="replace").splitlines()
    assert len(lines) < 100, lines[-5:]
    assert fake_model.NAME  # the fake model served it (no weights to load)
