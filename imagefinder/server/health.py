"""``GET /health``: cheap, and never behind a search.

It runs on a thread of its own, not in the pool that uploads, browsing and writes use
(a flood of requests cannot queue it), and concurrent callers within ``TTL`` seconds
share one answer, so a load balancer polling hard costs two index reads a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Request

from .deps import IndexesDep
from .schemas import Health

TTL = 0.5

router = APIRouter()


class HealthCheck:
    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._answer: dict[str, Any] | None = None
        self._at = 0.0
        self._pending: asyncio.Future[dict[str, Any]] | None = None

    async def answer(self, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if self._answer is not None and time.monotonic() - self._at < TTL:
            return self._answer
        if self._pending is None or self._pending.done():
            if self._pool is None:  # made on first use, and again after close()
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="health")
            loop = asyncio.get_running_loop()
            self._pending = asyncio.ensure_future(loop.run_in_executor(self._pool, compute))
        pending = self._pending
        answer = await asyncio.shield(pending)
        if pending is self._pending:
            self._answer, self._at = answer, time.monotonic()
        return answer

    def close(self) -> None:
        pool, self._pool = self._pool, None
        self._pending, self._answer = None, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


@router.get("/health", response_model=Health, summary="Status, model and vector count")
async def health(request: Request, indexes: IndexesDep) -> dict[str, Any]:
    check: HealthCheck = request.app.state.health
    return await check.answer(indexes.public_health)
