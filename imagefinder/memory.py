"""Giving freed memory back to the operating system.

glibc keeps freed blocks in its arenas for reuse, so after a large decode a process
stays as big as its peak: a server that decoded a few large uploads sat at 2 GB while
idle. ``release()`` asks glibc to return what is free (``malloc_trim``); elsewhere it
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from typing import Any

_libc: Any = None
_lock = threading.Lock()
_last = 0.0


def _trim_function() -> Any:
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = libc.malloc_trim if hasattr(libc, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc


M_MMAP_THRESHOLD = -3


def map_large_blocks(threshold: int = 8 << 20) -> bool:
    """Serve every allocation of ``threshold`` bytes or more from its own mapping, given
    back to the OS the moment it is freed. glibc otherwise raises this threshold to the
    size of the last large block freed (up to 32 MB), after which 20 MB upload buffers
    came from, and stayed in, the heap. Smaller blocks (a forward pass's activations)
    stay in the heap, where reuse is cheap. True if glibc took the setting."""
    if not _trim_function():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def release(min_interval: float = 0.0) -> bool:
    """Return free heap memory to the OS. At most once per ``min_interval`` seconds
    (a trim walks every arena: cheap, but not free). True if a trim ran."""
    global _last
    trim = _trim_function()
    if not trim:
        return False
    with _lock:
        now = time.monotonic()
        if now - _last < min_interval:
            return False
        _last = now
    trim(0)
    return True
