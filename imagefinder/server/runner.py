"""The server's job runner: one thread, one job at a time, on the loaded model.

It claims the oldest queued job (or one whose server is gone) from the default index's
jobs table, and runs it with every decode and forward pass going through the gate, one
place at a time: searches keep the other places. A server shutting down hands its
running job back to the queue; a server killed leaves it ``running`` until a server on
this host sees the process is gone (at once), or any server sees no heartbeat for a
minute; then it runs again from the start, finding its finished images by content hash.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import Busy, ImageFinderError
from ..jobs import execute
from ..service import Service
from ..store.jobtable import this_owner
from .gate import Gate

log = logging.getLogger("imagefinder")
# Seconds between looks at the table when nobody woke the runner (stale jobs of other
# servers, jobs queued through another server process).
POLL = 2.0
# Seconds a job step waits for the requests in the gate to finish first.
YIELD_MAX = 1.0


class JobRunner:
    def __init__(self, service: Service, gate: Gate):
        self.service = service
        self.gate = gate
        self.owner = this_owner()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="jobs", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A job was queued: look now."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self._run_one()
            except Exception:  # a bug, or the database gone: log, wait, go on
                log.exception("the job runner failed; retrying")
                ran = False
            if not ran:
                self._wake.wait(POLL)
                self._wake.clear()

    def _run_one(self) -> bool:
        table = self.service.store.jobs()
        job = table.claim(self.owner)
        if job is None:
            return False
        log.info("job %s: started (%s, %d items)", job.id, job.kind, job.total)
        try:
            state = execute(job, table, self.service, self._gated, self._stop)
        except Exception as e:
            log.exception("job %s failed", job.id)
            job.errors = [*job.errors[:99], {"id": "", "reason": f"internal error: {e}"}]
            table.finish(job, "failed")
            return True
        if state == "interrupted":
            table.release(job)
            log.info("job %s: handed back to the queue (shutting down)", job.id)
        else:
            log.info(
                "job %s: %s (%d done, %d skipped, %d failed)",
                job.id,
                state,
                job.done,
                job.skipped,
                job.failed,
            )
        return True

    def _gated(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` through the gate, waiting (never failing) while it is full. A job
        yields to requests: while any is in the gate it waits, up to ``YIELD_MAX``
        seconds per step (so a steady stream of searches slows a job but never stops it)."""
        waited = 0.0
        while self.gate.admitted and waited < YIELD_MAX and not self._stop.is_set():
            time.sleep(0.01)
            waited += 0.01
        delay = 0.05
        while True:
            try:
                self.gate.call(fn)
                return
            except Busy:
                if self._stop.is_set():
                    raise ImageFinderError("the server is shutting down") from None
                time.sleep(delay)
                delay = min(1.0, delay * 2)
