"""Query expansion (αQE) and database-side augmentation (DBA), the two cheap re-ranking
gains of the image-retrieval literature (Radenović, Tolias and Chum, "Fine-tuning CNN
image retrieval with no human annotation", TPAMI 2018; "Revisiting Oxford and Paris",
CVPR 2018).

Both replace a vector by the normalised, α-weighted sum of itself and its ``n`` nearest
neighbours: ``v' = v + Σ (v·x_i)^α x_i``, each weight the cosine similarity raised to α
(vectors are unit length, so the dot product is the cosine). αQE does it to a query
before a second search; DBA does it once to every catalogue vector, so each stands for
its neighbourhood. The figures that chose n and α: bench/results/quality.md.

The vector maths is pure numpy; the functions at the end keep a store's augmented
vectors in step with its raw ones.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .store import Store

# n = 2, α = 3 for both: the issue's own check and bench/results/quality.md agree.
QE_NEIGHBOURS = 2
QE_ALPHA = 3.0
DBA_NEIGHBOURS = 2
DBA_ALPHA = 3.0
# Neighbours nearer than this (L2) are copies of the query: the same photo re-embedded,
# or a duplicate file. They add nothing to an expansion, so αQE looks past them.
COPY_DISTANCE = 1e-3


def weighted_sum(vector: np.ndarray, neighbours: np.ndarray, alpha: float) -> np.ndarray:
    """``vector`` plus its ``neighbours`` weighted by similarity**alpha, unit length."""
    vector = np.asarray(vector, dtype=np.float32)
    if len(neighbours) == 0:
        return vector
    neighbours = np.asarray(neighbours, dtype=np.float32)
    weights = np.clip(neighbours @ vector, 0.0, None) ** alpha
    out = vector + weights @ neighbours
    return normalise(out)


def normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def dba_spec(n: int = DBA_NEIGHBOURS, alpha: float = DBA_ALPHA) -> str:
    """How an index records its DBA setting in its meta."""
    return f"n={n},alpha={alpha:g}"


def parse_dba_spec(text: str) -> tuple[int, float]:
    parts = dict(p.split("=", 1) for p in text.split(",") if "=" in p)
    return int(parts.get("n", DBA_NEIGHBOURS)), float(parts.get("alpha", DBA_ALPHA))


def nearest_others(matrix: np.ndarray, rows: np.ndarray, n: int, block: int = 512) -> np.ndarray:
    """For each index in ``rows``, the indexes of its ``n`` nearest other rows of
    ``matrix`` (unit vectors), nearest first. Exact: blocks of dot products."""
    n = min(n, len(matrix) - 1)
    out = np.empty((len(rows), max(n, 0)), dtype=np.int64)
    if n <= 0:
        return out
    for start in range(0, len(rows), block):
        chunk = rows[start : start + block]
        sims = matrix[chunk] @ matrix.T
        sims[np.arange(len(chunk)), chunk] = -np.inf  # never its own neighbour
        top = np.argpartition(-sims, n - 1, axis=1)[:, :n]
        order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
        out[start : start + len(chunk)] = np.take_along_axis(top, order, axis=1)
    return out


def augment(
    matrix: np.ndarray,
    n: int = DBA_NEIGHBOURS,
    alpha: float = DBA_ALPHA,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """DBA: the augmented vectors of ``rows`` (default: all) of ``matrix``, each from its
    ``n`` nearest other rows."""
    matrix = np.asarray(matrix, dtype=np.float32)
    rows = np.arange(len(matrix)) if rows is None else np.asarray(rows, dtype=np.int64)
    neighbours = nearest_others(matrix, rows, n)
    picked = matrix[neighbours]  # (rows, n, dim)
    weights = np.clip(np.einsum("rnd,rd->rn", picked, matrix[rows]), 0.0, None) ** alpha
    return normalise(matrix[rows] + np.einsum("rn,rnd->rd", weights, picked))


# -- keeping an index's augmented vectors correct ------------------------------------
#
# ``extract`` marks the index stale before it writes and recomputes every augmented
# vector exactly at its end (``refresh``), so a crash in between leaves the mark and
# the next run recomputes. A write through the API (one image) recomputes the image's
# own augmented vector and those of its ``REPAIR_REACH`` nearest images (``repair``):
# the images whose n nearest neighbours the write can change are, but for rare hubs,
# among them. Deletes and replacements work the same way, from the old vector's
# neighbourhood. Searches never see a half state: a new image enters with its raw
# vector in the same transaction as its row.

STALE_KEY = "dba_stale"
REPAIR_REACH = 16


def enabled(store: Store) -> tuple[int, float] | None:
    spec = store.dba()
    return parse_dba_spec(spec) if spec else None


def set_enabled(store: Store, on: bool, compute: bool = True) -> bool:
    """Turn the index's DBA on (computing every augmented vector now, or with ``compute``
    False marking them stale for the caller's ``refresh``) or off. Returns whether
    anything changed."""
    if on == (store.dba() is not None):
        return False
    store.set_dba(dba_spec() if on else None)
    if on and compute:
        refresh(store)
    elif on:
        mark_stale(store)
    else:
        store.set_meta(STALE_KEY, None)
    return True


def mark_stale(store: Store) -> None:
    if store.dba() is not None:
        store.set_meta(STALE_KEY, "1")


def is_stale(store: Store) -> bool:
    return store.meta().get(STALE_KEY) == "1"


def refresh(store: Store, batch: int = 1000) -> int:
    """Recompute every augmented vector exactly from the raw ones; clears the stale mark.
    Memory: the raw vectors in one matrix (dim x 4 bytes per image)."""
    params = enabled(store)
    if params is None:
        return 0
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    for chunk in store.iter_vectors():
        for image_id, _, vector in chunk:
            ids.append(image_id)
            vectors.append(vector)
    written = 0
    if ids:
        augmented = augment(np.stack(vectors), *params)
        for start in range(0, len(ids), batch):
            end = start + batch
            written += store.write_augmented(zip(ids[start:end], augmented[start:end], strict=True))
    store.set_meta(STALE_KEY, None)
    return written


def neighbourhood(store: Store, vectors: Iterable[np.ndarray]) -> set[str]:
    """The ids whose augmented vectors a write at ``vectors`` can change."""
    found: set[str] = set()
    for vector in vectors:
        found.update(i for i, _ in store.knn(vector, REPAIR_REACH))
    return found


def repair(store: Store, ids: Iterable[str]) -> int:
    """Recompute the augmented vectors of ``ids`` from their current raw neighbours."""
    params = enabled(store)
    if params is None:
        return 0
    n, alpha = params
    raw = store.vectors_of(sorted(set(ids)))
    rows = []
    for image_id, vector in raw.items():
        near = [i for i, _ in store.knn(vector, n, exclude=(image_id,))]
        found = store.vectors_of(near)
        neighbours = (
            np.stack([found[i] for i in near if i in found])
            if found
            else np.zeros((0, len(vector)))
        )
        rows.append((image_id, weighted_sum(vector, neighbours, alpha)))
    return store.write_augmented(rows)
