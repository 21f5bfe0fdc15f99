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
