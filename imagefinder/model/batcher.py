"""One inference thread per model, merging concurrent requests into one batch.

PyTorch's OpenMP pool belongs to the thread that calls it: forwards started from many
request threads each bring a team of spinning threads, and on a few cores they
starve one another (measured: 8 concurrent API clients got 8 searches/s where one
client alone got 14). So every forward runs on a single thread, and requests that
arrive while one is running go together in the next: under load the server does
fewer, larger forwards, which is also what the CPU is fastest at.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch


class Batcher:
    """``batcher(batch)`` runs ``forward(batch)`` on the inference thread, maybe merged."""

    def __init__(self, forward: Callable[[torch.Tensor], np.ndarray], max_batch: int = 32):
        self.forward = forward
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[torch.Tensor, Future]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # Forwards by batch size, for the server's /metrics.
        self._sizes: dict[int, int] = {}
        self._sizes_lock = threading.Lock()

    def queue_depth(self) -> int:
        """Calls waiting for the model (not counting the forward running now)."""
        return self._queue.qsize()

    def batch_sizes(self) -> dict[int, int]:
        """How many forwards ran at each batch size (images), since the start."""
        with self._sizes_lock:
            return dict(self._sizes)

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        self._ensure_thread()
        done: Future = Future()
        self._queue.put((batch, done))
        return done.result()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            jobs = [self._queue.get()]
            size = len(jobs[0][0])
            while size < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                jobs.append(job)
                size += len(job[0])
            with self._sizes_lock:
                self._sizes[size] = self._sizes.get(size, 0) + 1
            try:
                merged = jobs[0][0] if len(jobs) == 1 else torch.cat([b for b, _ in jobs])
                out = self.forward(merged)
            except BaseException as e:  # the callers get the error; the thread lives on
                for _, done in jobs:
                    done.set_exception(e)
                continue
            start = 0
            for batch, done in jobs:
                done.set_result(out[start : start + len(batch)])
                start += len(batch)
