"""The C heap: large blocks go straight back to the kernel when freed."""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 * 1024  # glibc's default starting value
# glibc gives each thread that allocates while another holds an arena's lock
# an arena of its own, up to 8 per core, and each keeps its own free memory.
# Under the GIL the daemon's threads barely ever allocate at the same time,
# so more arenas only fragment the heap: with two, peak RSS under 16 + 4
# readers (tests/bench/bench_readers.py) fell from 153-161 to 146-148 MB.
ARENA_MAX = 2


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


def _mallopt(param: int, value: int) -> bool:
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False  # musl and other libcs have no mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(param, value))


def limit_arenas() -> bool:
    """At most :data:`ARENA_MAX` malloc arenas (call before any thread); False if not glibc."""
    return _mallopt(M_ARENA_MAX, ARENA_MAX)


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
    return _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
