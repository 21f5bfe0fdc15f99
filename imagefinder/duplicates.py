"""Duplicates in an index, at three levels, and the mark search results carry.

- ``exact``: the same file content (sha256), whatever the model.
- ``near``: the same picture after re-encoding, resizing, a small crop, an EXIF
  rotation, a small overlay or a colour shift: raw vectors within the model's
  calibrated ``near`` distance (``ModelSpec.duplicates``, measured by
  bench/duplicates.py for precision >= 0.99 on real photos).
- ``similar``: a looser cut, the model's ``similar`` distance: pictures of the same kind
  of subject, as close as distinct photos of one Caltech-101 class usually are (see
  bench/results/duplicates.md for the rule and its precision).

A model (or weights) without calibrated thresholds offers ``exact`` only, unless the
caller gives a distance of its own (``max_distance``).

Groups are the connected components of the graph "within the distance", found without
comparing every pair: an in-memory inverted file (``radius_pairs``) compares each
image with the images of its few nearest lists, in numpy blocks, and a vectorised
union-find joins the pairs. Time at 100k images, and the share of pairs found against
comparing every pair: bench/results/duplicates.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .errors import InvalidRequest, NotCalibrated
from .model.registry import MODELS, DuplicateThresholds
from .store import Store

LEVELS = ("exact", "near", "similar")
# Inverted-file shape: lists of ~LIST_SIZE images, centroids from a few Lloyd rounds
# over a sample (balance matters for speed only: the search is exact whatever the
# centroids).
LIST_SIZE = 200
# Lists each image is compared in (its nearest ones): recall of pairs within the near
# and similar distances vs every pair compared (bench/results/duplicates.md).
PROBES = 8
SAMPLE_PER_LIST = 16
LLOYD_ROUNDS = 4
BLOCK = 1024
SEED = 0


@dataclass(frozen=True)
class Group:
    """One group: its representative first (the member with most links), then the
    others by distance to it."""

    ids: list[str]
    distances: list[float]


@dataclass(frozen=True)
class Report:
    level: str
    # The distance used (None for exact).
    max_distance: float | None
    images: int
    groups: list[Group]


def thresholds(meta: dict[str, str]) -> DuplicateThresholds | None:
    """The index's calibrated thresholds, if its model and weights have any."""
    spec = MODELS.get(meta.get("model", ""))
    found = spec.duplicates if spec else None
    return found if found and found.weights == meta.get("weights") else None


def near_distance(meta: dict[str, str]) -> float | None:
    """The distance under which a search result is marked ``near``; None: uncalibrated."""
    found = thresholds(meta)
    return found.near if found else None


