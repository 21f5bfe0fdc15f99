"""An index with its model: what searches and writes need, for the server and the CLI.

Which model and weights an index uses is decided here, in ``choose_model``, for
every caller: the API's searches and writes, and the CLI's ``extract`` and ``search``.
A server serves one or more indexes (``indexes.Indexes``), one ``Service`` each.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL.Image import Image as PILImage

from . import augment, duplicates, images, query
from .config import DEFAULT_INDEX, Settings
from .errors import (
    IndexNotReady,
    InvalidRequest,
    StoreError,
    TextNotSupported,
    unknown_id,
)
from .model.registry import MODELS, embeds_text
from .query import SearchOptions
from .redact import redact
from .store import Store, display_location, open_store, public_location
from .store.base import check_compatible

if TYPE_CHECKING:
    from .model.embedder import Embedder

# How long GET /duplicates reuses a report (see Service.duplicates).
DUPLICATES_TTL = 60.0
log = logging.getLogger("imagefinder")


def build_command(settings: Settings, location: str | None = None) -> str:
    # A PostgreSQL password never reaches a client.
    db = display_location(location or settings.location)
    return f"python extract_image_features.py --folder {settings.images_dir} --db {db}"


def weights_for_index(meta: dict[str, str], settings: Settings) -> str | None:
    """The weights argument that reproduces the index's vectors."""
    recorded = meta.get("weights", "")
    if recorded.startswith("sha256:"):
        return settings.weights or meta.get("weights_path")
    if recorded in ("", "bundled"):
        return None
    return recorded


@dataclass(frozen=True)
class Query:
    """What a search searches with: one vector, and what recognises the query's copies
    among the results (its images' content hashes and own vectors; none for a text)."""

    vector: np.ndarray
    hashes: tuple[str, ...] = ()
    vectors: tuple[np.ndarray, ...] = ()
    # Ids never returned: the query images themselves, when they are catalogue images.
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class Found:
    """One page of results, and what ``response`` needs to describe them."""

    results: list[tuple[str, float]]
    next_offset: int | None
    query: Query


class Decoder(Protocol):
    """Where pictures are decoded: ``images`` itself (in this process), or the server's
    worker processes (``server/decoders.py``)."""

    def load_rgb(self, source: Any, max_pixels: int, min_side: int | None = None) -> PILImage: ...

    def probe(self, source: Any, max_pixels: int) -> str: ...


