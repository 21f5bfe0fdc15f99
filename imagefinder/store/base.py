"""What every index store shares: its rows, its meta, and the behaviour built on top of
the few operations each store implements in its own SQL.

An index's meta holds the schema version and the identity of its vectors (model,
weights, dimension, preprocessing): vectors of different identities never mix.
The schema migrates forward: ``migrations[i]`` takes version ``i + 1`` to ``i + 2``,
inside the write transaction that checks the version, so two processes never both
migrate. A new index is created at version 1 and migrated like any other, so a
schema change is one migration appended to the store's ``migrations``, nothing else.
"""

from __future__ import annotations

import fcntl
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, ClassVar, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np

from ..errors import IndexMismatch, StoreError
from ..metadata import Metadata, Where
from .jobtable import JobTable

METRIC = "l2"
# The meta key that turns database-side augmentation on, with its parameters
# (``n=2,alpha=3``); see augment.py.
DBA_KEY = "dba"
# Keys that must match for vectors to be comparable.
IDENTITY_KEYS = ("model", "weights", "dim", "preprocessing")


@dataclass(frozen=True)
class FileState:
    path: str
    sha256: str
    size: int
    mtime_ns: int


# What a compare-and-set write expects to find: id -> its row's state, None for no row.
Expected = Mapping[str, "FileState | None"]


def state_matches(current: FileState | None, expected: Expected, image_id: str) -> bool:
    """Whether a row (None: no row) is what ``expected`` says ``image_id``'s should be."""
    return current == expected.get(image_id)


@dataclass(frozen=True)
class Item:
    id: str
    path: str
    sha256: str
    size: int
    mtime_ns: int
    vector: np.ndarray


Row = TypeVar("Row", bound=Sequence[Any])


def keyset_pages(
    fetch: Callable[[Any, int], list[Row]], start: Any, batch: int
) -> Iterator[list[Row]]:
    """Pages of rows whose first column is an increasing key: ``fetch(after, limit)``
    returns up to ``limit`` rows with keys above ``after``. Memory is one page."""
    last = start
    while True:
        rows = fetch(last, batch)
        if not rows:
            return
        last = rows[-1][0]
        yield rows


