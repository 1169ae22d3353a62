"""Which namespaces to watch: the host, and what the namespace directories hold.

:class:`Discovery` scans the directories (prompted by the directory watcher,
by its own retries and by a periodic rescan) and tells its owner which
namespaces appeared, went, or changed names. It opens nothing itself: the
owner opens and closes the netlink sessions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from nswatch.netns import NameFilter, scan

# Retries for a namespace file that exists but is not mounted yet: `ip netns
# add` creates the file and bind-mounts the namespace onto it a moment later,
# and the mount raises no inotify event.
PENDING_RETRY = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class DirWatch(Protocol):
    """A source of "something changed in the namespace directories" (see dirwatch)."""

    def start(self) -> None: ...
    def refresh(self) -> None: ...
    def stop(self) -> None: ...


DirWatchFactory = Callable[[Iterable[str], Callable[[str | None], None]], DirWatch]


@dataclass(frozen=True, slots=True)
class Seen:
    """A namespace that should be watched: its names (sorted, host label first) and file."""

    inode: int
    names: tuple[str, ...]
    path: str | None
    is_host: bool


class Watched(Protocol):
    """What discovery's owner does with what it finds."""

    def watched(self) -> Iterable[int]:
        """Inodes of the namespaces watched now."""
        ...

    def names_of(self, inode: int) -> tuple[str, ...] | None:
        """The names a watched namespace has now."""
        ...

    def namespace_new(self, seen: Seen, why: str) -> None: ...
    def namespace_gone(self, inode: int, why: str) -> None: ...
    def namespace_renamed(self, seen: Seen) -> None: ...


class Discovery:
    """Scans for namespaces and reports the difference to what is watched."""

    def __init__(
        self,
        dirs: tuple[str, ...],
        name_filter: NameFilter,
        host_label: str,
        host_inode: int,
        nsfs_dev: int,
        owner: Watched,
        schedule: Callable[[float, str, Callable[[], None]], None],
        dirwatch_factory: DirWatchFactory | None = None,
    ) -> None:
        self.dirs = dirs
        self.filter = name_filter
        self.host_label = host_label
        self._host = host_inode
        self._nsfs_dev = nsfs_dev
        self._owner = owner
        self._schedule = schedule
        self._factory = dirwatch_factory
        self._dirwatch: DirWatch | None = None
        self._notify: Callable[[str | None], None] = lambda _path: None
        self.scanned_once = False
        self.wanted = True
        self._pending_try = 0
        self._pending_timer = False

    def start(self, notify: Callable[[str | None], None]) -> None:
        """Start the directory watcher; it calls ``notify`` (from its own thread)."""
        self._notify = notify
        if self._factory is not None:
            self._dirwatch = self._factory(self.dirs, notify)
            self._dirwatch.start()

    def stop(self) -> None:
        """Stop the directory watcher."""
        if self._dirwatch is not None:
            self._dirwatch.stop()
            self._dirwatch = None

    def reconfigure(self, dirs: tuple[str, ...], name_filter: NameFilter, host_label: str) -> None:
        """Take new directories and filters; the caller rescans."""
        self.filter = name_filter
        self.host_label = host_label
        if dirs != self.dirs:
            self.dirs = dirs
            if self._dirwatch is not None:
                self.stop()
                self.start(self._notify)

    def rescan(self, why: str) -> None:
        """Compare the directories with what is watched, and report the difference."""
        self.wanted = False
        if self._dirwatch is not None:
            self._dirwatch.refresh()
        found, pending = scan(self.dirs, self._nsfs_dev, self.filter)
        names: dict[int, list[str]] = {self._host: [self.host_label]}
        paths: dict[int, str] = {}
        for f in sorted(found, key=lambda f: f.name):
            names.setdefault(f.inode, []).append(f.name)
            paths.setdefault(f.inode, f.path)
        for inode in [i for i in self._owner.watched() if i not in names]:
            self._owner.namespace_gone(inode, why)
        for inode, ns_names in names.items():
            seen = Seen(inode, tuple(ns_names), paths.get(inode), inode == self._host)
            current = self._owner.names_of(inode)
            if current is None:
                self._owner.namespace_new(seen, why)
            elif current != seen.names:
                self._owner.namespace_renamed(seen)
        self._retry_pending(bool(pending))
        self.scanned_once = True

    def _retry_pending(self, pending: bool) -> None:
        if not pending:
            self._pending_try = 0
            return
        delay = PENDING_RETRY[min(self._pending_try, len(PENDING_RETRY) - 1)]
        self._pending_try += 1
        if not self._pending_timer:
            self._pending_timer = True
            self._schedule(delay, "pending", self._pending_rescan)

    def _pending_rescan(self) -> None:
        self._pending_timer = False
        self.rescan("pending")
