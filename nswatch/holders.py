"""Watching the process that keeps a namespace alive, with a pidfd in the loop's selector.

nswatch's netlink socket inside a namespace keeps that namespace alive. For a
namespace no file holds, nothing else may: when its last process exits, the
socket must go at once, or the namespace (and the host end of its veths)
outlives its owner. A pidfd turns readable when its process exits, so the
loop learns it without polling; the owner then looks for another holder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any, Protocol


class Selector(Protocol):
    """The part of :class:`nswatch.loop.Loop` this needs."""

    def register(self, fileobj: Any, name: str, on_readable: Callable[[], None]) -> None: ...
    def unregister(self, fileobj: Any) -> None: ...


class HolderWatch:
    """One pidfd per namespace, on the process chosen to hold it."""

    def __init__(self, loop: Selector, on_exit: Callable[[int], None]) -> None:
        self._loop = loop
        self._on_exit = on_exit
        self._by_inode: dict[int, tuple[int, int]] = {}

    def inodes(self) -> list[int]:
        """The namespaces whose holder is watched."""
        return list(self._by_inode)

    def pid_of(self, inode: int) -> int | None:
        """The PID watched for namespace ``inode``."""
        held = self._by_inode.get(inode)
        return held[0] if held is not None else None

    def watch(self, inode: int, pid: int) -> None:
        """Watch ``pid`` as the holder of ``inode`` (replacing another); raises OSError (EMFILE).

        When ``pid`` already exited, ``on_exit`` runs at the loop's next turn
        (its pidfd is readable at once).
        """
        if self.pid_of(inode) == pid:
            return
        self.unwatch(inode)
        fd = os.pidfd_open(pid)
        self._by_inode[inode] = (pid, fd)
        self._loop.register(fd, f"holder:{pid}", lambda: self._exited(inode, fd))

    def unwatch(self, inode: int) -> None:
        """Stop watching namespace ``inode``'s holder."""
        held = self._by_inode.pop(inode, None)
        if held is not None:
            self._loop.unregister(held[1])
            with contextlib.suppress(OSError):
                os.close(held[1])

    def close(self) -> None:
        """Close every pidfd."""
        for inode in list(self._by_inode):
            self.unwatch(inode)

    def _exited(self, inode: int, fd: int) -> None:
        held = self._by_inode.get(inode)
        if held is None or held[1] != fd:
            return
        self.unwatch(inode)
        self._on_exit(inode)
