"""The Ray engine's model side: loading the model in an actor and embedding a batch there
(``load_checked``, ``embed_batch``), and models kept loaded on a cluster between jobs
(``IMAGEFINDER_RAY_KEEP_WARM``).

Every job on a running cluster started its own embedding actors: a worker process,
torch's import and the model's load, ~4.5 s of CPU each before the first vector (the
500-photo benchmark on 2 cores, where that was most of Ray's fixed cost). Here a model
runs in named, detached actors (``embed-<key>-<slot>`` in the namespace ``imagefinder``)
that the next job with the same model, weights, precision and code finds loaded. An
actor left idle for ``keep_warm`` seconds ends itself, and its memory with it.

- The actors reserve no CPU: the job's download tasks, which wait on them, hold their
  share (``actor_cpus`` each) instead, so an idle model never keeps a job's tasks from
  being scheduled (an earlier try reserved it in the actors: on a 2-CPU cluster the
  next job's downloads then waited on idle actors of another model).
- Each batch goes to the model of its ``slot`` (rows take turns, a batch at a time):
  the pool has as many models as ``--actors`` asks for.
- A killed actor is restarted by Ray and the call in flight run again
  (``max_restarts``, ``max_task_retries``); one that ended itself between the lookup and
  the call is looked up, so created, once more. Writes are idempotent either way.
- The key hashes this package's source too: a changed ImageFinder never sends work to
  actors that still run the old code.
- GPUs stay with the per-job actor pool (``rayengine._Embed``): a GPU held by an idle
  model is a GPU no job can use.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ModelUnavailable

if TYPE_CHECKING:
    from .model.embedder import Embedder

NAMESPACE = "imagefinder"


def model_key(model: str, weights: str | None, weights_id: str, precision: str) -> str:
    """What a warm actor must match to serve a job: the model and its weights as loaded,
    the precision, and the code."""
    h = hashlib.sha256()
    for part in (model, weights or "", weights_id, precision):
        h.update(part.encode() + b"\0")
    package = Path(__file__).resolve().parent
    for source in sorted(package.rglob("*.py")):
        h.update(source.relative_to(package).as_posix().encode() + b"\0")
        h.update(source.read_bytes())
    return h.hexdigest()[:16]


def load_checked(
    model: str, weights: str | None, precision: str, threads: int, weights_id: str
) -> Embedder:
    """The model, in an actor (warm, or ``rayengine._Embed``); refused unless its
    weights are the index's."""
    from .model.embedder import load_embedder

    embedder = load_embedder(model, weights, precision, threads)
    if embedder.weights_id != weights_id:
        # The driver named the weights without loading them; vectors of other weights
        # would be another space than the index's.
        raise ModelUnavailable(
            f"a Ray actor loaded {model} weights {embedder.weights_id}, but the index "
            f"holds vectors of weights {weights_id}"
        )
    return embedder


def embed_batch(embedder: Embedder, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``embed`` rows of a batch -> vectors; the pixels stay behind."""
    import torch

    todo = batch["todo"] == "embed"
    vectors = np.zeros((len(todo), embedder.dim), dtype=np.float32)
    if todo.any():
        x = torch.stack([embedder.normalise(p) for p in batch["pixels"][todo]])
        vectors[todo] = embedder.embed_tensors(x)
    out = {k: v for k, v in batch.items() if k != "pixels"}
    out["vector"] = vectors
    return out


class WarmModel:
    """One model, loaded once, serving any job's batches until idle for ``keep_warm``
    seconds."""

    def __init__(
        self, model: str, weights: str | None, precision: str, weights_id: str, keep_warm: float
    ):
        self.embedder = load_checked(model, weights, precision, 1, weights_id)
        self.keep_warm = keep_warm
        self.busy = 0
        self.last = time.monotonic()
        threading.Thread(target=self._end_when_idle, daemon=True).start()

    def embed(self, batch: dict[str, np.ndarray], threads: int) -> dict[str, np.ndarray]:
        import torch

        self.busy += 1
        try:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            return embed_batch(self.embedder, batch)
        finally:
            self.busy -= 1
            self.last = time.monotonic()

    def _end_when_idle(self) -> None:
        import ray

        while True:
            time.sleep(min(1.0, self.keep_warm))
            if not self.busy and time.monotonic() - self.last > self.keep_warm:
                # no_restart: an idle model is not a failure to recover from.
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return


@dataclass(frozen=True)
class WarmModels:
    """How a job's download tasks reach the warm models: each task embeds its batch on
    the model of the batch's ``slot`` before returning it (one stage fewer than a
    separate forwarding stage, which cost a process and a copy of every batch)."""

    key: str
    threads: int
    model: str
    weights: str | None
    precision: str
    weights_id: str
    keep_warm: float

    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        slot = int(batch["slot"][0])
        for attempt in (1, 2):
            try:
                out: dict[str, np.ndarray] = ray.get(
                    self._actor(slot).embed.remote(batch, self.threads)
                )
                return out
            except ray.exceptions.ActorDiedError as e:
                # Ended itself as idle just now (look it up again, so start it), or
                # cannot start at all (the same error again: the job fails with it).
                if attempt == 2 or "creation task" in str(e):
                    raise
        raise AssertionError("unreachable")

    def _actor(self, slot: int) -> Any:
        import ray

        return (
            ray.remote(WarmModel)
            .options(
                name=f"embed-{self.key}-{slot}",
                namespace=NAMESPACE,
                get_if_exists=True,
                lifetime="detached",
                num_cpus=0,
                max_restarts=-1,
                max_task_retries=-1,
            )
            .remote(self.model, self.weights, self.precision, self.weights_id, self.keep_warm)
        )
