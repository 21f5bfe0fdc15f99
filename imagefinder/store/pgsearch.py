"""The SQL of a PostgreSQL KNN: approximate through HNSW, or exact, with or without a
metadata filter, at any depth.

Approximate: the HNSW index yields candidates (``ef_search`` for up to
``RESULTS_PER_EF`` results, proportionally more for deeper searches, never fewer than
asked), re-ranked by exact float32 distance, which also undoes halfvec rounding. A
search deeper than ``MAX_CANDIDATES`` candidates serve (a page far down) scans exactly.
Past pgvector's cap on ``hnsw.ef_search``, and with a filter, the scan is iterative
(pgvector 0.8's ``hnsw.iterative_scan``): it goes on until it has yielded that many
rows that pass. Sequential scans are ruled out because vectors live out of line
(TOAST) and the planner, not counting that, would scan a large table rather than use
the index; with a filter it may still choose the metadata's GIN index and an exact sort.

Exact: every (matching) row's distance, no HNSW.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..metadata import Where
from .pg_metadata import containment
from .pgnames import IMAGES

MAX_EF_SEARCH = 1000  # pgvector's upper bound for hnsw.ef_search
# pgvector indexes at most this many dimensions of ``vector``; wider ones as halfvec.
MAX_VECTOR_INDEX_DIM = 2000
# ``ef_search`` candidates serve up to this many results; a deeper search (a page at an
# offset) takes proportionally more (bench/paging.py).
RESULTS_PER_EF = 10
MAX_CANDIDATES = 4096
# Rows an iterative scan may visit before it stops (pgvector's own default is 20,000):
# a filter matching 1% of a large index needs k / 1% of them. A scan that stops short
# while more images match is redone exactly (PGStore._nearest_where).
MAX_SCAN_TUPLES = 200_000


def indexed(dim: int, value: str) -> str:
    """The expression the HNSW index covers, applied to ``value``."""
    return value if dim <= MAX_VECTOR_INDEX_DIM else f"({value})::halfvec({dim})"


def wanted_candidates(fetch: int, ef_search: int) -> int:
    """HNSW candidates for a search of ``fetch`` results: ``ef_search`` per
    ``RESULTS_PER_EF`` of them."""
    return math.ceil(ef_search * max(1.0, fetch / RESULTS_PER_EF))


def approximate(fetch: int, ef_search: int) -> bool:
    """Whether HNSW serves a search of ``fetch`` results. Deeper than MAX_CANDIDATES
    candidates at that ratio, capping them lost recall (0.76 at depth 1000 on 20k
    vectors) and cost more than scanning exactly (bench/results/paging-20000.md), so
    such a search scans exactly, as SQLite's does past its pre-selection."""
    return wanted_candidates(fetch, ef_search) <= MAX_CANDIDATES


def statements(
    query: np.ndarray,
    fetch: int,
    where: Where = (),
    dim: int | None = None,
    ef_search: int = 0,
) -> tuple[list[str], str, dict[str, Any]]:
    """Settings, then the query and its parameters. ``dim`` None: exact."""
    params: dict[str, Any] = {"q": query, "fetch": fetch}
    where_sql = ""
    if where:
        where_sql = "WHERE metadata @> %(where)s::jsonb"
        params["where"] = containment(where)
    if dim is None:
        setup = ["SET LOCAL enable_indexscan = off"]
        sql = (
            f"SELECT id, embedding <-> %(q)b AS distance FROM {IMAGES} {where_sql} "
            "ORDER BY distance, id LIMIT %(fetch)s"
        )
        return setup, sql, params
    if not approximate(fetch, ef_search):
        return statements(query, fetch, where)
    candidates = max(fetch, wanted_candidates(fetch, ef_search))
    setup = [
        f"SET LOCAL hnsw.ef_search = {min(candidates, MAX_EF_SEARCH)}",
        "SET LOCAL enable_seqscan = off",
    ]
    if where or candidates > MAX_EF_SEARCH:
        setup += [
            "SET LOCAL hnsw.iterative_scan = relaxed_order",
            f"SET LOCAL hnsw.max_scan_tuples = {MAX_SCAN_TUPLES}",
        ]
    order = f"{indexed(dim, 'embedding')} <-> {indexed(dim, '%(q)b')}"
    sql = f"""SELECT id, embedding <-> %(q)b AS distance FROM (
                  SELECT id, embedding FROM {IMAGES} {where_sql}
                  ORDER BY {order} LIMIT %(candidates)s
              ) AS c
              ORDER BY distance, id LIMIT %(fetch)s"""
    params["candidates"] = candidates
    return setup, sql, params
