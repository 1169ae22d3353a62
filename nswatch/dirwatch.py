"""Watching the namespace directories (/run/netns, ...) with watchdog.

The handler runs on watchdog's thread and only calls ``notify`` (which the
daemon makes a thread-safe enqueue); all the looking happens on the event
loop. A directory that does not exist yet (``/run/netns`` appears with the
first ``ip netns add``) is covered by watching its nearest existing parent
until :meth:`DirWatcher.refresh` finds it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer as WatchdogObserver


class _Handler(FileSystemEventHandler):
    def __init__(self, notify: Callable[[str | None], None], dirs: frozenset[str]) -> None:
        self._notify = notify
        self._dirs = dirs

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed", "closed_no_write"):
            return
        path = os.fsdecode(event.src_path)
        parent = os.path.dirname(path)
        if parent in self._dirs:
            self._notify(path)
        elif path in self._dirs or any(d.startswith(path + "/") for d in self._dirs):
            # A watched directory (or one of its parents) came or went.
            self._notify(None)


class DirWatcher:
    """inotify watches on the namespace directories, re-armed as they come and go."""

    def __init__(self, dirs: Iterable[str], notify: Callable[[str | None], None]) -> None:
        self.dirs = tuple(os.path.abspath(d) for d in dirs)
        self._handler = _Handler(notify, frozenset(self.dirs))
        self._observer: Any = None
        self._watched: dict[str, Any] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start watchdog's thread and arm the watches."""
        self._observer = WatchdogObserver()
        self._observer.daemon = True
        self._observer.start()
        self.refresh()

    def refresh(self) -> None:
        """Watch each directory, or its nearest existing parent while it is missing."""
        if self._observer is None:
            return
        with self._lock:
            want = {_nearest_existing(d) for d in self.dirs}
            for path in list(self._watched):
                if path not in want or not os.path.isdir(path):
                    with contextlib.suppress(KeyError, ValueError):
                        self._observer.unschedule(self._watched.pop(path))
            for path in want:
                if path not in self._watched:
                    try:
                        self._watched[path] = self._observer.schedule(
                            self._handler, path, recursive=False
                        )
                    except OSError:
                        continue

    @property
    def watched(self) -> tuple[str, ...]:
        """The paths being watched now."""
        return tuple(sorted(self._watched))

    def stop(self) -> None:
        """Stop watchdog's thread and drop every watch."""
        if self._observer is None:
            return
        self._observer.stop()
        self._observer.join(timeout=2)
        self._observer = None
        self._watched.clear()


def _nearest_existing(path: str) -> str:
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path
