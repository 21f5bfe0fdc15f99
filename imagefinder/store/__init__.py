"""Index stores: a SQLite file (``sqlite``) or a PostgreSQL database (``postgres``),
behind one ``Store`` interface (``base``). ``open_store`` picks one from a location."""

from __future__ import annotations

from ..errors import StoreError
from .base import FileState, Item, Store, display_location, is_postgres, public_location
from .sqlite import SQLiteStore

__all__ = [
    "FileState",
    "Item",
    "Store",
    "display_location",
    "is_postgres",
    "open_store",
    "public_location",
]


def open_store(
    location: str,
    *,
    ef_search: int | None = None,
    exact: bool = False,
    nprobe: int | None = None,
    create: bool = True,
) -> Store:
    """The store for ``location``: a ``postgresql://`` URL means PostgreSQL with pgvector
    (searched through HNSW with ``ef_search`` candidates, or exhaustively if ``exact``);
    anything else is the path of a SQLite file (exact below ``ivf.MIN_ROWS`` vectors,
    then the ``ef_search`` nearest int8 codes of the ``nprobe`` nearest inverted lists,
    re-ranked exactly, unless ``exact``). None means each store's own default; ``nprobe``
    applies to SQLite only. ``create=False`` (commands that only read) never creates a
    SQLite file that is not there."""
    if is_postgres(location):
        try:
            from .postgres import DEFAULT_EF_SEARCH, PGStore
        except ImportError as e:
            raise StoreError(
                f"a postgresql:// index needs psycopg ({e}); install it with: "
                "pip install 'imagefinder[postgres]'"
            ) from None
        return PGStore(str(location), ef_search=ef_search or DEFAULT_EF_SEARCH, exact=exact)
    tuning = {
        name: value for name, value in (("ef_search", ef_search), ("nprobe", nprobe)) if value
    }
    return SQLiteStore(location, exact=exact, create=create, **tuning)
