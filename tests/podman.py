"""Rootful Podman for the container test, on a machine like CI's.

What such a machine needs (checked on it), and where it is done here:

- ``apt-get install podman runc debootstrap`` (``.ci/run`` does it);
- crun fails on this kernel's cgroups: ``runtime = "runc"`` in a ``containers.conf``
  passed through ``CONTAINERS_CONF`` (``environment``);
- the process may not raise its rlimits: ``default_ulimits`` nofile and nproc set to
  what it has;
- Docker Hub is unreachable: the base image is local, ``debootstrap --variant=minbase
  bookworm`` plus python3-venv, then ``podman import`` (``ensure_base``). It is tagged with
  its recipe's version and kept in Podman's storage, so later runs reuse it;
- pip inside the build uses the host's pip configuration (its local mirrors, mounted
  read-only) and the host's CA bundle, mounted and passed as ``PIP_CERT``
  (``build_options``);
- ``HEALTHCHECK`` needs ``--format docker``.

``python tests/podman.py base`` builds the base image alone.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
# Bump the suffix when the recipe in ensure_base changes.
BASE_IMAGE = "localhost/imagefinder-base:bookworm-minbase-1"
IMAGE = "localhost/imagefinder:test"
LABEL = "imagefinder.test=1"
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
"""


def unavailable() -> str | None:
    """Why the container test cannot run here, or None."""
    if sys.platform != "linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (rootful Podman, debootstrap)"
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            return f"needs {tool}: apt-get install podman runc debootstrap"
    return None


def environment(folder: Path) -> dict[str, str]:
    conf = folder / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(
    env: dict[str, str], *args: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["podman", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"podman {shlex.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
        )
    return proc


def ensure_base(env: dict[str, str], log: Path) -> str:
    """The local base image (Debian bookworm, minbase, with python3 and venv)."""
    if podman(env, "image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    with tempfile.TemporaryDirectory(prefix="imagefinder-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        with open(log, "a") as out:
            subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    "--include=python3-venv",
                    "bookworm",
                    str(rootfs),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=900,
            )
        # The .debs and package lists debootstrap leaves: 100 MB nothing in the image reads.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=env,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise RuntimeError(f"podman import failed: {imported.stderr[-2000:]}")
    return BASE_IMAGE


def _pip_config() -> dict[str, str]:
    """The host's pip settings (files and PIP_* variables), as ``pip config list`` shows
    them: ``{"index-url": ..., "extra-index-url": ..., "find-links": ..., "cert": ...}``."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    found: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        found[name] = value.strip().strip("'\"")  # later lines (the environment) win
    return found


def _local_path(location: str) -> Path | None:
    if location.startswith("file:"):
        return Path(unquote(urlsplit(location).path))
    if location.startswith("/"):
        return Path(location)
    return None


def build_options() -> list[str]:
    """``podman build`` options that give pip in the build the host's pip settings.

    Local mirrors (``file:`` indexes, find-links folders) are mounted read-only at the same
    paths and listed first, so pip takes a wheel from disk rather than the network when
    both have it; the host's index (or pip's default) stays last, for anything else."""
    from pip._internal.models.index import PyPI

    config = _pip_config()
    indexes = [config["index-url"]] if config.get("index-url") else [PyPI.simple_url]
    indexes += config.get("extra-index-url", "").split()
    local = [u for u in indexes if _local_path(u)]
    ordered = local + [u for u in indexes if u not in local]
    options = [
        "--build-arg",
        f"PIP_INDEX_URL={ordered[0]}",
        "--build-arg",
        f"PIP_EXTRA_INDEX_URL={' '.join(ordered[1:])}",
    ]
    mounts: set[Path] = set()
    for url in local:
        path = _local_path(url)
        assert path is not None
        # A simple index links to its files through ../../files: mount the folder above.
        mounts.add(path.parent if path.name == "simple" else path)
    links = [p for p in config.get("find-links", "").split() if _local_path(p)]
    if links:
        mounts.update(p for p in (_local_path(link) for link in links) if p)
        options += ["--build-arg", f"PIP_FIND_LINKS={' '.join(links)}"]
    for path in sorted(mounts):
        if path.exists():
            options += ["--volume", f"{path}:{path}:ro"]
    cert = config.get("cert") or os.environ.get("REQUESTS_CA_BUNDLE")
    cert = cert or "/etc/ssl/certs/ca-certificates.crt"
    if Path(cert).is_file():
        options += ["--volume", f"{cert}:/run/host-ca.pem:ro"]
        options += ["--build-arg", "PIP_CERT=/run/host-ca.pem"]
    if not _reachable(_dockerfile_default("TORCH_INDEX")):
        # PyTorch's CPU index is out of reach (as on CI's machines): the same torch 2.14.1
        # from pip's index instead, which is the CUDA build (larger, same Python code).
        options += ["--build-arg", "TORCH_INDEX="]
    return options


def _dockerfile_default(arg: str) -> str:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith(f"ARG {arg}="):
            return line.split("=", 1)[1]
    raise KeyError(arg)


def _reachable(url: str) -> bool:
    host = urlsplit(url).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def build(env: dict[str, str], log: Path) -> str:
    """Build the Dockerfile as ``IMAGE`` on the local base image; the log goes to ``log``."""
    base = ensure_base(env, log)
    cmd = ["podman", "build", "--format", "docker", "--label", LABEL, "--tag", IMAGE]
    cmd += ["--build-arg", f"BASE={base}", *build_options(), str(ROOT)]
    with open(log, "a") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"podman build failed; see {log}:\n{log.read_text()[-4000:]}")
    # Earlier builds of the tag, now untagged: their own layers are the small code ones.
    podman(env, "image", "prune", "--force", "--filter", f"label={LABEL}", check=False)
    return IMAGE


if __name__ == "__main__":
    if sys.argv[1:] != ["base"]:
        sys.exit("usage: python tests/podman.py base")
    reason = unavailable()
    if reason:
        sys.exit(f"cannot build the base image: {reason}")
    with tempfile.TemporaryDirectory() as folder:
        print(ensure_base(environment(Path(folder)), Path(folder) / "base.log"))
