"""Retrieval quality over a labelled folder (one sub-folder per class): of an index as
its store searches it (``evaluate_index``), and of every combination of model, αQE and
DBA through the API's own search code (``evaluate_models``)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import augment, query
from .config import Settings
from .errors import StoreError
from .indexer import index_folder
from .metadata import Where
from .model.embedder import load_embedder
from .store import Store, open_store


def precision_and_ap(
    ranked_labels: np.ndarray, label: str, relevant: int, k: int
) -> tuple[float, float]:
    """precision@k and average precision of one ranking (query already removed)."""
    hits = ranked_labels == label
    precision = float(hits[:k].mean()) if k else 0.0
    if relevant == 0:
        return precision, 0.0
    cum = np.cumsum(hits)
    ranks = np.flatnonzero(hits) + 1
    ap = float((cum[hits] / ranks).sum() / relevant)
    return precision, ap


def evaluate_index(store: Store, folder: str | Path, k: int = 3) -> dict:
    """Leave-one-out: every labelled image queries the rest through the index's KNN.

    precision@k uses the store's own KNN (so it measures whatever search mode
    the index uses); mAP needs the full ranking, computed exactly from the vectors.
    """
    ids, labels, matrix = labelled_vectors(store, folder)
    labels_arr = np.array(labels)
    label_of = dict(zip(ids, labels, strict=True))
    precisions, aps = [], []
    for i, (image_id, label) in enumerate(zip(ids, labels, strict=True)):
        neighbours = store.knn(matrix[i], k, exclude=(image_id,))
        precisions.append(np.mean([label_of.get(n) == label for n, _ in neighbours]))
        dist = ((matrix - matrix[i]) ** 2).sum(axis=1)
        dist[i] = np.inf
        order = np.argsort(dist, kind="stable")[:-1]
        relevant = int((labels_arr == label).sum()) - 1
        aps.append(precision_and_ap(labels_arr[order], label, relevant, k)[1])
    return {
        "queries": len(ids),
        "classes": len(set(labels)),
        "k": k,
        "precision_at_k": float(np.mean(precisions)),
        "map": float(np.mean(aps)),
    }


class MatrixIndex:
    """An index held in memory, searched exactly: what ``query.run`` needs of a store,
    so every combination of options is evaluated by the very code the API runs, without
    touching the index on disk."""

    def __init__(self, ids: list[str], matrix: np.ndarray, dba: bool):
        self.ids = ids
        self.row = {i: n for n, i in enumerate(ids)}
        self.matrix = np.asarray(matrix, dtype=np.float32)
        self.ranking = augment.augment(self.matrix) if dba else self.matrix
        self._dba = augment.dba_spec() if dba else None

    def dba(self) -> str | None:
        return self._dba

    def knn(
        self, vector: np.ndarray, k: int, exclude: Sequence[str] = (), where: Where = ()
    ) -> list[tuple[str, float]]:
        if where:
            raise StoreError("an in-memory evaluation index holds no metadata to filter on")
        dist = ((self.matrix - vector) ** 2).sum(axis=1)
        for i in exclude:
            if i in self.row:
                dist[self.row[i]] = np.inf
        order = np.argsort(dist, kind="stable")[: min(k, len(self.ids) - len(exclude))]
        return [(self.ids[n], float(np.sqrt(dist[n]))) for n in order]

    def vectors_of(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return {i: self.matrix[self.row[i]] for i in ids if i in self.row}

    def augmented_of(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return {i: self.ranking[self.row[i]] for i in ids if i in self.row}


def labelled_vectors(store: Store, folder: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """The index's images under ``folder``'s class sub-folders: ids, labels, vectors."""
    root = Path(folder).resolve()
    ids, labels, vectors = [], [], []
    for chunk in store.iter_vectors():
        for image_id, path, vector in chunk:
            try:
                rel = Path(path).resolve().relative_to(root)
            except ValueError:
                continue
            if len(rel.parts) < 2:
                continue
            ids.append(image_id)
            labels.append(rel.parts[0])
            vectors.append(vector)
    if len(ids) < 2:
        raise StoreError(
            f"the index {store.location} holds no images from {root}; index it first: "
            f"imagefinder extract --folder {folder} --db {store.location}"
        )
    return ids, labels, np.stack(vectors)


def evaluate_options(
    ids: list[str], labels: list[str], matrix: np.ndarray, k: int, expand: bool, dba: bool
) -> dict:
    """Leave-one-out precision@k and mAP of one combination of αQE and DBA: every image
    queries the rest through ``query.run``, ranking the whole index."""
    index = MatrixIndex(ids, matrix, dba)
    labels_arr = np.array(labels)
    label_of = dict(zip(ids, labels, strict=True))
    precisions, aps = [], []
    for i, (image_id, label) in enumerate(zip(ids, labels, strict=True)):
        ranked = query.run(index, matrix[i], len(ids) - 1, expand, exclude=(image_id,))
        ranked_labels = np.array([label_of[r] for r, _ in ranked])
        relevant = int((labels_arr == label).sum()) - 1
        precision, ap = precision_and_ap(ranked_labels, label, relevant, k)
        precisions.append(precision)
        aps.append(ap)
    return {
        "expand": expand,
        "dba": dba,
        "precision_at_k": float(np.mean(precisions)),
        "map": float(np.mean(aps)),
    }


COMBINATIONS = ((False, False), (True, False), (False, True), (True, True))


def evaluate_all(
    store: Store, folder: str | Path, k: int, images_per_s: float | None = None
) -> list[dict]:
    """One row per combination of αQE and DBA for the index ``store``."""
    ids, labels, matrix = labelled_vectors(store, folder)
    base = {
        "model": store.meta().get("model", ""),
        "images_per_s": images_per_s,
        "queries": len(ids),
        "classes": len(set(labels)),
        "k": k,
    }
    return [
        {**base, **evaluate_options(ids, labels, matrix, k, expand, dba)}
        for expand, dba in COMBINATIONS
    ]


def evaluate_models(
    settings: Settings,
    folder: str | Path,
    models: Sequence[str],
    k: int,
    on_model: Callable[[str, int], Callable[[int], None]] | None = None,
) -> list[dict]:
    """Every combination for each model in ``models``, each embedding ``folder`` into a
    temporary index through the real extraction (timed: images/s); without models, for
    the index ``settings.location`` as it is. ``on_model(name, total)`` returns the
    progress callback for one model's extraction."""
    if not models:
        store = open_store(settings.location)
        if not store.meta():
            raise StoreError(
                f"{store.location} is not an index yet; build one with: imagefinder extract "
                f"--folder {folder} --db {store.location}, or evaluate models with --model"
            )
        try:
            return evaluate_all(store, folder, k)
        finally:
            store.close()
    rows: list[dict] = []
    for name in models:
        weights = settings.weights if len(models) == 1 else None
        with tempfile.TemporaryDirectory(prefix="imagefinder-eval-") as tmp:
            store = open_store(str(Path(tmp) / "index.db"), exact=True)
            rate = _embed_timed(settings, folder, store, name, weights, on_model)
            rows += evaluate_all(store, folder, k, images_per_s=rate)
            store.close()
    return rows


def _embed_timed(
    settings: Settings,
    folder: str | Path,
    store: Store,
    name: str,
    weights: str | None,
    on_model: Callable[[str, int], Callable[[int], None]] | None,
) -> float:
    """Embed ``folder`` into ``store`` with model ``name``; returns images/s."""
    embedder = load_embedder(name, weights, settings.precision, settings.threads)
    progress: list[Callable[[int], None]] = []

    def total(n: int) -> None:
        if on_model:
            progress.append(on_model(name, n))

    def step(n: int) -> None:
        if progress:
            progress[0](n)

    start = time.perf_counter()
    summary = index_folder(
        folder,
        store,
        embedder,
        batch_size=settings.batch_size,
        max_pixels=settings.max_pixels,
        dba=False,
        on_total=total,
        on_progress=step,
    )
    return summary.indexed / (time.perf_counter() - start)