def level_distance(meta: dict[str, str], level: str) -> float | None:
    """The distance of ``level`` for this index (None for exact); NotCalibrated when its
    model or weights were never calibrated."""
    if level not in LEVELS:
        raise InvalidRequest(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    if level == "exact":
        return None
    found = thresholds(meta)
    if found is None:
        model, weights = meta.get("model", "?"), meta.get("weights", "?")
        raise NotCalibrated(
            f"no {level} threshold is calibrated for {model} with weights {weights} "
            "(thresholds are measured per model and weights, and these could not be "
            "measured); ask for level exact, or give a distance of your own "
            "(imagefinder duplicates --max-distance D), or calibrate: "
            f"python bench/duplicates.py --model {model}"
        )
    return found.near if level == "near" else found.similar


def match(distance: float, same_content: bool, near: float | None) -> str | None:
    """What a search result is to its query: ``exact`` (same content), ``near`` (within
    the model's near distance) or None."""
    if same_content:
        return "exact"
    if near is not None and distance <= near:
        return "near"
    return None


# -- finding every group --------------------------------------------------------------


def find(
    store: Store,
    level: str,
    max_distance: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Every group of duplicates in ``store`` at ``level`` (or within ``max_distance``,
    which replaces the level's calibrated distance). ``on_progress(done, total)``."""
    meta = store.meta()
    count = store.count() if meta else 0
    if max_distance is None:
        max_distance = level_distance(meta, level) if meta else None
    elif max_distance < 0 or not math.isfinite(max_distance):
        raise InvalidRequest(f"max_distance must be a distance >= 0, not {max_distance}")
    if level == "exact" and max_distance is None or not meta:
        groups = [Group(ids, [0.0] * len(ids)) for ids in store.hash_groups()]
        return Report("exact", None, count, _sorted(groups))
    assert max_distance is not None
    ids, matrix = load_vectors(store, int(meta["dim"]))
    components = Components(len(ids))
    for a, b in radius_pairs(matrix, max_distance, on_progress):
        components.union(a, b)
    groups = []
    for members in components.groups():
        # In id order, so ties (in links, in distance) go to the smaller id on every store.
        members = members[np.argsort([ids[m] for m in members], kind="stable")]
        rep = members[np.argmax(components.degree[members])]
        dist = np.linalg.norm(matrix[members] - matrix[rep], axis=1)
        order = np.argsort(dist, kind="stable")
        groups.append(Group([ids[m] for m in members[order]], [float(d) for d in dist[order]]))
    return Report(level, max_distance, len(ids), _sorted(groups))


def as_json(report: Report, offset: int = 0, limit: int | None = None) -> dict:
    """The report as the API and ``duplicates --json`` give it: groups
    ``[offset, offset + limit)``, each a list of {id, distance to the first}."""
    end = len(report.groups) if limit is None else offset + limit
    return {
        "level": report.level,
        "max_distance": report.max_distance,
        "images": report.images,
        "total_groups": len(report.groups),
        "groups": [
            {"images": [{"id": i, "distance": d} for i, d in zip(g.ids, g.distances, strict=True)]}
            for g in report.groups[offset:end]
        ],
        "next_offset": end if end < len(report.groups) else None,
    }


def _sorted(groups: list[Group]) -> list[Group]:
    return sorted(groups, key=lambda g: (-len(g.ids), g.ids[0]))


def load_vectors(store: Store, dim: int) -> tuple[list[str], np.ndarray]:
    """Every id and its vector, in one float32 matrix (N x dim x 4 bytes)."""
    ids: list[str] = []
    matrix = np.empty((max(store.count(), 1), dim), dtype=np.float32)
    for page in store.iter_vectors(batch=4096):
        if len(ids) + len(page) > len(matrix):  # rows added meanwhile
            matrix = np.concatenate([matrix, np.empty_like(matrix)])
        matrix[len(ids) : len(ids) + len(page)] = [v for _, _, v in page]
        ids += [i for i, _, _ in page]
    return ids, matrix[: len(ids)]


def radius_pairs(
    matrix: np.ndarray,
    radius: float,
    on_progress: Callable[[int, int], None] | None = None,
    probes: int = PROBES,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks of index pairs (a, b), a != b, with ``|matrix[a] - matrix[b]| <= radius``.

    An inverted file: k-means lists, each row in the list of its nearest centroid, and
    each row compared with the rows of its ``probes`` nearest lists. A list whose
    centroid is farther than ``|a - c_a| + 2 radius`` from a cannot hold a neighbour of
    a (for b within radius of a: ``|a - c_b| <= |a - b| + |b - c_b| <= radius +
    |b - c_a| <= 2 radius + |a - c_a|``), so those are skipped. A pair is found when
    either row's list is among the lists the other probes; pairs across lists farther
    apart are missed, which is rare for pairs this close (recall against comparing
    every pair: bench/results/duplicates.md)."""
    n = len(matrix)
    if n < 2:
        return
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.einsum("ij,ij->i", matrix, matrix)
    centroids = _centroids(matrix, max(1, n // LIST_SIZE))
    n_lists = len(centroids)
    probes = min(probes, n_lists)
    cnorms = np.einsum("ij,ij->i", centroids, centroids)
    primary = np.empty(n, dtype=np.int64)
    rows, lists = [], []
    for start in range(0, n, 4096):
        x = matrix[start : start + 4096]
        d = np.sqrt(np.maximum(norms[start : start + 4096, None] - 2 * x @ centroids.T + cnorms, 0))
        nearest = np.argpartition(d, probes - 1, axis=1)[:, :probes]
        near_d = np.take_along_axis(d, nearest, axis=1)
        best = nearest[np.arange(len(x)), near_d.argmin(axis=1)]
        primary[start : start + len(x)] = best
        bound = d[np.arange(len(x)), best] + 2 * radius + 1e-6
        r, c = np.nonzero(near_d <= bound[:, None])
        rows.append(r + start)
        lists.append(nearest[r, c])
    queries = _by_list(np.concatenate(rows), np.concatenate(lists), n_lists)
    members = _by_list(np.arange(n), primary, n_lists)
    limit = radius * radius
    for i, (q, m) in enumerate(zip(queries, members, strict=True)):
        if len(m) and len(q):
            block = matrix[m]
            for lo in range(0, len(q), BLOCK):
                rows_q = q[lo : lo + BLOCK]
                pair_norms = norms[rows_q, None] + norms[m]
                d2 = pair_norms - 2 * (matrix[rows_q] @ block.T)
                # The expansion loses up to ~1e-7 of |a|^2 + |b|^2 to float32 rounding,
                # which for a tiny radius is more than the radius itself (two copies of
                # one photo came out 2e-7 apart on one CPU, exactly 0 on another): it
                # only picks the candidates, and their own difference decides.
                a, b = np.nonzero(d2 <= limit + 1e-6 * pair_norms)
                keep = rows_q[a] != m[b]
                if keep.any():
                    qa, mb = rows_q[a[keep]], m[b[keep]]
                    diff = matrix[qa] - matrix[mb]
                    close = np.einsum("ij,ij->i", diff, diff) <= limit
                    if close.any():
                        yield qa[close], mb[close]
        if on_progress:
            on_progress(i + 1, n_lists)


def _by_list(rows: np.ndarray, lists: np.ndarray, n_lists: int) -> list[np.ndarray]:
    order = np.argsort(lists, kind="stable")
    bounds = np.searchsorted(lists[order], np.arange(n_lists + 1))
    return [rows[order[bounds[i] : bounds[i + 1]]] for i in range(n_lists)]


def _centroids(matrix: np.ndarray, n_lists: int) -> np.ndarray:
    """k-means centroids from a few Lloyd rounds over a sample."""
    rng = np.random.default_rng(SEED)
    size = min(len(matrix), n_lists * SAMPLE_PER_LIST)
    sample = matrix[np.sort(rng.choice(len(matrix), size, replace=False))]
    centroids = sample[rng.choice(size, n_lists, replace=False)].copy()
    for _ in range(LLOYD_ROUNDS):
        d = -2 * sample @ centroids.T + np.einsum("ij,ij->i", centroids, centroids)
        nearest = d.argmin(axis=1)
        order = np.argsort(nearest, kind="stable")
        used, starts = np.unique(nearest[order], return_index=True)
        sums = np.add.reduceat(sample[order], starts, axis=0)
        centroids[used] = sums / np.diff(np.append(starts, size))[:, None]
    return centroids


class Components:
    """Union-find over ``n`` items, a whole array of pairs at a time: every root points
    to a smaller index, so hooking larger roots under smaller ones never makes a cycle;
    rounds repeat until every pair shares a root. ``degree`` counts each item's pairs."""

    def __init__(self, n: int):
        self.parent = np.arange(n)
        self.degree = np.zeros(n, dtype=np.int64)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        n = len(self.parent)
        self.degree += np.bincount(a, minlength=n) + np.bincount(b, minlength=n)
        while True:
            roots = self.roots()
            ra, rb = roots[a], roots[b]
            apart = ra != rb
            if not apart.any():
                return
            lo, hi = np.minimum(ra[apart], rb[apart]), np.maximum(ra[apart], rb[apart])
            np.minimum.at(self.parent, hi, lo)

    def roots(self) -> np.ndarray:
        """Compress every path: afterwards ``parent`` is each item's root."""
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                self.parent = parent
                return parent
            parent = grand

    def groups(self) -> list[np.ndarray]:
        """Every component of two or more items, as sorted index arrays."""
        roots = self.roots()
        order = np.argsort(roots, kind="stable")
        _, starts, counts = np.unique(roots[order], return_index=True, return_counts=True)
        return [order[s : s + c] for s, c in zip(starts, counts, strict=True) if c > 1]
