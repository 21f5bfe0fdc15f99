"""k-means for the inverted lists (``ivf.py``), in numpy: balanced, to bound a probe.

Lloyd iterations on 2048-d CNN-like vectors grow *hub* lists: a centroid that averages
several classes sits closer to everything than the centroid of one class, so it
absorbs the points of every class that got no centroid of its own. Queries come from
the same classes, so nearly every search probes a hub and scans it whole: at 1M
vectors (4,000 lists, 5,000 classes), lists of 50-80k next to a median of 250 made
every search cost 0.5 s. Training on a sample does not show them (the sample's own
points stay near the centroids fitted to them); the full assignment does.

So, two remedies. ``train`` splits the most oversized lists into the slots of the
smallest ones every iteration, as faiss does for empty clusters. Then ``balance``,
given every vector's list, splits each list above a cap by k-means on its own members,
into as many lists as its size needs, and re-files those members by nearest centroid;
a few rounds, since a part can again be too large. On 200k clustered vectors with
800 lists (the 1M ratio), the largest list went 20,044 -> 494 and the codes a search at
nprobe=8 scans from ~21k to 2.6k, at recall@10 0.997 (see ivf.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

ITERATIONS = 8
# k-means on a list's members trains on at most this many per resulting list (as
# ivf.SAMPLE_PER_LIST for the whole index).
SAMPLE_PER_LIST = 16
# Splitting a list can leave one of its parts still too large: so many more tries.
SPLIT_ROUNDS = 5
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


def split_lists(
    centroids: np.ndarray,
    assigned: np.ndarray,
    lists: np.ndarray,
    vectors_of: Callable[[np.ndarray], np.ndarray],
    mean: float,
    seed: int = 0,
) -> np.ndarray:
    """Split each of ``lists`` into ceil(size / ``mean``) lists, and re-file their members.

    ``assigned[i]`` is the list of vector ``i``; ``vectors_of(positions)`` reads the
    vectors at those (ascending) positions. Each list's members are clustered by k-means
    (on at most ``SAMPLE_PER_LIST`` members per new list); the first new centroid takes
    the list's own number, the others are appended. Then every member of a split list
    goes to its nearest centroid among *all* of them, as a later search or insert will
    rank them, so a member can also move to a list that was not split. Updates
    ``assigned`` in place and returns the new centroids."""
    rng = np.random.default_rng(seed)
    sizes = np.bincount(assigned, minlength=len(centroids))
    added = []
    for j in lists:
        members = np.flatnonzero(assigned == j)
        parts = max(2, math.ceil(sizes[j] / mean))
        count = min(len(members), SAMPLE_PER_LIST * parts)
        picked = np.unique(members[np.linspace(0, len(members) - 1, count).astype(np.int64)])
        sub = train(vectors_of(picked), parts, seed=int(rng.integers(1 << 31)))
        centroids[j] = sub[0]
        added.append(sub[1:])
    centroids = np.concatenate([centroids, *added]).astype(np.float32)
    norms = (centroids * centroids).sum(axis=1)
    moving = np.flatnonzero(np.isin(assigned, lists))
    for lo in range(0, len(moving), BATCH):
        part = moving[lo : lo + BATCH]
        assigned[part] = nearest(vectors_of(part), centroids, norms)
    return centroids


def balance(
    centroids: np.ndarray,
    assigned: np.ndarray,
    vectors_of: Callable[[np.ndarray], np.ndarray],
    cap: float,
    mean: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Split every list above ``cap`` vectors, a few rounds (a split can leave one part
    still too large). Returns the centroids and the lists whose centroid is new or
    moved; ``assigned`` is updated in place.

    Only the members of split lists are re-filed: a vector elsewhere may now be nearer
    to one of the new centroids, which the caller checks in its next pass over the
    vectors (``refile``)."""
    changed: set[int] = set()
    for round_ in range(SPLIT_ROUNDS):
        sizes = np.bincount(assigned, minlength=len(centroids))
        big = np.flatnonzero(sizes > cap)
        if not len(big):
            break
        before = len(centroids)
        centroids = split_lists(centroids, assigned, big, vectors_of, mean, seed=round_)
        changed |= {int(j) for j in big} | set(range(before, len(centroids)))
    return centroids, np.array(sorted(changed), dtype=np.int64)


def refile(
    vectors: np.ndarray, current: np.ndarray, centroids: np.ndarray, changed: np.ndarray
) -> np.ndarray:
    """Each vector's nearest list, given that ``current`` was its nearest before the
    ``changed`` centroids moved or appeared: one comparison with those only."""
    if not len(changed):
        return current
    own = ((vectors - centroids[current]) ** 2).sum(axis=1)
    others = centroids[changed]
    d = (
        (vectors * vectors).sum(axis=1)[:, None]
        - 2 * (vectors @ others.T)
        + (others * others).sum(axis=1)[None, :]
    )
    best = d.argmin(axis=1)
    nearer = d[np.arange(len(vectors)), best] < own
    return np.where(nearer, changed[best], current)
