"""Which namespaces to watch: the host, the namespace directories, and (optionally) /proc.

:class:`Discovery` scans (prompted by the directory watcher, the mount table,
holder exits, kernel hints, its own retries and a periodic rescan) and tells
its owner which namespaces appeared, went, or changed names. It opens no
netlink socket itself: the owner opens and closes the sessions, and raises
OSError when one cannot be opened.

What cannot be watched is said once and counted, never retried in a tight
loop:

- directory entries that are no namespace (*strays*): ``not_a_mount_point``
  (an empty file nothing was mounted on within :data:`PENDING_GIVE_UP`),
  ``not_a_network_namespace`` (a directory, a mount, another kind of
  namespace), ``unreadable`` (a symlink loop, no permission);
- namespaces that exist but could not be opened: ``out_of_fds``,
  ``permission_denied``, ``open_failed``; retried with backoff
  (:data:`RETRY_BACKOFF`), and listed by :attr:`Discovery.unwatched` so
  readiness can say what is missing.

Namespaces no file holds are found in /proc (``discover_processes``) and
named after a process living in them (see :mod:`nswatch.naming`). Their
holder is watched with a pidfd: when it exits, another holder is looked for
at once, and when none is left the namespace is let go of at once, so our
socket does not keep it alive.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

from nswatch.holders import HolderWatch
from nswatch.model import GoneReason, Owner
from nswatch.mounts import MountWatch, nsfs_mounts
from nswatch.naming import anonymous_name, escape
from nswatch.netns import (
    NOT_A_MOUNT_POINT,
    NOT_A_NETWORK_NAMESPACE,
    UNREADABLE,
    NameFilter,
    NotNetworkNamespace,
    Scan,
    scan_dirs,
)
from nswatch.procs import PROC, net_holders, ns_path, owner_of

# Retries for a namespace file that exists but is not mounted yet: `ip netns
# add` creates the file and bind-mounts the namespace onto it a moment later,
# and the mount raises no inotify event.
PENDING_RETRY = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# An empty file still unmounted this long after it was first seen is not
# being made into a namespace: it is reported as a stray, and no timer
# retries it (the mount table and the periodic rescan still look).
PENDING_GIVE_UP = 2.0
# Delays between attempts to open a namespace that could not be opened.
RETRY_BACKOFF = (0.1, 0.3, 1.0, 2.0, 5.0, 10.0, 30.0)

OUT_OF_FDS = "out_of_fds"
PERMISSION_DENIED = "permission_denied"
OPEN_FAILED = "open_failed"

#: Every reason something is not watched (``nswatch_namespaces_unwatched{reason}``).
UNWATCHED_REASONS = (
    NOT_A_MOUNT_POINT,
    NOT_A_NETWORK_NAMESPACE,
    UNREADABLE,
    OUT_OF_FDS,
    PERMISSION_DENIED,
    OPEN_FAILED,
)


class DirWatch(Protocol):
    """A source of "something changed in the namespace directories" (see dirwatch)."""

    def start(self) -> None: ...
    def refresh(self) -> None: ...
    def stop(self) -> None: ...


DirWatchFactory = Callable[[Iterable[str], Callable[[str | None], None]], DirWatch]


T = TypeVar("T")


class Offload(Protocol):
    """Runs ``work`` away from the event loop, then ``then`` on the loop with its result
    or the exception it raised (:meth:`nswatch.loop.Loop.offload`; :func:`run_here` in tests)."""

    def __call__(
        self, work: Callable[[], T], then: Callable[[T | BaseException], None], where: str = ...
    ) -> None: ...


def run_here(
    work: Callable[[], T], then: Callable[[T | BaseException], None], where: str = "inbox"
) -> None:
    """An :class:`Offload` that runs ``work`` at once, on the caller's thread (whose own
    guard reports what ``then`` raises)."""
    try:
        result: T | BaseException = work()
    except Exception as e:
        result = e
    then(result)


@dataclass(frozen=True, slots=True)
class Looked:
    """What a rescan read from the file system: the directories, and /proc if asked."""

    scan: Scan
    holders: dict[int, list[int]] | None  # None: /proc was not read
    mounted: dict[int, list[str]]  # nsfs mounts, read when a watched namespace lost its file


def look(
    dirs: tuple[str, ...],
    nsfs_dev: int,
    accept: Callable[[str], bool],
    proc: str,
    procs: bool,
    watched: frozenset[int],
    held: frozenset[int],
) -> Looked:
    """Read what :meth:`Discovery.rescan` compares (off the loop: a stat() per entry).

    ``watched``: the namespaces watched when asked; ``held``: those whose
    holder process is watched. /proc is read when ``procs``, or when a watched
    namespace is in no directory and no watched process holds it (it may live
    on in a process); the mounts when a watched namespace is in no directory.
    """
    scan = scan_dirs(dirs, nsfs_dev, accept)
    named = {f.inode for f in scan.found}
    gone = watched - named
    holders = net_holders(proc) if procs or (gone - held) else None
    return Looked(scan, holders, nsfs_mounts() if gone else {})


class DiscoveryLoop(Protocol):
    """The parts of :class:`nswatch.loop.Loop` discovery uses."""

    def clock(self) -> float: ...
    def call_later(self, delay: float, name: str, fn: Callable[[], None]) -> None: ...
    def register(self, fileobj: Any, name: str, on_readable: Callable[[], None]) -> None: ...
    def unregister(self, fileobj: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class Seen:
    """A namespace that should be watched: its names (host label first), file, and holder."""

    inode: int
    names: tuple[str, ...]
    path: str | None
    is_host: bool
    owner: Owner | None = None


class Watched(Protocol):
    """What discovery's owner does with what it finds."""

    def watched(self) -> Iterable[int]:
        """Inodes of the namespaces watched now."""
        ...

    def names_of(self, inode: int) -> tuple[str, ...] | None:
        """The names a watched namespace has now (None: not watched)."""
        ...

    def namespace_new(self, seen: Seen, why: str) -> None:
        """Watch a namespace; raise OSError when it cannot be opened."""
        ...

    def namespace_gone(self, inode: int, why: str, reason: GoneReason) -> None: ...
    def namespace_renamed(self, seen: Seen) -> None: ...
    def cannot_watch(self, name: str, reason: str, err: BaseException | None) -> None:
        """Something cannot be watched (said once per name and reason)."""
        ...


