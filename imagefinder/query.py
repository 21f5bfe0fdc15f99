"""A search's options, and how a search runs over one index.

``SearchOptions`` is what every search route and ``imagefinder search`` accept, parsed
and checked once here: a new option is a field here plus a step in ``run``. The
routes build it from their form or query fields (server/schemas.py ``SearchParams``).

A search ranks by the index's ranking vectors (augmented ones where the index has DBA),
with the query expanded (αQE) when asked; every result's ``distance`` is the L2 distance
between the query's own vector and the image's own (raw) vector, so it means the same
whatever the options: 0 is an identical picture, and identical pictures come first.
After them the order is the re-ranked one, so distances need not increase down the
list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from . import augment
from .errors import InvalidRequest


class Searchable(Protocol):
    """What a search needs of an index: a ``Store``, or evaluate.py's in-memory one."""

    def dba(self) -> str | None: ...

    def knn(
        self, vector: np.ndarray, k: int, exclude: Sequence[str] = ()
    ) -> list[tuple[str, float]]: ...

    def vectors_of(self, ids: Sequence[str]) -> dict[str, np.ndarray]: ...

    def augmented_of(self, ids: Sequence[str]) -> dict[str, np.ndarray]: ...


MAX_K = 100
# With DBA, a search takes this many candidates beyond k from the raw vectors' index (its
# fast path: SQLite's binary pre-selection, pgvector's HNSW) and re-ranks them by their
# augmented vectors. An augmented vector stays near its raw one, so the true top k are
# among them (recall: bench/results/quality.md); an exact scan of the augmented vectors
# cost 9x the KNN on 20k vectors.
DBA_CANDIDATES = 100
# Characters in a text query: CLIP reads 77 tokens at most, so more only costs time.
MAX_TEXT = 1000


@dataclass(frozen=True)
class SearchOptions:
    k: int = 3
    # αQE: one more KNN with the query moved toward its nearest images. None: the
    # server's default (IMAGEFINDER_EXPAND).
    expand: bool | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise InvalidRequest(f"k must be between 1 and {MAX_K}, not {self.k}")


def check_text(text: str) -> str:
    """A text query, trimmed; an error if it is empty or too long."""
    text = text.strip()
    if not text:
        raise InvalidRequest("the text query is empty; say what to look for, e.g. q=a red car")
    if len(text) > MAX_TEXT:
        raise InvalidRequest(f"the text query is over {MAX_TEXT} characters")
    return text


def run(
    store: Searchable,
    vector: np.ndarray,
    k: int,
    expand: bool,
    exclude: Sequence[str] = (),
) -> list[tuple[str, float]]:
    """The ``k`` best (id, distance) for ``vector`` in ``store`` (see the module doc).

    Plain: one KNN over the raw vectors. Re-ranked (αQE, or an index with DBA): a first
    KNN over the raw vectors finds the query's copies (the same picture, already in the
    catalogue: they lead the results, at distance ~0, whatever the re-ranking says) and
    αQE's neighbours, whose ranking vectors move the query; a second KNN ranks by the
    ranking vectors (with DBA: raw-index candidates re-ranked by augmented vectors). Choosing the neighbours by their raw vectors scored a little higher
    than by their augmented ones (bench/results/quality.md).
    """
    augmented = store.dba() is not None
    if not expand and not augmented:
        return store.knn(vector, k, exclude=exclude)
    n = augment.QE_NEIGHBOURS
    first = store.knn(vector, n + 2, exclude=exclude)
    copies = [(i, d) for i, d in first if d < augment.COPY_DISTANCE]
    ranking_query = vector
    near = [i for i, d in first if d >= augment.COPY_DISTANCE][:n]
    if expand and near:
        space = _ranking_vectors(store, near, augmented)
        neighbours = np.stack([space[i] for i in near if i in space])
        ranking_query = augment.weighted_sum(vector, neighbours, augment.QE_ALPHA)
    skip = (*exclude, *(i for i, _ in copies))
    ranked = _rank(store, ranking_query, k - len(copies), skip, augmented)
    raw = store.vectors_of([i for i, _ in ranked])
    rest = [(i, float(np.linalg.norm(raw[i] - vector)) if i in raw else d) for i, d in ranked]
    return (copies + rest)[:k]


def _ranking_vectors(store: Searchable, ids: Sequence[str], augmented: bool) -> dict:
    """The vectors ``ids`` rank by: augmented with DBA (raw for an image written since its
    last recompute, which has none yet), else raw."""
    if not augmented:
        return store.vectors_of(ids)
    found = store.augmented_of(ids)
    missing = [i for i in ids if i not in found]
    return {**store.vectors_of(missing), **found} if missing else found


def _rank(
    store: Searchable, query: np.ndarray, k: int, exclude: Sequence[str], augmented: bool
) -> list[tuple[str, float]]:
    """The ``k`` nearest to ``query`` by ranking vector (distances to those vectors)."""
    if k <= 0:
        return []
    if not augmented:
        return store.knn(query, k, exclude)
    candidates = [i for i, _ in store.knn(query, k + DBA_CANDIDATES, exclude)]
    space = _ranking_vectors(store, candidates, augmented)
    scored = [(i, float(np.linalg.norm(space[i] - query))) for i in candidates if i in space]
    return sorted(scored, key=lambda pair: pair[1])[:k]
