"""An index with its model: what searches and writes need, for the server and the CLI.

Which model and weights an index uses is decided here, in ``choose_model``, for
every caller: the API's searches and writes, and the CLI's ``extract`` and ``search``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import Settings
from .errors import IndexNotReady, StoreError, unknown_id
from .images import load_rgb
from .model.embedder import Embedder, load_embedder
from .store import Store, display_location, open_store
from .store.base import check_compatible


def build_command(settings: Settings) -> str:
    db = display_location(settings.db)  # a PostgreSQL password never reaches a client
    return f"python extract_image_features.py --folder {settings.images_dir} --db {db}"


def weights_for_index(meta: dict[str, str], settings: Settings) -> str | None:
    """The weights argument that reproduces the index's vectors."""
    recorded = meta.get("weights", "")
    if recorded.startswith("sha256:"):
        return settings.weights or meta.get("weights_path")
    if recorded in ("", "bundled"):
        return None
    return recorded


class Service:
    def __init__(self, settings: Settings, store: Store | None = None):
        self.settings = settings
        self.store = store or open_store(
            settings.db, ef_search=settings.ef_search, exact=settings.exact, nprobe=settings.nprobe
        )
        self.embedder: Embedder | None = None
        self._load_lock = threading.Lock()

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
                f"{build_command(self.settings)}",
                code=f"index_{state}",
            )
        return self.store

    def embed_upload(self, data: bytes, embedder: Embedder | None = None) -> np.ndarray:
        """Bytes of any supported image -> one vector. Raises ImageError."""
        embedder = embedder or self.ready()[0]
        img = load_rgb(data, self.settings.max_pixels, min_side=embedder.min_side)
        return embedder.embed_tensors(embedder.preprocess(img)[None])[0]

    def search_bytes(self, data: bytes, k: int) -> list[tuple[str, float]]:
        vector = self.embed_upload(data)
        return self.store.knn(vector, k)

    def search_id(self, image_id: str, k: int) -> list[tuple[str, float]]:
        _, store = self.ready()
        vector = store.vector_of(image_id)
        if vector is None:
            raise unknown_id(image_id)
        return store.knn(vector, k, exclude=(image_id,))

    def response(self, results: list[tuple[str, float]]) -> dict[str, Any]:
        """A search's answer, as the API sends it and ``search --json`` prints it."""
        meta = self.store.meta()
        return {
            "model": meta.get("model", ""),
            "metric": meta.get("metric", ""),
            "results": [{"id": i, "distance": d} for i, d in results],
        }

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
        }
