"""Asking a running ImageFinder server: what ``search --server`` uses. Loading the model
is most of a command-line search's time; a server has it loaded already."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from . import network
from .errors import RemoteError


def search(
    server: str,
    *,
    images: Sequence[Path] = (),
    text: str | None = None,
    k: int = 3,
    index: str | None = None,
    expand: bool | None = None,
    offset: int = 0,
    max_distance: float | None = None,
    filters: Sequence[str] = (),
    timeout: float = 60.0,
) -> dict[str, Any]:
    """The server's answer to ``POST /similarity-search`` with ``images`` (one, or several
    searched as one; or ``/text-search`` with ``text``): the API's JSON (``{"model",
    "metric", "results": [{"id", "distance", ...}], ...}``). Raises RemoteError, with the
    server's own code and message when it answered with an error."""
    base = server.rstrip("/")
    if urlsplit(base).scheme not in ("http", "https") or not urlsplit(base).hostname:
        raise RemoteError(
            f"--server {server!r} is not an http(s) URL; for example http://127.0.0.1:8000"
        )
    form: list[tuple[str, str]] = [("k", str(k))]
    if index:
        form.append(("index", index))
    if expand is not None:
        form.append(("expand", "true" if expand else "false"))
    if offset:
        form.append(("offset", str(offset)))
    if max_distance is not None:
        form.append(("max_distance", repr(float(max_distance))))
    form += [("filter", pair) for pair in filters]
    url = base + ("/text-search" if text is not None else "/similarity-search")
    try:
        if text is not None:
            resp = requests.post(url, data=[*form, ("q", text)], timeout=timeout)
        else:
            files = [("file", (image.name, image.read_bytes())) for image in images]
            resp = requests.post(url, files=files, data=form, timeout=timeout)
    except requests.RequestException as e:
        raise RemoteError(f"cannot reach {base}: {network.explain(e, url).message}") from None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code != 200:
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            raise RemoteError(
                f"{base} answered {resp.status_code}: {error['message']}",
                code=str(error.get("code") or RemoteError.code),
            )
        raise RemoteError(f"{base} answered HTTP {resp.status_code}; is it ImageFinder?")
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or not all(
        isinstance(r, dict) and {"id", "distance"} <= set(r) for r in results
    ):
        raise RemoteError(f"{base} did not answer like an ImageFinder server")
    return body
