"""The C heap: large blocks go straight back to the kernel when freed."""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 128 * 1024  # glibc's default starting value


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def trim() -> bool:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim); False if not glibc."""
    libc = _libc()
    fn = getattr(libc, "malloc_trim", None)
    if fn is None:
        return False
    fn.argtypes = (ctypes.c_size_t,)
    fn.restype = ctypes.c_int
    return bool(fn(0))


def fix_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at 128 KiB; False when this is not glibc.

    glibc serves blocks above the threshold with their own mmap, returned to
    the kernel on free, but raises the threshold to the size of each such
    block freed. After a few multi-megabyte documents (the state JSON, a
    gzip form) are made and dropped, blocks of that size come from the heap
    instead, where freeing rarely shrinks it: 16 readers of the state left
    the daemon at 336 MB after they stopped. Setting the threshold
    explicitly turns that adjustment off.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False  # musl and other libcs have no mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
