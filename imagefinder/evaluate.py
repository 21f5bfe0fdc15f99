"""Retrieval quality of an index over a labelled folder (one sub-folder per class)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import StoreError
from .store import Store


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
    labels_arr = np.array(labels)
    label_of = dict(zip(ids, labels, strict=True))
    matrix = np.stack(vectors)
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
