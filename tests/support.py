"""Helpers shared by tests and benchmarks: real images, free ports, live servers."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
CALTECH = SHARED_DATA / "caltech101-dev"


def image_bytes(
    size: tuple[int, int] = (64, 48),
    color: tuple[int, int, int] = (200, 30, 30),
    fmt: str = "JPEG",
    mode: str = "RGB",
    **save_kwargs,
) -> bytes:
    """A small real image, encoded."""
    img = Image.new(mode, size, color if mode == "RGB" else None)
    if mode == "RGB":
        # A gradient, so encoders produce real structure rather than a flat block.
        for x in range(0, size[0], max(1, size[0] // 8)):
            img.paste((x * 255 // max(1, size[0]), 120, 255 - color[2]), (x, 0, x + 2, size[1]))
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def clustered_vectors(
    n: int, dim: int, seed: int = 0, per_class: int = 200, per_group: int = 10
) -> np.ndarray:
    """``n`` unit float32 vectors shaped like CNN image features, for KNN tests and benchmarks.

    Classes hold groups hold points (``per_class``/``per_group`` points each), each level
    a Gaussian step from the one above; then a softplus and L2 normalisation. Like
    average-pooled post-ReLU features (ResNet's), every component is positive and the
    mean vector is far from zero, and nearest neighbours are meaningful (uniform random
    vectors have none). The spreads are tuned so that, as with efficientnet-lite0
    vectors of the Caltech photos, the 3rd neighbour sits at ~0.75 of the median
    distance. Draw queries in the same call as the data (then split): the structure
    depends on ``n``.
    """
    rng = np.random.default_rng(seed)
    classes = max(5, n // per_class)
    groups = max(10, n // per_group)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    group_centres = centres[rng.integers(0, classes, groups)]
    group_centres += 0.6 * rng.standard_normal((groups, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 20_000):  # bounded temporaries at 1M x 2048
        m = min(20_000, n - start)
        x = group_centres[rng.integers(0, groups, m)]
        x += 1.2 * rng.standard_normal((m, dim), dtype=np.float32) - 0.5
        x = np.logaddexp(0, 2 * x, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
        out[start : start + m] = x
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``uvicorn main:app`` in a subprocess on 127.0.0.1, as a user would run it."""

    def __init__(
        self,
        env: dict[str, str],
        port: int | None = None,
        workers: int = 1,
        fake_model: bool = False,
        log: Path | None = None,
        command: list[str] | None = None,
        open_files: int | None = None,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, **env}
        # With fake_model, the server process registers the tests' fake model first.
        launcher = [str(ROOT / "tests" / "fake_model.py")] if fake_model else []
        cmd = [
            sys.executable,
            *launcher,
            "-m",
            "uvicorn",
            "main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        if command is not None:  # another way to start it (``python -m imagefinder serve``)
            cmd = [sys.executable, *launcher, *command, "--port", str(self.port)]
        # The server's log goes to a file the test can read, never to an unread pipe.
        self.log = open(log, "ab") if log else None  # noqa: SIM115 (closed in stop)

        def limit_open_files() -> None:  # in the child, before it runs
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT if self.log else None,
            preexec_fn=limit_open_files if open_files else None,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server on {self.url} did not become ready in {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log:
            self.log.close()

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def assert_error(response, status: int, code: str | None = None) -> dict:
    """The response is an error in the one shape every route uses; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"status", "code", "message"} and error["message"]
    assert error["status"] == status
    if code:
        assert error["code"] == code, error
    return error
