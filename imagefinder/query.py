"""A search's options, and how a search runs over one index.

``SearchOptions`` is what every search route and ``imagefinder search`` accept, parsed
and checked once here: a new option is a field here plus a step in ``run``. The
routes build it from their form or query fields (server/schemas.py ``SearchParams``).

A search ranks by the index's ranking vectors (augmented ones where the index has DBA),
with the query expanded (αQE) when asked; every result's ``distance`` is the L2 distance
between the query's own vector and the image's own (raw) vector, so it means the same
whatever the options: 0 is an identical picture. With expansion or DBA the order is the
re-ranked one, so distances need not increase down the list.
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
        self,
        vector: np.ndarray,
        k: int,
        exclude: Sequence[str] = (),
        augmented: bool = False,
    ) -> list[tuple[str, float]]: ...

    def vectors_of(self, ids: Sequence[str]) -> dict[str, np.ndarray]: ...

    def augmented_of(self, ids: Sequence[str]) -> dict[str, np.ndarray]: ...


MAX_K = 100
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
    """The ``k`` best (id, distance) for ``vector`` in ``store`` (see the module doc)."""
    augmented = store.dba() is not None
    query = vector
    if expand:
        query = _expanded(store, vector, exclude, augmented)
    results = store.knn(query, k, exclude=exclude, augmented=augmented)
    if query is vector and not augmented:
        return results  # ranked by the raw distance already
    raw = store.vectors_of([i for i, _ in results])
    return [(i, float(np.linalg.norm(raw[i] - vector)) if i in raw else d) for i, d in results]


def _expanded(
    store: Searchable, vector: np.ndarray, exclude: Sequence[str], augmented: bool
) -> np.ndarray:
    """αQE: ``vector`` with its nearest images added, α-weighted. Copies of the query
    (the same photo, already in the catalogue) are looked past: they add nothing."""
    n = augment.QE_NEIGHBOURS
    first = store.knn(vector, n + 2, exclude=exclude, augmented=augmented)
    raw = store.vectors_of([i for i, _ in first])
    near = [
        i for i, _ in first if i in raw and np.linalg.norm(raw[i] - vector) > augment.COPY_DISTANCE
    ][:n]
    if not near:
        return vector
    space = store.augmented_of(near) if augmented else raw
    neighbours = np.stack([space.get(i, raw[i]) for i in near])
    return augment.weighted_sum(vector, neighbours, augment.QE_ALPHA)
