"""uvicorn's HTTP/1.1 protocol with the limits a public server needs (``imagefinder serve``).

uvicorn times out a keep-alive connection only after a response: a client that connects
and sends nothing, or sends its request line and headers a byte at a time, holds its
socket forever. 800 such sockets stayed open for 30 s in a test, and at the open-file
limit every new client, a load balancer's ``/health`` included, was refused. Here:

- **Slow headers**: a request's line and headers must arrive within ``header_timeout``
  seconds of the connection opening, or of the previous response on a kept-alive
  connection; otherwise the connection is closed.
- **Idle keep-alive**: uvicorn's own ``timeout_keep_alive`` (5 s).
- **Slow bodies**: enforced by the app itself (``app.BodyLimits``), so ``uvicorn main:app``
  gets it too.
- **Connections**: at most ``max_connections`` open; a new one beyond that closes the
  connection that has waited longest without sending a complete request, so idle
  sockets cannot crowd out a real client. The cap stays below the open-file limit, so
  ``accept()`` never fails (it logged an error per attempt).
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0


# Files the process needs besides client sockets: the index, logs, libraries, uploads
# spooled to disk.
RESERVED_FILES = 64


def connection_budget() -> tuple[int, int]:
    """(max_connections, backlog) that keep ``accept()`` clear of the open-file limit.

    asyncio accepts up to ``backlog`` connections at a time, and closing the idle ones
    that make room for them takes a couple of loop turns: so the cap leaves three
    batches of room. At the limit, asyncio logged an error for every accept it retried,
    a million lines in seconds."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = 1 << 16 if soft == resource.RLIM_INFINITY else soft
    backlog = max(8, min(2048, limit // 8))
    return max(8, min(4096, limit - 3 * backlog - RESERVED_FILES)), backlog


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = HEADER_TIMEOUT
    max_connections: int = 1000

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._waiting_since = 0.0

    @classmethod
    def configured(cls, header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
        return type(
            "GuardedH11Protocol",
            (cls,),
            {"header_timeout": header_timeout, "max_connections": max_connections},
        )

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()
        if len(self.connections) > self.max_connections:
            self._evict()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_head():
            self._arm_header_timer()  # a partial head: the clock keeps running
        else:
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Waiting for the next head now (uvicorn's shorter keep-alive timeout applies too).
        self._cancel_header_timer()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    # -- helpers ----------------------------------------------------------------------

    def _waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._waiting_since = self.loop.time()
            self._header_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _head_too_slow(self) -> None:
        self._header_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()

    def _evict(self) -> None:
        """Close the connection that has waited longest for a request head."""
        waiting = [
            c
            for c in self.connections
            if isinstance(c, GuardedH11Protocol)
            and c is not self
            and c._header_timer is not None
            and not c.transport.is_closing()
        ]
        if waiting:
            min(waiting, key=lambda c: c._waiting_since).transport.close()
