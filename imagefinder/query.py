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

Paging: a page is the slice ``[offset, offset + k)`` of that order, searched to the
depth ``offset + k`` (at most ``MAX_DEPTH``), so page after page continues one list.
``max_distance`` then drops the page's results farther than it (by that same raw
distance), so fewer than k may come back. A search looks one result past its page, so
``next_offset`` is null exactly when nothing follows. A filter (``where``, metadata column=value pairs) applies inside every KNN
the search runs, so k results come back when k matching images exist.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from . import augment
from .errors import InvalidRequest
from .metadata import Where


class Searchable(Protocol):
    """What a search needs of an index: a ``Store``, or evaluate.py's in-memory one."""

    def dba(self) -> str | None: ...

    def knn(
        self, vector: np.ndarray, k: int, exclude: Sequence[str] = (), where: Where = ()
    ) -> list[tuple[str, float]]: ...

    def vectors_of(self, ids: Sequence[str]) -> dict[str, np.ndarray]: ...

    def augmented_of(self, ids: Sequence[str]) -> dict[str, np.ndarray]: ...


MAX_K = 100
# How deep paging reaches: k + offset at most.
MAX_DEPTH = 1000
# Query images in one search ("more like these").
MAX_QUERIES = 10
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
    # Results before this page (paging), and the farthest raw distance a result may be.
    offset: int = 0
    max_distance: float | None = None
    # Metadata column=value pairs every result must have (metadata.parse_filter).
    where: Where = ()

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise InvalidRequest(f"k must be between 1 and {MAX_K}, not {self.k}")
        if self.offset < 0:
            raise InvalidRequest(f"offset must be 0 or more, not {self.offset}")
        if self.k + self.offset > MAX_DEPTH:
            raise InvalidRequest(
                f"k + offset must be at most {MAX_DEPTH}, not {self.k + self.offset}: "
                "results are ranked that deep at most"
            )
        if self.max_distance is not None and not (
            math.isfinite(self.max_distance) and self.max_distance >= 0
        ):
            raise InvalidRequest(f"max_distance must be 0 or more, not {self.max_distance}")

    @property
    def lookahead(self) -> int:
        """How many results to search for: one more than a page, to learn whether there
        is a next one (none past MAX_DEPTH)."""
        return self.k + 1 if self.offset + self.k < MAX_DEPTH else self.k

    def next_offset(self, more: bool) -> int | None:
        """The offset of the next page: None when there are no ``more`` results, or the
        next page would pass MAX_DEPTH at this k."""
        following = self.offset + self.k
        if not more or following + self.k > MAX_DEPTH:
            return None
        return following


def combine(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Several query images as one query: the normalised mean of their vectors, which
    lies nearest to what they share."""
    if len(vectors) == 1:
        return np.asarray(vectors[0], dtype=np.float32)
    return augment.normalise(np.mean(np.stack(vectors), axis=0))


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
    *,
    offset: int = 0,
    where: Where = (),
    max_distance: float | None = None,
) -> list[tuple[str, float]]:
    """The ``k`` best (id, distance) for ``vector`` in ``store`` after the first
    ``offset``, among the images matching ``where``, none farther than
    ``max_distance`` (see the module doc).

    Plain: one KNN over the raw vectors. Re-ranked (αQE, or an index with DBA): a first
    KNN over the raw vectors finds the query's copies (the same picture, already in the
    catalogue: they lead the results, at distance ~0, whatever the re-ranking says) and
    αQE's neighbours, whose ranking vectors move the query; a second KNN ranks by the
    ranking vectors (with DBA: raw-index candidates re-ranked by augmented vectors). Choosing the neighbours by their raw vectors scored a little higher
    than by their augmented ones (bench/results/quality.md).
    """
    depth = offset + k
    augmented = store.dba() is not None
    if not expand and not augmented:
        page = store.knn(vector, depth, exclude, where)[offset:]
    else:
        page = _reranked(store, vector, depth, expand, augmented, exclude, where)[offset:]
        raw = store.vectors_of([i for i, _ in page])
        page = [(i, float(np.linalg.norm(raw[i] - vector)) if i in raw else d) for i, d in page]
    if max_distance is not None:
        page = [(i, d) for i, d in page if d <= max_distance]
    return page


def _reranked(
    store: Searchable,
    vector: np.ndarray,
    depth: int,
    expand: bool,
    augmented: bool,
    exclude: Sequence[str],
    where: Where,
) -> list[tuple[str, float]]:
    """The re-ranked order to ``depth``: the query's copies, then the rest by ranking
    vector (distances here are to the ranking vectors; ``run`` replaces them)."""
    n = augment.QE_NEIGHBOURS
    first = store.knn(vector, n + 2, exclude, where)
    copies = [(i, d) for i, d in first if d < augment.COPY_DISTANCE]
    ranking_query = vector
    near = [i for i, d in first if d >= augment.COPY_DISTANCE][:n]
    if expand and near:
        space = _ranking_vectors(store, near, augmented)
        neighbours = np.stack([space[i] for i in near if i in space])
        ranking_query = augment.weighted_sum(vector, neighbours, augment.QE_ALPHA)
    skip = (*exclude, *(i for i, _ in copies))
    return (copies + _rank(store, ranking_query, depth - len(copies), skip, augmented, where))[
        :depth
    ]


def _ranking_vectors(store: Searchable, ids: Sequence[str], augmented: bool) -> dict:
    """The vectors ``ids`` rank by: augmented with DBA (raw for an image written since its
    last recompute, which has none yet), else raw."""
    if not augmented:
        return store.vectors_of(ids)
    found = store.augmented_of(ids)
    missing = [i for i in ids if i not in found]
    return {**store.vectors_of(missing), **found} if missing else found


def _rank(
    store: Searchable,
    query: np.ndarray,
    k: int,
    exclude: Sequence[str],
    augmented: bool,
    where: Where = (),
) -> list[tuple[str, float]]:
    """The ``k`` nearest to ``query`` by ranking vector (distances to those vectors)."""
    if k <= 0:
        return []
    if not augmented:
        return store.knn(query, k, exclude, where)
    candidates = [i for i, _ in store.knn(query, k + DBA_CANDIDATES, exclude, where)]
    space = _ranking_vectors(store, candidates, augmented)
    scored = [(i, float(np.linalg.norm(space[i] - query))) for i in candidates if i in space]
    return sorted(scored, key=lambda pair: pair[1])[:k]
