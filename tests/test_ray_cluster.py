"""`ingest --engine ray --ray-address` against a cluster started the way the README
starts one (`ray start --head`), in its own processes, with token authentication on:
the command as a user runs it, in a subprocess, with the real efficientnet-lite0.

Ray enables token authentication on `ray start` when a token exists
(`~/.ray/auth_token`), but a client given an address sends it only in token mode; the
command must connect anyway. HOME is a temporary folder, so the token is the test's own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from file_server import FileServer
from support import ROOT, free_port, image_bytes

from imagefinder.store import open_store

pytest.importorskip("ray")
RAY = str(Path(sys.executable).with_name("ray"))
N = 6


@pytest.fixture
def token_cluster(tmp_path):
    """A head node with token authentication, stopped with its processes at the end."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    assert (home / ".ray" / "auth_token").is_file()
    port = free_port()
    # Its own folder (short: Ray puts sockets there), so the `ray_current_cluster` file
    # it leaves does not send a later `ray.init()` of this machine to a stopped cluster.
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    log = open(tmp_path / "ray-start.log", "w")  # noqa: SIM115 (the cluster writes it until the end)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
         "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while "Ray runtime started" not in (tmp_path / "ray-start.log").read_text():
        assert head.poll() is None, (tmp_path / "ray-start.log").read_text()
        assert time.monotonic() < deadline, "ray start did not finish in 60 s"
        time.sleep(0.2)
    assert "Token authentication is enabled" in (tmp_path / "ray-start.log").read_text()
    yield f"127.0.0.1:{port}", env
    # `ray start --block` stops the cluster's processes when told to (2 s without jobs;
    # after a job it can wait 30 s and more): then the whole session is killed.
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(10)
    shutil.rmtree(temp, ignore_errors=True)
    log.close()


def test_the_command_joins_a_running_cluster_with_token_authentication(token_cluster, tmp_path):
    address, env = token_cluster
    web = tmp_path / "web"
    web.mkdir()
    for i in range(N):
        (web / f"p{i}.jpg").write_bytes(image_bytes((96 + i, 80), (i * 40, 90, 200 - i * 30)))
    with FileServer(web) as server:
        csv_path = tmp_path / "c.csv"
        csv_path.write_text(
            "url,id\n" + "".join(f"{server.url(f'p{i}.jpg')},p{i}\n" for i in range(N))
        )
        db = tmp_path / "index.db"
        result = subprocess.run(
            [sys.executable, "-m", "imagefinder", "ingest", "--csv", str(csv_path),
             "--output-dir", str(tmp_path / "images"), "--db", str(db),
             "--model", "efficientnet-lite0", "--allow-private",
             "--engine", "ray", "--ray-address", address],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{N} indexed" in result.stdout, result.stdout
    store = open_store(str(db))
    assert sorted(store.file_states()) == [f"p{i}" for i in range(N)]
    store.close()
