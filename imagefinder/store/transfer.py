"""Copying an index between stores (SQLite <-> PostgreSQL, or file to file).

Rows travel in batches with their vectors as float32 bytes, their metadata, and the
meta as it is, so the copy searches (and filters) exactly like the original. Each batch is one transaction in
the destination: an interrupted copy leaves a consistent index, and running the
same copy again finishes it (rows are upserted by id).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import StoreError
from .base import Store


def copy_index(
    src: Store,
    dst: Store,
    *,
    batch: int = 1000,
    on_total: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Copy every row and the meta of ``src`` into ``dst``. Returns how many rows.

    ``dst`` may be new, or an index of the same model (the rows are merged in).
    """
    if src.location == dst.location and src.kind == dst.kind:
        raise StoreError(f"{src.location} is both the source and the destination")
    meta = src.meta()
    if not meta:
        raise StoreError(f"{src.location} is not an index; nothing to copy")
    dst.ensure_schema(meta)
    total = src.count()
    if on_total:
        on_total(total)
    dst.begin_bulk(total)
    copied = 0
    for items in src.iter_items(batch):
        copied += dst.upsert(items)
        ids = [it.id for it in items]
        metadata = src.metadata_of(ids)
        dst.set_metadata((i, metadata.get(i, {})) for i in ids)
        if on_progress:
            on_progress(len(items))
    dst.end_bulk()
    return copied
