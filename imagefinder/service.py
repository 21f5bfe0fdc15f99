"""What the API needs behind its routes: settings, the store, the loaded model.

Kept apart from ``api.py`` so routes stay thin and so the CLI's ``search`` uses
the very same code path as ``POST /similarity-search``.
"""

from __future__ import annotations

import threading

import numpy as np

from .config import Settings
from .embed import Embedder, load_embedder
from .images import load_rgb
from .store import Store, StoreError, display_location, open_store


class ServiceError(Exception):
    """An error with an HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


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
            settings.db, ef_search=settings.ef_search, exact=settings.exact
        )
        self.embedder: Embedder | None = None
        self._load_lock = threading.Lock()

    def close(self) -> None:
        self.store.close()

    def load_model(self) -> Embedder | None:
        """Load the model the index records (once). None if there is no index yet."""
        if self.embedder is not None:
            return self.embedder
        with self._load_lock:
            if self.embedder is None:
                meta = self.store.meta()
                if not meta:
                    return None
                embedder = load_embedder(
                    meta["model"],
                    weights_for_index(meta, self.settings),
                    precision=self.settings.precision,
                    threads=self.settings.threads,
                )
                if embedder.weights_id != meta.get("weights"):
                    raise StoreError(
                        f"the index was built with weights {meta.get('weights')}, but the "
                        f"loaded weights are {embedder.weights_id}; set IMAGEFINDER_WEIGHTS "
                        "to the file the index was built with"
                    )
                self.embedder = embedder
        return self.embedder

    def ensure_index(self) -> Embedder:
        """The model for writes: the index's own or, when there is no index yet, the
        configured one (IMAGEFINDER_MODEL, IMAGEFINDER_WEIGHTS), creating the index for it."""
        if not self.store.meta():
            with self._load_lock:
                # An extraction may have created the index meanwhile: then its model wins.
                if not self.store.meta():
                    s = self.settings
                    embedder = self.embedder or load_embedder(
                        s.model, s.weights, s.precision, s.threads
                    )
                    self.store.ensure_schema(embedder.meta())
                    self.embedder = embedder
        embedder = self.load_model()
        assert embedder is not None
        return embedder

    def ready(self) -> tuple[Embedder, Store]:
        """The model and store, or a 503 naming the command that builds the index."""
        self.require_index()
        embedder = self.load_model()
        assert embedder is not None
        return embedder, self.store

    def require_index(self) -> Store:
        """The store if it holds vectors (no model needed), else a 503 naming the build command."""
        try:
            count = self.store.count()
        except StoreError as e:
            raise ServiceError(503, "index_unusable", str(e)) from e
        if count == 0:
            state = "empty" if self.store.meta() else "missing"
            raise ServiceError(
                503,
                f"index_{state}",
                f"the index {self.store.location} is {state}; build it with: "
                f"{build_command(self.settings)}",
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
            raise ServiceError(404, "unknown_id", f"no image with id {image_id!r} in the index")
        return store.knn(vector, k, exclude=(image_id,))

    def health(self) -> dict:
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
