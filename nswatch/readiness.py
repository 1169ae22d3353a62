"""Readiness: every namespace of the first scan synced, with its veth peers placed."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Readiness:
    """Turns ready once, when every namespace watched before that is complete."""

    def __init__(self, is_complete: Callable[[int], bool], on_ready: Callable[[], None]) -> None:
        self._is_complete = is_complete
        self._on_ready = on_ready
        self._unready: set[int] = set()
        self.event = threading.Event()

    def watch(self, inode: int) -> None:
        """A namespace appeared: readiness waits for it while not ready yet."""
        if not self.event.is_set():
            self._unready.add(inode)

    def progress(self, inode: int) -> None:
        """Namespace ``inode`` read something: check it (cheap) and, if it completed, all."""
        if inode in self._unready and self._is_complete(inode):
            self._unready.discard(inode)
            self.check()

    def check(self) -> None:
        """Turn ready when nothing is left waiting (call after a full scan)."""
        if self.event.is_set():
            return
        self._unready = {i for i in self._unready if not self._is_complete(i)}
        if not self._unready:
            self.event.set()
            self._on_ready()
