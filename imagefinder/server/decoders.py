"""Uploads are decoded in worker processes, not in the server's own.

Decoding a large picture allocates, zeroes and frees hundreds of megabytes, and
CPython holds its interpreter lock through much of that: with two large PNGs decoding
in threads, the server's other threads (the event loop, ``/health``) waited up to 150 ms
at a time. In a worker process that costs the server nothing. A worker is also a wall:
a decoder that crashes on a hostile file takes down the worker, not the server (the
request gets a 400), and workers are replaced every ``TASKS_PER_WORKER`` decodes, which
hands everything they allocated back to the OS.

Workers come from a ``forkserver`` that imports only the decoder (no torch), so each is
small and starts in milliseconds. What crosses the pipe is the upload's bytes one way
and a picture already shrunk to model size (about 150 KB) the other.

A worker ends when the server process does, however it ends (a SIGKILL included): it
holds both ends of its task pipe, so it would never see the server go, and wait for
work forever, holding its memory.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from PIL import Image

from .. import memory
from ..errors import NotAnImage
from ..images import load_rgb, probe

TASKS_PER_WORKER = 200


def _load(source: bytes | str, max_pixels: int, min_side: int | None) -> tuple[str, Any, bytes]:
    try:
        img = load_rgb(source, max_pixels, min_side)
        return img.mode, img.size, img.tobytes()
    finally:
        del source
        memory.release()  # an idle worker keeps nothing it does not need


def _probe(source: bytes | str, max_pixels: int) -> str:
    try:
        return probe(source, max_pixels)
    finally:
        del source
        memory.release()


def _end_with(server_pid: int) -> None:
    """Worker initializer: exit as soon as the process ``server_pid`` has ended."""

    def watch() -> None:
        try:
            handle = os.pidfd_open(server_pid)
        except ProcessLookupError:
            os._exit(0)
        except OSError:  # no pidfd (Linux < 5.3): poll instead
            while _alive(server_pid):
                time.sleep(1.0)
        else:
            select.select([handle], [], [])  # readable once the process has exited
        os._exit(0)

    threading.Thread(target=watch, name="end-with-server", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Decoders:
    """``load_rgb`` and ``probe`` with the work done in ``workers`` processes."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(["imagefinder.images"])
                self._pool = ProcessPoolExecutor(
                    self.workers,
                    mp_context=context,
                    max_tasks_per_child=TASKS_PER_WORKER,
                    initializer=_end_with,
                    initargs=(os.getpid(),),
                )
            return self._pool

    def _run(self, fn: Any, *args: Any) -> Any:
        pool = self._executor()
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            # A worker died mid-decode (a crash in a decoder library, or the OOM killer):
            # this file did it. Start afresh for the next one.
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise NotAnImage("the image crashed the decoder") from None

    def load_rgb(
        self, source: bytes | str | Path, max_pixels: int, min_side: int | None = None
    ) -> Image.Image:
        mode, size, data = self._run(_load, _sendable(source), max_pixels, min_side)
        return Image.frombytes(mode, size, data)

    def probe(self, source: bytes | str | Path, max_pixels: int) -> str:
        result: str = self._run(_probe, _sendable(source), max_pixels)
        return result

    def close(self) -> None:
        """End the workers and wait for them (the server is shutting down, its requests
        answered): a pool left to end on its own leaves its semaphores to the resource
        tracker, which reports them as leaked into the server's log."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _sendable(source: bytes | str | Path) -> bytes | str:
    return str(source) if isinstance(source, Path) else source
