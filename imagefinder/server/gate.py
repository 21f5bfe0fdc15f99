"""The one bounded path for expensive work: decoding and embedding an image.

At most ``IMAGEFINDER_MAX_CONCURRENCY`` jobs run at once, on the gate's own threads,
and at most ``IMAGEFINDER_MAX_QUEUE`` more wait for a slot. A request beyond that is
refused at once with 503 ``busy`` and a ``Retry-After`` header, before its body is read:
a flood of uploads costs the server a few bytes each, not a decode each. Memory is
then bounded by (slots x the decode budget) plus (queue x the upload cap).

Every route that decodes goes through one ``Gate`` (``app.state.gate``): searches by
upload, API writes, thumbnails being made. Anything else that decodes on the
server's behalf (ingestion jobs) must too: ``await gate.run(fn, ...)`` from async code,
``gate.call(fn, ...)`` from a thread. ``/health`` never touches it.

A second gate of one slot and no queue (``app.state.duplicates_gate``) runs duplicate
reports (``GET /duplicates``): each reads every vector of an index.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from .. import memory
from ..errors import Busy

T = TypeVar("T")


class Gate:
    def __init__(
        self, slots: int, queue: int, work: str = "images being processed", seconds: float = 1.0
    ):
        self.slots = max(1, slots)
        self.queue = max(0, queue)
        # What a slot does, for the busy message.
        self.work = work
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._admitted = 0
        self._running = 0
        self._seconds = seconds  # a moving average of one job's duration

    @property
    def _executor(self) -> ThreadPoolExecutor:
        # Made on first use, and again after close(): an app may run its lifespan twice.
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.slots, thread_name_prefix="gate", initializer=_lower_priority
                )
            return self._pool

    @property
    def admitted(self) -> int:
        return self._admitted

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a place (running or waiting) for one request, or raise ``Busy``."""
        with self._lock:
            if self._admitted >= self.slots + self.queue:
                raise Busy(
                    f"the server is busy ({self.slots} {self.work}, "
                    f"{self.queue} waiting); try again in a moment",
                    retry_after=self._retry_after(),
                )
            self._admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead, at the recent pace."""
        return max(1, min(60, math.ceil(self._seconds * (self.queue + 1) / self.slots)))

    def _job(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            self._running += 1
        started = time.monotonic()
        try:
            return fn(*args)
        finally:
            elapsed = time.monotonic() - started
            with self._lock:
                self._running -= 1
                self._seconds = 0.8 * self._seconds + 0.2 * elapsed
                idle = self._running == 0
            if idle:  # the last job out hands the freed memory back to the OS
                memory.release(min_interval=0.5)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on a gate thread (the caller holds a place: ``admit``)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._job, fn, *args)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """From a thread: take a place (or raise ``Busy``), run ``fn``, wait for it."""
        with self.admit():
            return self._executor.submit(self._job, fn, *args).result()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _lower_priority() -> None:
    """Gate threads (and the threads they start: torch's) yield the CPU to the event loop
    and /health: on 2 cores, decoding at full speed otherwise delayed /health by 150 ms."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def gate_of(request: Request) -> Gate:
    gate: Gate = request.app.state.gate
    return gate


class GatedRoute(APIRoute):
    """Takes a place in the gate before FastAPI reads and parses the body: a request the
    server cannot take is answered 503 at once, without receiving its upload."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def gated(request: Request) -> Response:
            self.before_admission(request)
            with gate_of(request).admit():
                return await handler(request)

        return gated

    def before_admission(self, request: Request) -> None:
        """What must pass before a place is taken (the write routes check the token)."""