class Store(ABC):
    """An index: ``SQLiteStore`` (one file) or ``PGStore`` (a PostgreSQL database).
    ``open_store`` picks one from a location."""

    kind: ClassVar[str]
    # What the version error tells the user to do.
    rebuild_hint: ClassVar[str]
    # migrations[i] upgrades an index from schema version i + 1 to i + 2; each takes the
    # store's connection inside the transaction that holds the schema lock.
    migrations: ClassVar[Sequence[Callable[[Any], None]]] = ()

    @classmethod
    def schema_version(cls) -> int:
        return 1 + len(cls.migrations)

    # -- what each store implements ------------------------------------------

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the index is, safe to show (no password)."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def meta(self) -> dict[str, str]:
        """The index's meta; empty if there is no index yet."""

    @abstractmethod
    def ensure_schema(self, identity: dict[str, str]) -> None:
        """Create the index for ``identity`` (model meta), or check that it matches."""

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def file_states(self) -> dict[str, FileState]: ...

    @abstractmethod
    def file_state(self, image_id: str) -> FileState | None: ...

    @abstractmethod
    def vector_of(self, image_id: str) -> np.ndarray | None: ...

    @abstractmethod
    def _item_pages(self, batch: int) -> Iterator[list[Item]]:
        """Every row, a page at a time, in the store's key order."""

    @abstractmethod
    def _nearest(self, vector: np.ndarray, fetch: int) -> list[tuple[str, float]]:
        """The ``fetch`` nearest (id, L2 distance), nearest first."""

    # Writes take an optional ``expected``: {id: the FileState read earlier, or None for
    # "no row"}. Then each row is written only if it is still in that state, checked
    # inside the write transaction (compare-and-set): a long run (extract) never
    # overwrites, resurrects or deletes what another writer changed since it looked.

    @abstractmethod
    def upsert(self, items: Iterable[Item], expected: Expected | None = None) -> int:
        """Add or replace ``items`` in one transaction. Returns how many were written."""

    @abstractmethod
    def touch(
        self,
        image_id: str,
        path: str,
        size: int,
        mtime_ns: int,
        expected: FileState | None = None,
    ) -> bool:
        """Record a new path/mtime for a file whose content did not change (only if the row
        is still ``expected``, when given). True if it was written."""

    @abstractmethod
    def delete(self, ids: Iterable[str], expected: Expected | None = None) -> int:
        """Delete ``ids`` (with ``expected``: only rows still in that state). Returns how many."""

    @contextmanager
    def write_lock(self, key: str) -> Iterator[None]:
        """Serialise writers of ``key`` across threads and processes (the API's writes:
        placing a file and upserting its row). A file lock beside the index by default;
        a store shared between machines overrides it with a lock in the database."""
        lock_path = self.lock_file()
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        # A fresh open file per holder: flock() then also excludes threads of this process.
        with open(lock_path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def lock_file(self) -> Path:
        raise NotImplementedError

    @abstractmethod
    def set_meta(self, key: str, value: str | None) -> None:
        """Set (or with None, remove) one meta key that is not part of the identity."""

    # Database-side augmentation (augment.py): while the meta has ``dba``, each image also
    # has an augmented vector, kept beside its raw one by every write (a new or replaced
    # image starts with its raw vector). Searches re-rank candidates by them (query.py).

    @abstractmethod
    def set_dba(self, spec: str | None) -> None:
        """Turn DBA on (``spec`` as ``n=2,alpha=3``; every augmented vector starts as a
        copy of the raw one) or off (None), meta and vectors in one transaction."""

    @abstractmethod
    def write_augmented(self, rows: Iterable[tuple[str, np.ndarray]]) -> int:
        """Replace the augmented vectors of these ids (ids gone meanwhile are skipped)."""

    @abstractmethod
    def augmented_of(self, ids: Sequence[str]) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def jobs(self) -> JobTable:
        """The index's ingestion jobs (jobtable.py)."""

    # Metadata (metadata.py) and content hashes: what results show beside each id, what
    # filters select on, and how exact duplicates are recognised.

    @abstractmethod
    def metadata_of(self, ids: Sequence[str]) -> dict[str, Metadata]:
        """The metadata of those ``ids`` that have any."""

    @abstractmethod
    def set_metadata(self, rows: Iterable[tuple[str, Metadata]]) -> int:
        """Replace each id's metadata in one transaction (an empty dict clears it); ids
        not in the index are skipped. Returns how many ids were written."""

    @abstractmethod
    def hashes_of(self, ids: Sequence[str]) -> dict[str, str]:
        """The content hash (sha256) of those ``ids`` that exist."""

    @abstractmethod
    def ids_with_hashes(self, hashes: Sequence[str]) -> dict[str, list[str]]:
        """The ids whose file has each content hash (hashes nobody has are left out)."""

    @abstractmethod
    def hash_groups(self) -> list[list[str]]:
        """Every set of two or more ids with the same content hash, ids sorted."""

    @abstractmethod
    def _nearest_where(
        self, vector: np.ndarray, fetch: int, where: Where
    ) -> list[tuple[str, float]]:
        """The ``fetch`` nearest (id, L2 distance) among the images matching ``where``
        (never fewer while that many match), nearest first."""

    def begin_bulk(self, expected: int) -> None:  # noqa: B027 (optional hook)
        """``expected`` rows are about to be written: a store may drop its ANN index."""

    def end_bulk(self) -> None:  # noqa: B027 (optional hook)
        """The bulk write is over: (re)build whatever ``begin_bulk`` dropped."""

    def warm(self) -> int:
        """Read what searches read into memory (a server starting up), so the first
        searches do not pay for disk reads; returns the bytes read."""
        return 0

    # -- shared behaviour -----------------------------------------------------

    def path_of(self, image_id: str) -> str | None:
        state = self.file_state(image_id)
        return state.path if state else None

    def iter_items(self, batch: int = 1000) -> Iterator[list[Item]]:
        """Yield lists of whole rows (for copying an index)."""
        return self._item_pages(batch)

    def iter_vectors(self, batch: int = 1000) -> Iterator[list[tuple[str, str, np.ndarray]]]:
        """Yield lists of (id, path, vector)."""
        for items in self._item_pages(batch):
            yield [(it.id, it.path, it.vector) for it in items]

    def vectors_of(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The raw vectors of those ``ids`` that exist."""
        found = {i: self.vector_of(i) for i in dict.fromkeys(ids)}
        return {i: v for i, v in found.items() if v is not None}

    def dba(self) -> str | None:
        """The index's DBA setting (``n=2,alpha=3``), or None when it has none."""
        return self.meta().get(DBA_KEY)

    def knn(
        self, vector: np.ndarray, k: int, exclude: Sequence[str] = (), where: Where = ()
    ) -> list[tuple[str, float]]:
        """The ``k`` nearest ids to ``vector`` by L2 distance, nearest first, leaving out
        the ids in ``exclude``, among the images whose metadata matches ``where`` (all of
        its column=value pairs). ``k`` is the depth: a page at an offset asks for
        offset + page size, and the approximate paths widen their candidate lists with
        it, so deep pages keep their recall."""
        skip = set(exclude)
        fetch = k + len(skip)
        rows = self._nearest_where(vector, fetch, where) if where else self._nearest(vector, fetch)
        return [(i, d) for i, d in rows if i not in skip][:k]

    def check_existing(self, existing: dict[str, str], identity: dict[str, str]) -> None:
        """An index exists: refuse to write ``identity``'s vectors into it if they differ."""
        self.check_version(existing)
        check_compatible(existing, identity, self.location)

    def check_version(self, meta: dict[str, str]) -> int:
        """The index's schema version; an error if this ImageFinder cannot read it."""
        version = int(meta.get("schema_version", "0"))
        if not 1 <= version <= self.schema_version():
            raise StoreError(
                f"{self.location} has schema version {version}, this ImageFinder "
                f"reads version {self.schema_version()}; {self.rebuild_hint}"
            )
        return version

    def pending_migrations(self, meta: dict[str, str]) -> Sequence[Callable[[Any], None]]:
        return self.migrations[self.check_version(meta) - 1 :]


def check_compatible(existing: dict[str, str], identity: dict[str, str], where: str) -> None:
    """Refuse to mix vectors from different models, weights or preprocessing."""
    for key in IDENTITY_KEYS:
        if key in identity and existing.get(key) != identity[key]:
            raise IndexMismatch(
                f"{where} was built with {key}={existing.get(key)!r}, but this run uses "
                f"{key}={identity[key]!r}; vectors from different models cannot be mixed. "
                f"Use --model {existing.get('model')} (and the same weights), or a new --db path"
            )


def new_meta(identity: dict[str, str], version: int) -> dict[str, str]:
    """The meta of a new index at schema ``version``. Keys already in ``identity`` win, so
    a copied index keeps its original meta (created_at included), but not its version."""
    return {
        "metric": METRIC,
        "normalized": "l2",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **identity,
        "schema_version": str(version),
    }


def is_postgres(location: str) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


# Query parameters of a libpq URL that are secrets, or paths to them.
SECRET_PARAMS = frozenset(
    {
        "password",
        "sslpassword",
        "passfile",
        "sslkey",
        "sslcert",
        "sslrootcert",
        "sslcrl",
        "sslcrldir",
        "service",
        "servicefile",
        "krbsrvname",
        "gsslib",
    }
)
MASK = "***"


def _secret_param(name: str) -> bool:
    name = name.lower()
    return name in SECRET_PARAMS or any(w in name for w in ("pass", "secret", "token", "key"))


def display_location(location: str) -> str:
    """``location`` safe to print or log: a PostgreSQL URL keeps its user, host and
    database, but its password and every secret query parameter (``password``,
    ``sslpassword``, ``passfile``, ``sslkey``...) become ``***``."""
    text = str(location)
    if not is_postgres(text):
        return text
    try:
        parts = urlsplit(text)
        host = parts.netloc.rpartition("@")[2]
        if "@" in parts.netloc:
            user = parts.netloc.rpartition("@")[0].partition(":")[0]
            password = ":" + MASK if ":" in parts.netloc.rpartition("@")[0] else ""
            host = f"{user}{password}@{host}"
        query = "&".join(
            f"{name}={MASK}" if _secret_param(unquote(name)) else f"{name}={value}"
            for name, _, value in (p.partition("=") for p in parts.query.split("&") if p)
        )
        return urlunsplit(parts._replace(netloc=host, query=query))
    except ValueError:  # not even a URL: show nothing of it
        return "postgresql://" + MASK


def public_location(location: str) -> str:
    """``location`` as an anonymous client may see it: a SQLite index by its file name,
    a PostgreSQL one as ``postgresql://host:port/database`` (no user, no parameters: a
    ``host=`` parameter may be a socket folder)."""
    text = str(location)
    if not is_postgres(text):
        return PurePath(text).name or text
    try:
        parts = urlsplit(text)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"
    except ValueError:
        return "postgresql://" + MASK