@dataclass(slots=True)
class _Trouble:
    name: str
    reason: str
    tries: int
    due: float


def trouble_reason(e: OSError) -> str | None:
    """Why opening a namespace failed, or None when it simply vanished meanwhile."""
    if isinstance(e, NotNetworkNamespace):
        return NOT_A_NETWORK_NAMESPACE
    if e.errno in (errno.ENOENT, errno.ESTALE, errno.ESRCH):
        return None
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return OUT_OF_FDS
    if e.errno in (errno.EACCES, errno.EPERM):
        return PERMISSION_DENIED
    return OPEN_FAILED


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
        loop: DiscoveryLoop,
        dirwatch_factory: DirWatchFactory | None = None,
        *,
        discover_processes: bool = False,
        proc: str = PROC,
        follow_mounts: bool = True,
        offload: Offload = run_here,
    ) -> None:
        self.dirs = dirs
        self.filter = name_filter
        self.host_label = host_label
        self.discover_processes = discover_processes
        self._host = host_inode
        self._nsfs_dev = nsfs_dev
        self._owner = owner
        self._loop = loop
        self._proc = proc
        self._factory = dirwatch_factory
        self._dirwatch: DirWatch | None = None
        self._notify: Callable[[str | None], None] = lambda _path: None
        self._offload = offload
        self._looking = False  # a rescan's look is under way
        self._next_why: str | None = None  # why the rescan asked during it is for
        self.scanned_once = False
        self.wanted = True
        self._procs_wanted = True
        self._pending_try = 0
        self._pending_timer = False
        self._pending_since: dict[str, float] = {}
        self._retry_timer: float | None = None
        # What was last reported to the owner, per inode.
        self._reported: dict[int, Seen] = {}
        # Inodes found in a directory that are another kind of namespace.
        self._not_net: set[int] = set()
        self._troubles: dict[int, _Trouble] = {}
        self._strays_said: set[tuple[str, str]] = set()
        # The last /proc scan: namespace inode -> PIDs living in it.
        self._holders: dict[int, list[int]] | None = None
        self._anon_names: dict[int, str] = {}
        self._owners: dict[int, Owner] = {}
        self._holder_watch = HolderWatch(loop, self._holder_exited)
        self._mounts = MountWatch(loop, self._mounts_changed) if follow_mounts else None
        #: Directory entries that are no namespace: path (escaped) -> reason.
        self.strays: Mapping[str, str] = {}
        #: Namespaces that exist but are not watched: name -> reason.
        self.unwatched: Mapping[str, str] = {}
        #: How many things are not watched, per reason (every reason present).
        self.unwatched_counts: Mapping[str, int] = dict.fromkeys(UNWATCHED_REASONS, 0)

    def start(self, notify: Callable[[str | None], None]) -> None:
        """Start the directory watcher; it calls ``notify`` (from its own thread)."""
        self._notify = notify
        if self._factory is not None:
            self._dirwatch = self._factory(self.dirs, notify)
            self._dirwatch.start()
        if self._mounts is not None:
            self._mounts.start()

    def stop(self) -> None:
        """Stop the directory and mount watchers and let go of every holder's pidfd."""
        if self._dirwatch is not None:
            self._dirwatch.stop()
            self._dirwatch = None
        if self._mounts is not None:
            self._mounts.stop()
        self._holder_watch.close()

    def reconfigure(
        self,
        dirs: tuple[str, ...],
        name_filter: NameFilter,
        host_label: str,
        discover_processes: bool | None = None,
    ) -> None:
        """Take new directories and filters; the caller rescans."""
        self.filter = name_filter
        self.host_label = host_label
        if discover_processes is not None:
            self.discover_processes = discover_processes
        self._procs_wanted = True
        if dirs != self.dirs:
            self.dirs = dirs
            if self._dirwatch is not None:
                self._dirwatch.stop()
                self._dirwatch = None
                self.start(self._notify)

    def hint(self) -> None:
        """The kernel hinted at a namespace we may not know (a veth's peer): look in /proc."""
        if self.discover_processes:
            self._procs_wanted = True
            self.wanted = True

    def holder_pid(self, inode: int) -> int | None:
        """The PID whose exit is watched for namespace ``inode`` (a namespace no file holds)."""
        return self._holder_watch.pid_of(inode)

    # -- scanning --

    def rescan(self, why: str, done: Callable[[], None] = lambda: None) -> None:
        """Compare what exists with what is watched, and report the difference; then ``done``.

        The file system is read away from the loop (:func:`look`), one look
        at a time: a rescan asked for during one runs once it is over.
        """
        if self._looking:
            self._next_why = _weightier(self._next_why, why)
            self.wanted = True
            return
        why = _weightier(self._next_why, why)
        self._next_why = None
        self.wanted = False
        procs = self._procs_wanted or _reason(why).procs
        self._procs_wanted = False
        if self._dirwatch is not None:
            self._dirwatch.refresh()
        work = partial(
            look,
            self.dirs,
            self._nsfs_dev,
            self.filter,
            self._proc,
            procs and self.discover_processes,
            frozenset(self._owner.watched()),
            frozenset(self._holder_watch.inodes()),
        )
        self._looking = True

        def then(looked: Looked | BaseException) -> None:
            self._looking = False
            try:
                if isinstance(looked, BaseException):
                    raise looked
                self._compare(why, looked)
            finally:
                done()

        self._offload(work, then, where="rescan")

    def _compare(self, why: str, looked: Looked) -> None:
        now = self._loop.clock()
        if _reason(why).owners:
            self._owners = {}
        s = looked.scan
        named: dict[int, list[str]] = {self._host: [self.host_label]}
        paths: dict[int, str] = {}
        strays = dict(s.strays)
        for f in sorted(s.found, key=lambda f: f.name):
            if f.inode in self._not_net:
                strays[f.path] = NOT_A_NETWORK_NAMESPACE
                continue
            named.setdefault(f.inode, []).append(f.name)
            paths.setdefault(f.inode, f.path)
        self._not_net &= {f.inode for f in s.found}
        young = self._age_pending(s.pending, now, strays)

        watched = list(self._owner.watched())
        if looked.holders is not None:
            self._holders = looked.holders
        holders = self._holders or {}
        want: dict[int, Seen] = {}
        for inode, ns_names in named.items():
            owner = self._owner_of(inode, holders.get(inode, ()))
            want[inode] = Seen(inode, tuple(ns_names), paths.get(inode), inode == self._host, owner)
        if self.discover_processes:
            for inode, pids in holders.items():
                if inode in want or inode in self._not_net or inode in s.excluded:
                    continue
                seen = self._anonymous(inode, pids)
                if seen is not None and self.filter(seen.names[0]):
                    want[inode] = seen
        lost = [i for i in watched if i not in want]
        mounted = looked.mounted
        for inode in lost:
            # Still alive if a process lives in it, or it is mounted somewhere
            # (a filtered-out name, a file covered by another mount).
            alive = inode in holders or inode in s.excluded or inode in mounted
            self._let_go(inode, why, "unwatched" if alive else "deleted")
        for inode, seen in want.items():
            problem = self._offer(seen, why, now, holders.get(inode, ()))
            if problem == NOT_A_NETWORK_NAMESPACE and inode in paths:
                strays[paths[inode]] = problem
        for inode in [i for i in self._troubles if i not in want]:
            del self._troubles[inode]
        for inode in [i for i in self._anon_names if i not in want]:
            del self._anon_names[inode]
        self._owners = {i: o for i, o in self._owners.items() if i in want}
        self._say_strays(strays)
        self._publish(strays)
        self._schedule(young, now)
        self.scanned_once = True

    def _owner_of(self, inode: int, pids: Iterable[int]) -> Owner | None:
        """The first holder that answers, cached while it stays the first."""
        if not self.discover_processes:
            return None
        for pid in pids:
            known = self._owners.get(inode)
            if known is not None and known.pid == pid:
                return known
            owner = owner_of(pid, self._proc)
            if owner is not None:
                self._owners[inode] = owner
                return owner
        self._owners.pop(inode, None)
        return None

    def _anonymous(self, inode: int, pids: list[int]) -> Seen | None:
        name = self._anon_names.get(inode)
        if name is None:
            # Its label is made once, from who holds it now: an owner kept
            # from while it had a file may predate that process's exec
            # (`ip netns exec`, runc's init), and name it after `ip`.
            self._owners.pop(inode, None)
        owner = self._owner_of(inode, pids)
        if owner is None:
            return None
        if name is None:
            name = anonymous_name(owner.pid, owner.comm, owner.unit, owner.container_id)
            self._anon_names[inode] = name
        return Seen(inode, (name,), ns_path(owner.pid, self._proc), False, owner)

    def _offer(self, seen: Seen, why: str, now: float, pids: Iterable[int]) -> str | None:
        """Watch ``seen`` if it is not watched (unless backing off), or report a change.

        Returns why it could not be watched, if it could not.
        """
        inode = seen.inode
        if self._owner.names_of(inode) is not None:
            if self._reported.get(inode) != seen:
                self._owner.namespace_renamed(seen)
                self._reported[inode] = seen
            self._hold(seen, why)
            return None
        trouble = self._troubles.get(inode)
        if trouble is not None and trouble.due > now and not _reason(why).retries:
            return trouble.reason
        err: OSError | None = None
        # A namespace no file holds can be entered through any of its
        # processes; some answer EACCES (another user's sandbox).
        tries = [seen]
        if seen.path is not None and seen.path.startswith(self._proc + "/"):
            tries += [
                Seen(inode, seen.names, ns_path(p, self._proc), False, owner_of(p, self._proc))
                for p in pids
                if ns_path(p, self._proc) != seen.path
            ]
        for attempt in tries:
            try:
                self._owner.namespace_new(attempt, why)
            except OSError as e:
                err = e
                if e.errno in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.ESRCH):
                    continue
                break
            self._troubles.pop(inode, None)
            self._reported[inode] = attempt
            self._hold(attempt, why)
            return None
        if err is None:
            return None
        reason = trouble_reason(err)
        if reason == NOT_A_NETWORK_NAMESPACE:
            self._not_net.add(inode)
        elif reason is not None:
            self._trouble(seen, reason, err, now)
        return reason

    def _hold(self, seen: Seen, why: str) -> None:
        """Watch the holder of a namespace no file holds (pidfd); nothing for the others."""
        if seen.path is None or not seen.path.startswith(self._proc + "/") or seen.owner is None:
            self._holder_watch.unwatch(seen.inode)
            return
        try:
            self._holder_watch.watch(seen.inode, seen.owner.pid)
        except ProcessLookupError:
            # Exited between the scan and now: look again at once.
            self._procs_wanted = self.wanted = True
        except OSError as e:
            # Without a pidfd we could keep the namespace alive after its
            # last process: do not hold it at all.
            self._let_go(seen.inode, why, "unwatched")
            self._trouble(seen, trouble_reason(e) or OPEN_FAILED, e, self._loop.clock())

    def _mounts_changed(self) -> None:
        # A namespace file mounted or unmounted, or a directory covered.
        self.wanted = True

    def _holder_exited(self, inode: int) -> None:
        self._procs_wanted = True
        self.wanted = True

    def _let_go(self, inode: int, why: str, reason: GoneReason) -> None:
        self._holder_watch.unwatch(inode)
        self._reported.pop(inode, None)
        self._owner.namespace_gone(inode, why, reason)

    # -- what cannot be watched --

    def _trouble(self, seen: Seen, reason: str, err: BaseException, now: float) -> None:
        old = self._troubles.get(seen.inode)
        tries = old.tries + 1 if old is not None and old.reason == reason else 0
        delay = RETRY_BACKOFF[min(tries, len(RETRY_BACKOFF) - 1)]
        self._troubles[seen.inode] = _Trouble(seen.names[0], reason, tries, now + delay)
        if old is None or old.reason != reason:
            self._owner.cannot_watch(seen.names[0], reason, err)

    def _age_pending(self, pending: list[str], now: float, strays: dict[str, str]) -> bool:
        """Give up on empty files left unmounted; True while some may still be mounted."""
        self._pending_since = {p: self._pending_since.get(p, now) for p in pending}
        young = False
        for path, since in self._pending_since.items():
            if now - since >= PENDING_GIVE_UP:
                strays[path] = NOT_A_MOUNT_POINT
            else:
                young = True
        return young

    def _say_strays(self, strays: dict[str, str]) -> None:
        now = set(strays.items())
        for path, reason in sorted(now - self._strays_said):
            self._owner.cannot_watch(escape(path), reason, None)
        self._strays_said = now

    def _publish(self, strays: dict[str, str]) -> None:
        # New objects, never mutated: other threads (metrics, /readyz) read them.
        self.strays = {escape(p): r for p, r in strays.items()}
        self.unwatched = {t.name: t.reason for t in self._troubles.values()}
        counts = Counter(strays.values())
        counts.update(t.reason for t in self._troubles.values())
        self.unwatched_counts = {r: counts.get(r, 0) for r in UNWATCHED_REASONS}

    def _schedule(self, young: bool, now: float) -> None:
        if not young:
            self._pending_try = 0
        else:
            delay = PENDING_RETRY[min(self._pending_try, len(PENDING_RETRY) - 1)]
            self._pending_try += 1
            if not self._pending_timer:
                self._pending_timer = True
                self._loop.call_later(delay, "pending", self._pending_rescan)
        if self._troubles:
            due = min(t.due for t in self._troubles.values())
            if self._retry_timer is None or due < self._retry_timer:
                self._retry_timer = due
                self._loop.call_later(max(0.0, due - now), "retry", self._retry_rescan)

    def _pending_rescan(self) -> None:
        self._pending_timer = False
        self.rescan("pending")

    def _retry_rescan(self) -> None:
        self._retry_timer = None
        self.rescan("retry")


@dataclass(frozen=True, slots=True)
class _Reason:
    """What a rescan does for its reason, beyond reading the directories and the mounts."""

    # A rescan asked for while another looks takes the weightiest reason asked.
    weight: int
    # Reads /proc for namespaces only processes hold (else only when a holder went).
    procs: bool
    # Reads each holder's name again: owners are kept between rescans (two
    # file reads each), but a holder may exec something else meanwhile.
    owners: bool
    # Retries namespaces in backoff now rather than when each is due.
    retries: bool


_REASONS = {
    "reload": _Reason(weight=3, procs=True, owners=True, retries=True),
    "periodic": _Reason(weight=2, procs=True, owners=True, retries=False),
}
# Every other reason (a directory event, a mount change, a holder's exit, a retry).
_ORDINARY = _Reason(weight=1, procs=False, owners=False, retries=False)


def _reason(why: str) -> _Reason:
    return _REASONS.get(why, _ORDINARY)


def _weightier(a: str | None, b: str) -> str:
    if a is None:
        return b
    return a if _reason(a).weight >= _reason(b).weight else b
