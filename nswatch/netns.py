"""Finding network namespaces on disk and entering them safely.

A named namespace is an nsfs inode bind-mounted on a file in a directory such
as /run/netns. ``ip netns add`` creates the (empty) file first and mounts the
namespace on it a moment later, so a file only counts once ``stat`` shows it
on the nsfs device. Entering never creates anything: files are opened
read-only, never with O_CREAT (pyroute2's ``netns=`` default would create a
missing namespace).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from nswatch.patterns import user_regex

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def own_netns_path() -> str:
    """The calling thread's own namespace file (threads can differ after setns)."""
    return "/proc/thread-self/ns/net"


@dataclass(frozen=True, slots=True)
class NsIdentity:
    """The identity of a namespace: the nsfs device and inode of its file."""

    dev: int
    inode: int


def identity_of(path: str) -> NsIdentity:
    """The nsfs identity behind ``path`` (follows the bind mount)."""
    st = os.stat(path)
    return NsIdentity(st.st_dev, st.st_ino)


@dataclass(frozen=True, slots=True)
class Found:
    """A namespace file that is mounted and passed the name filters."""

    name: str
    path: str
    inode: int


class NameFilter:
    """``--include``/``--exclude`` regexes on namespace names; exclude wins.

    The patterns are RE2 (linear time whatever the pattern); one RE2 cannot
    compile raises PatternError.
    """

    def __init__(self, include: str | None = None, exclude: str | None = None) -> None:
        self.include = user_regex(include) if include else None
        self.exclude = user_regex(exclude) if exclude else None

    def __call__(self, name: str) -> bool:
        if self.exclude is not None and self.exclude.search(name):
            return False
        return self.include is None or self.include.search(name)


def probe(path: str, nsfs_dev: int) -> int | None:
    """The namespace inode mounted at ``path``, or None if not (yet) a namespace.

    Raises FileNotFoundError when the file is gone.
    """
    st = os.stat(path)
    # Before the bind mount lands, the file is an empty regular file on the
    # directory's own file system: not a namespace yet.
    if st.st_dev != nsfs_dev:
        return None
    return st.st_ino


def scan(
    dirs: Iterable[str], nsfs_dev: int, accept: Callable[[str], bool]
) -> tuple[list[Found], list[str]]:
    """List every namespace in ``dirs``: (mounted ones, files still waiting for their mount)."""
    found: list[Found] = []
    pending: list[str] = []
    for d in dirs:
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for name in names:
            if not accept(name):
                continue
            path = os.path.join(d, name)
            try:
                inode = probe(path, nsfs_dev)
            except OSError:
                continue
            if inode is None:
                pending.append(path)
            else:
                found.append(Found(name, path, inode))
    return found, pending


class NetnsEnterer:
    """Runs short functions inside another namespace, on the calling thread.

    setns() changes only the calling thread's namespace; a socket keeps the
    namespace it was created in. So "enter, create socket, come back" costs a
    couple of syscalls instead of pyroute2's fork per namespace. The thread is
    always returned to the namespace it was in when this object was made; if
    that fails the process cannot trust its own sockets any more and aborts.
    """

    def __init__(self) -> None:
        self._home = os.open(own_netns_path(), os.O_RDONLY | os.O_CLOEXEC)
        self.home = identity_of(own_netns_path())
        self._lock = threading.Lock()

    def close(self) -> None:
        """Release the saved home-namespace fd."""
        if self._home >= 0:
            os.close(self._home)
            self._home = -1

    def open_ns(self, path: str, inode: int | None = None) -> int:
        """Open a namespace file read-only; check it is still ``inode`` if given."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_dev != self.home.dev or (inode is not None and st.st_ino != inode):
                raise OSError(errno.ESTALE, f"{path} is no longer that namespace")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def home_fd(self) -> int:
        """A new fd for the home namespace (the caller closes it)."""
        return os.dup(self._home)

    def run_in(self, fd: int, fn: Callable[[], T]) -> T:
        """Call ``fn`` with the calling thread inside namespace ``fd``."""
        with self._lock, self._inside(fd):
            return fn()

    @contextmanager
    def _inside(self, fd: int) -> Iterator[None]:
        _setns(fd)
        try:
            yield
        finally:
            try:
                _setns(self._home)
            except OSError:  # pragma: no cover - cannot happen short of a kernel bug
                os.abort()
