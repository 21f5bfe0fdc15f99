"""numpy float32 vectors <-> pgvector's ``vector`` type, in its binary wire format, so
vectors travel exactly and without text parsing."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import psycopg
from psycopg.adapt import Dumper, Loader
from psycopg.pq import Format
from psycopg.types import TypeInfo


class _VectorDumper(Dumper):
    """numpy float32 -> pgvector's binary wire format (dim, unused, big-endian floats)."""

    format = Format.BINARY

    def dump(self, obj: np.ndarray) -> bytes:
        v = np.asarray(obj, dtype=">f4").ravel()
        return struct.pack(">HH", v.shape[0], 0) + v.tobytes()


class _VectorLoader(Loader):
    format = Format.BINARY

    def load(self, data: Any) -> np.ndarray:
        (dim,) = struct.unpack_from(">H", data)
        return np.frombuffer(data, dtype=">f4", count=dim, offset=4).astype(np.float32)


def register_vector(conn: psycopg.Connection) -> bool:
    """Teach ``conn`` the vector type (its oid differs per database). False if the
    extension is not there yet."""
    if conn.adapters.types.get("vector") is not None:
        return True
    info = TypeInfo.fetch(conn, "vector")
    if info is None:
        return False
    info.register(conn)
    conn.adapters.register_dumper(
        np.ndarray, type("VectorDumper", (_VectorDumper,), {"oid": info.oid})
    )
    conn.adapters.register_loader(info.oid, _VectorLoader)
    return True
