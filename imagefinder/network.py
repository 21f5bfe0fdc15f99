"""What went wrong on the network, in words a user can act on.

``requests`` and ``urllib`` wrap the real cause two or three levels deep, so a bare
``ConnectionError`` says nothing about whether the machine is offline (the DNS lookup
failed), the server is down (connection refused), or slow (a timeout). ``explain``
digs the cause out and says whether trying again can help.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

DNS = "dns"
REFUSED = "refused"
TIMEOUT = "timeout"
RESET = "reset"
UNREACHABLE = "unreachable"
TLS = "tls"
OTHER = "other"

# What each kind means for a whole run that failed with it ("N rows failed because ...").
ADVICE = {
    DNS: "their host names could not be resolved (is this machine offline?)",
    REFUSED: "the servers refused the connection (are they running?)",
    TIMEOUT: "the servers did not answer in time (is the network slow or filtered?)",
    UNREACHABLE: "the network is unreachable (is this machine offline?)",
    TLS: "TLS failed (behind a proxy? set REQUESTS_CA_BUNDLE to its certificate)",
}


@dataclass(frozen=True)
class Failure:
    kind: str
    message: str
    retry: bool


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps: ``__cause__``, ``__context__``, and the ``reason``
    of urllib3's MaxRetryError and urllib's URLError."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for inner in (getattr(e, "reason", None), e.__cause__, e.__context__):
            if isinstance(inner, BaseException):
                todo.append(inner)


def explain(exc: BaseException, url: str) -> Failure:
    """The root cause of ``exc`` (raised while fetching ``url``), as a ``Failure``."""
    parts = urlsplit(url)
    host = parts.hostname or url
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = 0
    causes = list(_causes(exc))
    names = {type(e).__name__ for e in causes}
    for e in causes:
        if isinstance(e, socket.gaierror):
            # EAI_AGAIN is a resolver that did not answer; anything else (EAI_NONAME:
            # no such name) will fail the same way on every retry.
            again = e.errno == socket.EAI_AGAIN
            return Failure(DNS, f"DNS lookup failed for {host} ({e.strerror})", retry=again)
        if isinstance(e, ConnectionRefusedError):
            return Failure(REFUSED, f"connection refused by {host}:{port}", retry=True)
        if isinstance(e, ssl.SSLError):
            reason = getattr(e, "verify_message", None) or e.reason or str(e)
            return Failure(TLS, f"TLS failed with {host}: {reason}", retry=False)
        if isinstance(e, ConnectionResetError | BrokenPipeError):
            return Failure(RESET, f"connection reset by {host}", retry=True)
        if isinstance(e, OSError) and e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return Failure(UNREACHABLE, f"network unreachable for {host}", retry=True)
    if names & {"ConnectTimeout", "ConnectTimeoutError"}:
        return Failure(TIMEOUT, f"timed out connecting to {host}", retry=True)
    if names & {"ReadTimeout", "ReadTimeoutError", "TimeoutError", "timeout"}:
        return Failure(TIMEOUT, f"{host} stopped answering (timed out)", retry=True)
    if names & {"ChunkedEncodingError", "ProtocolError", "IncompleteRead"}:
        return Failure(RESET, f"connection to {host} broke off", retry=True)
    detail = str(causes[-1]) or type(causes[-1]).__name__
    return Failure(OTHER, f"network error with {host}: {detail}", retry=True)
