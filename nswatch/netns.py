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
import fcntl
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from nswatch.naming import escape
from nswatch.patterns import user_regex

CLONE_NEWNET = 0x40000000
# ioctl on an nsfs fd: which kind of namespace it is (Linux 4.11).
NS_GET_NSTYPE = 0xB703

#: Why an entry of a namespace directory is not watched.
NOT_A_MOUNT_POINT = "not_a_mount_point"
NOT_A_NETWORK_NAMESPACE = "not_a_network_namespace"
UNREADABLE = "unreadable"
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


class NotNetworkNamespace(OSError):
    """An nsfs file of another kind of namespace (mount, pid, ...)."""


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


@dataclass(slots=True)
class Scan:
    """What the namespace directories hold.

    ``found``: files with a namespace mounted on them; ``pending``: empty
    regular files, which may be waiting for ``ip netns add``'s mount;
    ``strays``: entries that are no namespace at all (path -> reason);
    ``excluded``: namespaces mounted only under names the filter rejects.
    """

    found: list[Found]
    pending: list[str]
    strays: dict[str, str]
    excluded: set[int]


def scan_dirs(dirs: Iterable[str], nsfs_dev: int, accept: Callable[[str], bool]) -> Scan:
    """Look at every entry of ``dirs`` (names escaped, see :mod:`nswatch.naming`)."""
    out = Scan([], [], {}, set())
    for d in dirs:
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for raw in names:
            name = escape(raw)
            path = os.path.join(d, raw)
            accepted = accept(name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            except OSError:
                # A symlink loop, a dangling link, no permission: never a namespace.
                if accepted:
                    out.strays[path] = UNREADABLE
                continue
            if not accepted:
                # Remembered so that a namespace filtered out on reload is
                # said to be unwatched, not deleted.
                if st.st_dev == nsfs_dev:
                    out.excluded.add(st.st_ino)
            elif st.st_dev == nsfs_dev:
                out.found.append(Found(name, path, st.st_ino))
            elif stat.S_ISREG(st.st_mode):
                out.pending.append(path)
            else:
                out.strays[path] = NOT_A_NETWORK_NAMESPACE
    return out


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
            if fcntl.ioctl(fd, NS_GET_NSTYPE) != CLONE_NEWNET:
                raise NotNetworkNamespace(errno.EINVAL, f"{path} is not a network namespace")
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
