"""k-means for the inverted lists (``ivf.py``), in numpy: balanced enough to bound a probe.

Plain Lloyd iterations on 2048-d CNN-like vectors drift into a few *hub* lists: a
centroid that averages several classes sits closer to everything than a centroid of
one class, so it keeps absorbing points (on the clustered synthetic vectors, 512
lists over 100k vectors ended with one list of 9,400, 18% of what a probe scans).
So every iteration also splits the most oversized lists into the slots of the
smallest ones, as faiss does for empty clusters: a probe then reads lists of
comparable size, which is what keeps p95 near p50.
"""

from __future__ import annotations

import numpy as np

ITERATIONS = 8
# Distances are computed for this many vectors at a time: bounded temporaries
# (rows x lists floats) however large the index.
BATCH = 8192


def nearest(vectors: np.ndarray, centroids: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """The index of each vector's nearest centroid by L2 (``norms`` = squared norms)."""
    out = np.empty(len(vectors), dtype=np.int64)
    for lo in range(0, len(vectors), BATCH):
        block = vectors[lo : lo + BATCH]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, and |x|^2 does not change the argmin.
        out[lo : lo + BATCH] = np.argmin(norms[None, :] - 2 * (block @ centroids.T), axis=1)
    return out


def train(sample: np.ndarray, lists: int, seed: int = 0) -> np.ndarray:
    """``lists`` centroids (float32) for ``sample`` (float32 rows; more rows than lists)."""
    rng = np.random.default_rng(seed)
    lists = max(1, min(lists, len(sample)))
    centroids = sample[rng.choice(len(sample), lists, replace=False)].astype(np.float32)
    for _ in range(ITERATIONS):
        assigned = nearest(sample, centroids, (centroids * centroids).sum(axis=1))
        sizes = np.bincount(assigned, minlength=lists)
        order = np.argsort(assigned, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        for j in np.flatnonzero(sizes):
            centroids[j] = sample[order[bounds[j] : bounds[j + 1]]].mean(axis=0)
        _split_oversized(sample, centroids, sizes, order, bounds, rng)
    return centroids


def _split_oversized(
    sample: np.ndarray,
    centroids: np.ndarray,
    sizes: np.ndarray,
    order: np.ndarray,
    bounds: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Move the smallest lists' centroids into the largest lists, half way towards two
    of their members each: the next assignment splits them."""
    mean = len(sample) / len(centroids)
    small = list(np.argsort(sizes, kind="stable"))
    for big in np.argsort(-sizes, kind="stable"):
        if sizes[big] <= 2 * mean or not small or sizes[small[0]] >= mean / 2:
            return
        spare = small.pop(0)
        if spare == big:
            return
        members = order[bounds[big] : bounds[big + 1]]
        a, b = sample[rng.choice(members, 2, replace=False)]
        centroids[big], centroids[spare] = (centroids[big] + a) / 2, (centroids[big] + b) / 2