class Service:
    def __init__(
        self,
        settings: Settings,
        store: Store | None = None,
        *,
        name: str = DEFAULT_INDEX,
        location: str | None = None,
    ):
        self.settings = settings
        self.name = name
        self.location = location or settings.location
        self.store = store or open_store(
            self.location,
            ef_search=settings.ef_search,
            exact=settings.exact,
            nprobe=settings.nprobe,
        )
        self.embedder: Embedder | None = None
        self.decoder: Decoder = images
        self._load_lock = threading.Lock()
        # Duplicate reports by level: (when, image count, report).
        self._duplicates: dict[str, tuple[float, int, duplicates.Report]] = {}

    def close(self) -> None:
        self.store.close()

    # -- which model -----------------------------------------------------------

    def choose_model(
        self, model: str | None = None, weights: str | None = None
    ) -> tuple[str, str | None]:
        """The model name and weights argument for this index: its own once it exists
        (an explicit ``model`` must match it: checked here, before anything loads),
        else ``model``/``weights``, else the settings."""
        existing = self.store.meta()
        if not existing:
            return model or self.settings.model, weights or self.settings.weights
        if model is not None:
            check_compatible(existing, {"model": model}, self.store.location)
        if weights is None:
            weights = weights_for_index(existing, self.settings)
        return existing["model"], weights

    def load_writer(
        self,
        model: str | None = None,
        weights: str | None = None,
        calibration: Sequence[str | Path] = (),
    ) -> Embedder:
        """The model that writes into this index (``extract``)."""
        from .model.embedder import load_embedder

        name, weights = self.choose_model(model, weights)
        s = self.settings
        return load_embedder(name, weights, s.precision, s.threads, calibration)

    def load_model(self) -> Embedder | None:
        """Load the model the index records (once). None if there is no index yet."""
        if self.embedder is not None:
            return self.embedder
        with self._load_lock:
            if self.embedder is None:
                meta = self.store.meta()
                if not meta:
                    return None
                embedder = self.load_writer()
                if embedder.weights_id != meta.get("weights"):
                    raise StoreError(
                        f"the index was built with weights {meta.get('weights')}, but the "
                        f"loaded weights are {embedder.weights_id}; set IMAGEFINDER_WEIGHTS "
                        "to the file the index was built with"
                    )
                self.embedder = embedder
        return self.embedder

    def ensure_index(self) -> Embedder:
        """The model for API writes: the index's own or, when there is no index yet, the
        configured one (IMAGEFINDER_MODEL, IMAGEFINDER_WEIGHTS), creating the index for it."""
        if not self.store.meta():
            with self._load_lock:
                # An extraction may have created the index meanwhile: then its model wins.
                if not self.store.meta():
                    writer = self.embedder or self.load_writer()
                    self.store.ensure_schema(writer.meta())
                    if self.settings.dba:
                        augment.set_enabled(self.store, True)
                    self.embedder = writer
        embedder = self.load_model()
        assert embedder is not None
        return embedder

    # -- searching ---------------------------------------------------------------

    def ready(self) -> tuple[Embedder, Store]:
        """The model and store, or an error naming the command that builds the index."""
        self.require_index()
        embedder = self.load_model()
        assert embedder is not None
        return embedder, self.store

    def require_index(self) -> Store:
        """The store if it holds vectors (no model needed), else an error naming the
        build command."""
        count = self.store.count()
        if count == 0:
            state = "empty" if self.store.meta() else "missing"
            raise IndexNotReady(
                f"the index {self.store.location} is {state}; build it with: "
                f"{build_command(self.settings, self.location)}",
                code=f"index_{state}",
            )
        return self.store

    def embed_upload(self, data: bytes, embedder: Embedder | None = None) -> np.ndarray:
        """Bytes of any supported image -> one vector. Raises ImageError."""
        embedder = embedder or self.ready()[0]
        img = self.decoder.load_rgb(data, self.settings.max_pixels, min_side=embedder.min_side)
        return embedder.embed_tensors(embedder.preprocess(img)[None])[0]

    def embed_text(self, text: str) -> np.ndarray:
        """A text query -> one vector in the index's space. Raises TextNotSupported."""
        text = query.check_text(text)
        model = self.require_index().meta().get("model")
        if not embeds_text(model):
            choices = ", ".join(n for n, spec in MODELS.items() if spec.text)
            raise TextNotSupported(
                f"the index {self.name!r} holds {model} vectors, which have no text "
                f"counterpart; text search needs an index built with --model {choices}"
            )
        embedder = self.ready()[0]
        return embedder.embed_texts([text])[0]

    def search_vector(
        self, vector: np.ndarray, options: SearchOptions, exclude: Sequence[str] = ()
    ) -> list[tuple[str, float]]:
        return self.search(Query(vector, exclude=tuple(exclude)), options).results

    def search(self, q: Query, options: SearchOptions) -> Found:
        expand = self.settings.expand if options.expand is None else options.expand
        results = query.run(
            self.store,
            q.vector,
            options.lookahead,
            expand,
            q.exclude,
            offset=options.offset,
            where=options.where,
            max_distance=options.max_distance,
        )
        more = len(results) > options.k
        return Found(results[: options.k], options.next_offset(more), q)

    def search_bytes(self, data: bytes, options: SearchOptions) -> Found:
        return self.search_uploads([data], options)

    def search_uploads(self, uploads: Sequence[bytes], options: SearchOptions) -> Found:
        """Search with one image, or several combined ("more like these": the normalised
        mean of their vectors). Several: those that are catalogue images (the same file
        content) are left out of the results, being the query itself."""
        if not 1 <= len(uploads) <= query.MAX_QUERIES:
            raise InvalidRequest(
                f"send between 1 and {query.MAX_QUERIES} images, not {len(uploads)}"
            )
        embedder = self.ready()[0]
        vectors = tuple(self.embed_upload(data, embedder) for data in uploads)
        hashes = tuple(hashlib.sha256(data).hexdigest() for data in uploads)
        exclude: tuple[str, ...] = ()
        if len(uploads) > 1:
            own = self.store.ids_with_hashes(hashes)
            exclude = tuple(i for ids in own.values() for i in ids)
        return self.search(Query(query.combine(vectors), hashes, vectors, exclude), options)

    def search_text(self, text: str, options: SearchOptions) -> Found:
        return self.search(Query(self.embed_text(text)), options)

    def search_id(self, image_id: str, options: SearchOptions) -> Found:
        _, store = self.ready()
        vector = store.vector_of(image_id)
        if vector is None:
            raise unknown_id(image_id)
        digest = store.hashes_of([image_id]).get(image_id)
        hashes = (digest,) if digest else ()
        return self.search(Query(vector, hashes, (vector,), (image_id,)), options)

    def response(self, found: Found) -> dict[str, Any]:
        """A search's answer, as the API sends it and ``search --json`` prints it: each
        result with its metadata and its ``match`` to the query (``exact``: the same
        file content; ``near``: within the model's calibrated near-duplicate distance of
        a query image; else null)."""
        meta = self.store.meta()
        ids = [i for i, _ in found.results]
        metadata = self.store.metadata_of(ids)
        q = found.query
        hashes = self.store.hashes_of(ids) if q.hashes else {}
        near = duplicates.near_distance(meta) if q.vectors else None
        closest = {i: d for i, d in found.results}
        if near is not None and len(q.vectors) > 1:
            # Near to one of the query images, not to their mean.
            raw = self.store.vectors_of(ids)
            closest = {
                i: min(float(np.linalg.norm(raw[i] - v)) for v in q.vectors) if i in raw else d
                for i, d in found.results
            }
        return {
            "model": meta.get("model", ""),
            "metric": meta.get("metric", ""),
            "results": [
                {
                    "id": i,
                    "distance": d,
                    "match": duplicates.match(closest[i], hashes.get(i) in q.hashes, near),
                    "metadata": metadata.get(i, {}),
                }
                for i, d in found.results
            ],
            "next_offset": found.next_offset,
        }

    def cached_duplicates(self, level: str) -> duplicates.Report | None:
        """The report at ``level`` if one was made in the last DUPLICATES_TTL seconds and
        the index still holds as many images; refuses a level the index's model has no
        distance for (NotCalibrated) first."""
        duplicates.level_distance(self.require_index().meta(), level)
        cached = self._duplicates.get(level)
        if cached is None or time.monotonic() - cached[0] >= DUPLICATES_TTL:
            return None
        return cached[2] if cached[1] == self.store.count() else None

    def duplicate_report(self, level: str) -> duplicates.Report:
        """The index's duplicate groups at ``level``, for the API: the cached report, or
        a new one (a pass reads every vector: tens of seconds and N x dim x 4 bytes at
        100k images, so the server runs one at a time: server/duplicates.py)."""
        report = self.cached_duplicates(level)
        if report is None:
            count = self.store.count()
            report = duplicates.find(self.store, level)
            self._duplicates[level] = (time.monotonic(), count, report)
        return report

    def public_health(self) -> dict[str, Any]:
        """``health()`` as an anonymous client may see it: the index by its file name (or
        a server URL's host and database), no paths or credentials in ``detail``."""
        answer = self.health()
        answer["index"] = public_location(self.store.location)
        if answer.get("detail"):
            answer["detail"] = redact(answer["detail"], self.settings)
        return answer

    def health(self) -> dict[str, Any]:
        try:
            meta = self.store.meta()
            count = self.store.count() if meta else 0
        except StoreError as e:
            return {"status": "error", "detail": str(e), "index": self.store.location}
        return {
            "status": "ok" if count else ("empty" if meta else "missing"),
            "model": meta.get("model"),
            "metric": meta.get("metric"),
            "dim": int(meta["dim"]) if meta.get("dim") else None,
            "vectors": count,
            "index": self.store.location,
            "model_loaded": self.embedder is not None,
            "text": embeds_text(meta.get("model")),
            "dba": bool(meta.get("dba")),
        }

    # -- writes ----------------------------------------------------------------

    def after_write(self, ids: Sequence[str], near: set[str]) -> None:
        """Keep DBA correct after an API write of ``ids``: ``near`` is the neighbourhood
        of the vectors the write replaced or removed (``neighbourhood``)."""
        if self.store.dba() is None:
            return
        vectors = self.store.vectors_of(ids)
        affected = set(vectors) | near | augment.neighbourhood(self.store, vectors.values())
        augment.repair(self.store, affected)

    def neighbourhood(self, ids: Sequence[str]) -> set[str]:
        """Before a write replaces or removes ``ids``: whose augmented vectors it touches."""
        if self.store.dba() is None:
            return set()
        return augment.neighbourhood(self.store, self.store.vectors_of(ids).values())
