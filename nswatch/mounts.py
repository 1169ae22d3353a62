"""Following the mount table: mounts and unmounts inotify never reports.

``umount /run/netns/x`` (the file stays), or a tmpfs mounted over a
namespace directory, change no directory entry, so the directory watcher
sees nothing. ``/proc/self/mountinfo`` signals every change of this mount
namespace's table with POLLPRI. The loop's selector only waits for
readability (and mountinfo is always readable), so the file sits in an epoll
set of its own that asks for POLLPRI alone; that set's fd turns readable
when the table changes, and goes quiet again once looked at.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import IO, Any, Protocol

MOUNTINFO = "/proc/self/mountinfo"


class Selector(Protocol):
    """The part of :class:`nswatch.loop.Loop` this needs."""

    def register(self, fileobj: Any, name: str, on_readable: Callable[[], None]) -> None: ...
    def unregister(self, fileobj: Any) -> None: ...


class MountWatch:
    """Calls ``on_change`` on the loop's thread whenever the mount table changes."""

    def __init__(
        self, loop: Selector, on_change: Callable[[], None], path: str = MOUNTINFO
    ) -> None:
        self._loop = loop
        self._on_change = on_change
        self._path = path
        self._file: IO[bytes] | None = None
        self._epoll: select.epoll | None = None

    def start(self) -> None:
        """Open the mount table and register with the loop."""
        if self._epoll is not None:
            return
        self._file = open(self._path, "rb")  # noqa: SIM115 - held open until stop()
        self._epoll = select.epoll(1)
        self._epoll.register(self._file.fileno(), select.EPOLLPRI | select.EPOLLERR)
        self._loop.register(self._epoll.fileno(), "mountinfo", self._changed)

    def stop(self) -> None:
        """Unregister and close."""
        if self._epoll is not None:
            self._loop.unregister(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _changed(self) -> None:
        if self._epoll is not None:
            # Polling the table is what re-arms it (the kernel remembers
            # the last event each open file was told about).
            self._epoll.poll(0)
        self._on_change()


def nsfs_mounts(path: str = MOUNTINFO) -> dict[int, list[str]]:
    """Network namespaces mounted anywhere in this mount namespace: inode -> mount points.

    A namespace file covered by another mount (a tmpfs over /run/netns) is
    out of reach by name but still listed here, and still alive.
    """
    out: dict[int, list[str]] = {}
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        # id parent major:minor root mount-point options [optional...] - fstype source super
        fields = line.split()
        try:
            sep = fields.index(b"-")
        except ValueError:
            continue
        if sep + 1 >= len(fields) or fields[sep + 1] != b"nsfs":
            continue
        root = fields[3]
        if root.startswith(b"net:[") and root.endswith(b"]"):
            point = fields[4].decode("utf-8", "backslashreplace")
            out.setdefault(int(root[5:-1]), []).append(point)
    return out
