"""The C heap's settings: few malloc arenas, so threads do not each fragment their own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nswatch import heap

ROOT = Path(__file__).resolve().parents[1]

# Eight threads calling malloc at the same time (ctypes lets go of the GIL),
# then glibc's malloc_info: one <heap> element per arena.
PROBE = """
import ctypes, sys, threading
from nswatch import heap
if sys.argv[1] == "limit":
    assert heap.limit_arenas()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
start = threading.Barrier(8)
def work():
    start.wait()
    for _ in range(20000):
        libc.free(libc.malloc(1000))
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
buf, size = ctypes.c_char_p(), ctypes.c_size_t()
libc.open_memstream.restype = ctypes.c_void_p
stream = ctypes.c_void_p(libc.open_memstream(ctypes.byref(buf), ctypes.byref(size)))
libc.malloc_info(0, stream)
libc.fclose(stream)
print(buf.value.count(b"<heap nr="))
"""


def arenas(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


@pytest.mark.parametrize(("mode", "most"), [("limit", heap.ARENA_MAX), ("free", None)])
def test_threads_share_at_most_two_malloc_arenas(mode: str, most: int | None) -> None:
    """With the limit, threads allocating at once share ARENA_MAX arenas; without it
    (the control, so the probe can tell) glibc makes more."""
    n = arenas(mode)
    if most is None:
        assert n > heap.ARENA_MAX
    else:
        assert 1 <= n <= most
