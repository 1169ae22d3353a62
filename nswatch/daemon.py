"""The daemon: wires sources (namespace directories, netlink) to the model and sinks.

One event-loop thread owns the model, every netlink socket and all timers.
Other threads (HTTP, watchdog) only read a copy of the model taken under the
lock, or enqueue work through :meth:`Daemon.wake`.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import os
import queue
import selectors
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from nswatch.decode import Decoded
from nswatch.model import (
    Change,
    Dump,
    DumpKind,
    Event,
    Family,
    Link,
    Model,
    NamespaceGone,
    NamespaceSeen,
    RouteDel,
    RouteNew,
    VethPair,
)
from nswatch.netlink import Session, ipv4_stale_links, make_socket
from nswatch.netns import NameFilter, NetnsEnterer, scan
from nswatch.observer import BaseObserver, Observer
from nswatch.settings import Settings as Settings  # re-exported: callers build it from here


class NetlinkSession(Protocol):
    """One namespace's netlink conversation, as the daemon drives it (see netlink.Session)."""

    inode: int
    name: str
    synced: bool

    def fileno(self) -> int: ...
    @property
    def busy(self) -> bool: ...
    @property
    def idle(self) -> bool: ...
    def stalled(self, timeout: float) -> bool: ...
    def start(self, reason: str = "initial") -> None: ...
    def resync(self, reason: str, kinds: Iterable[DumpKind] = ...) -> None: ...
    def redump_routes(self, family: Family, reason: str, dev: int | None = None) -> None: ...
    def refresh_stats(self) -> None: ...
    def ask_nsid(self, target: int, fd: int) -> None: ...
    def read(self) -> tuple[list[Event], list[Decoded], str | None]: ...
    def close(self) -> None: ...


SessionOpener = Callable[[int, str, "str | None"], NetlinkSession]
"""Open a session for (inode, name, namespace file path or None for our own)."""


class DirWatch(Protocol):
    """A source of "something changed in the namespace directories" (see dirwatch)."""

    def start(self) -> None: ...
    def refresh(self) -> None: ...
    def stop(self) -> None: ...


# Retries for a namespace file that exists but is not mounted yet: `ip netns
# add` creates the file and bind-mounts the namespace onto it a moment later,
# and the mount raises no inotify event.
PENDING_RETRY = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
TICK = 0.5
ROUTE_FOLLOWUP_DELAYS = (0.02, 0.3)
# A dump with no reply for this long is abandoned with its socket (checked
# at each periodic rescan).
DUMP_STALL = 20.0
STATS_PER_TURN = 16


class Daemon:
    """Keeps :attr:`model` equal to the kernel's state of every watched namespace."""

    def __init__(
        self,
        settings: Settings,
        *,
        observers: Sequence[Observer] = (),
        enterer: NetnsEnterer | None = None,
        dirwatch_factory: Callable[[Iterable[str], Callable[[str | None], None]], DirWatch]
        | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        open_session: SessionOpener | None = None,
    ) -> None:
        self.settings = settings
        self.observers: list[Observer] = list(observers) or [BaseObserver()]
        self.clock = clock
        self.wall_clock = wall_clock
        self.model = Model()
        self.lock = threading.Lock()
        self.enterer = enterer or NetnsEnterer()
        self._own_enterer = enterer is None
        self._filter = NameFilter(settings.include, settings.exclude)
        self._dirwatch_factory = dirwatch_factory
        self._dirwatch: DirWatch | None = None
        self._open_session: SessionOpener = open_session or self._real_session
        self.sessions: dict[int, NetlinkSession] = {}
        self.paths: dict[int, str] = {}
        self._asked: set[tuple[int, int]] = set()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, str, Callable[[], None]]] = []
        self._pending_timer = False
        self._route_dumps_due: set[tuple[int, str, float, int | None]] = set()
        self._timer_seq = 0
        self._rescan_wanted = True
        self._pending_try = 0
        self._reconcile: deque[int] = deque()
        self._stats_due: deque[int] = deque()
        self._reconciling: int | None = None
        self._stop = threading.Event()
        self.stopped = threading.Event()
        self.ready = threading.Event()
        self._scanned_once = False
        self._unready: set[int] = set()
        self.last_tick = clock()
        self.loop_thread: threading.Thread | None = None

    # -- thread-safe entry points --

    def wake(self, fn: Callable[[], None] | None = None) -> None:
        """Run ``fn`` on the event loop (or just wake it). Safe from any thread."""
        if fn is not None:
            self._inbox.put(fn)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def notify_dir(self, path: str | None) -> None:
        """A namespace directory changed (called from watchdog's thread)."""
        self.wake(self._want_rescan)

    def request_stop(self) -> None:
        """Ask the loop to stop; safe from signal handlers and other threads."""
        self._stop.set()
        self.wake()

    def reconfigure(self, settings: Settings) -> None:
        """Take new settings (SIGHUP reload); safe from any thread."""
        self.wake(lambda: self._reconfigure(settings))

    def _reconfigure(self, settings: Settings) -> None:
        old = self.settings
        self.settings = settings
        self._filter = NameFilter(settings.include, settings.exclude)
        if settings.netns_dirs != old.netns_dirs and self._dirwatch is not None:
            self._dirwatch.stop()
            assert self._dirwatch_factory is not None
            self._dirwatch = self._dirwatch_factory(settings.netns_dirs, self.notify_dir)
            self._dirwatch.start()
        # Socket buffer sizes apply to new sockets; filters and directories
        # take effect with this rescan (namespaces now filtered out are let go).
        self._rescan("reload")

    def path_of(self, name: str) -> str | None:
        """The file a namespace is mounted on, by any of its names (any thread)."""
        inode = self.model.by_name.get(name)
        return self.paths.get(inode) if inode is not None else None

    def view(self) -> Model:
        """A consistent copy of the model, for readers on other threads."""
        with self.lock:
            return self.model.copy()

    # -- lifecycle --

    def start(self) -> threading.Thread:
        """Run the loop on a new thread and return it."""
        t = threading.Thread(target=self.run, name="nswatch-loop", daemon=True)
        self.loop_thread = t
        t.start()
        return t

    def run(self) -> None:
        """The event loop; returns after :meth:`request_stop`."""
        try:
            if self._dirwatch_factory is not None:
                self._dirwatch = self._dirwatch_factory(self.settings.netns_dirs, self.notify_dir)
                self._dirwatch.start()
            self._schedule(self.settings.rescan_interval, "rescan", self._periodic_rescan)
            if self.settings.stats_interval > 0:
                self._schedule(self.settings.stats_interval, "stats", self._periodic_stats)
            if self.settings.reconcile_interval > 0:
                self._schedule(
                    self.settings.reconcile_interval, "reconcile", self._periodic_reconcile
                )
            while not self._stop.is_set():
                self.run_once(TICK)
        finally:
            self._shutdown()

    def run_once(self, timeout: float) -> None:
        """One turn of the loop: wait for sockets or timers, then handle them."""
        if self._rescan_wanted:
            self._rescan_wanted = False
            self._rescan("event")
        now = self.clock()
        if self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - now))
        for key, _ in self._selector.select(timeout):
            try:
                if key.data is None:
                    self._drain_wake()
                else:
                    self._read(key.data)
            except Exception as e:  # the loop must outlive any one bug
                self._error(getattr(key.data, "name", None), "event_loop", e)
        self._run_timers()
        self._advance_reconcile()
        self._advance_stats()
        self.last_tick = self.clock()
        for o in self.observers:
            o.tick(self.model)

    def sync_once(self, timeout: float = 30.0) -> bool:
        """Scan and dump everything once (for ``nswatch snapshot``); True when complete."""
        deadline = self.clock() + timeout
        while self.clock() < deadline:
            self.run_once(0.05)
            if self.ready.is_set():
                return True
        return False

    def close(self) -> None:
        """Release every socket, fd and thread this daemon holds."""
        self._shutdown()

    def _shutdown(self) -> None:
        if self.stopped.is_set():
            return
        for o in self.observers:
            o.stopping()
        if self._dirwatch is not None:
            self._dirwatch.stop()
            self._dirwatch = None
        for inode in list(self.sessions):
            self._close_session(inode)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._own_enterer:
            self.enterer.close()
        self.stopped.set()

    # -- timers and wakeups --

    def _schedule(self, delay: float, name: str, fn: Callable[[], None]) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (self.clock() + delay, self._timer_seq, name, fn))

    def _run_timers(self) -> None:
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, _, fn = heapq.heappop(self._timers)
            fn()

    def _periodic_rescan(self) -> None:
        self._rescan("periodic")
        for inode in [i for i, s in self.sessions.items() if s.stalled(DUMP_STALL)]:
            self._reopen(inode, "stalled")
        self._schedule(self.settings.rescan_interval, "rescan", self._periodic_rescan)

    def _periodic_reconcile(self) -> None:
        self._start_reconcile()
        self._schedule(self.settings.reconcile_interval, "reconcile", self._periodic_reconcile)

    def _periodic_stats(self) -> None:
        if not self._stats_due:
            self._stats_due.extend(self.sessions)
        self._schedule(self.settings.stats_interval, "stats", self._periodic_stats)

    def _advance_stats(self) -> None:
        """Refresh a few namespaces' counters per turn, so no turn takes long."""
        for _ in range(min(STATS_PER_TURN, len(self._stats_due))):
            s = self.sessions.get(self._stats_due.popleft())
            if s is not None and s.synced:
                s.refresh_stats()

    def _pending_rescan(self) -> None:
        self._pending_timer = False
        self._rescan("pending")

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        while True:
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                break
            fn()

    def _want_rescan(self) -> None:
        self._rescan_wanted = True

    # -- namespaces --

    def _rescan(self, why: str) -> None:
        if self._dirwatch is not None:
            self._dirwatch.refresh()
        found, pending = scan(self.settings.netns_dirs, self.enterer.home.dev, self._filter)
        host = self.enterer.home.inode
        names: dict[int, list[str]] = {host: [self.settings.host_label]}
        paths: dict[int, str] = {}
        for f in sorted(found, key=lambda f: f.name):
            names.setdefault(f.inode, []).append(f.name)
            paths.setdefault(f.inode, f.path)
        gone = [inode for inode in self.sessions if inode not in names]
        for inode in gone:
            self._namespace_gone(inode, why)
        for inode, ns_names in names.items():
            if inode not in self.sessions:
                self._namespace_new(inode, tuple(ns_names), paths.get(inode), why)
            else:
                if inode in paths:
                    self.paths[inode] = paths[inode]
                ns = self.model.namespaces.get(inode)
                if ns is not None and ns.names != tuple(ns_names):
                    self._apply([NamespaceSeen(inode, tuple(ns_names), is_host=inode == host)])
        if pending:
            delay = PENDING_RETRY[min(self._pending_try, len(PENDING_RETRY) - 1)]
            self._pending_try += 1
            if not self._pending_timer:
                self._pending_timer = True
                self._schedule(delay, "pending", self._pending_rescan)
        else:
            self._pending_try = 0
        self._scanned_once = True
        self._check_ready()

    def _namespace_new(
        self, inode: int, names: tuple[str, ...], path: str | None, why: str, dump: str = "initial"
    ) -> None:
        is_host = inode == self.enterer.home.inode
        try:
            session = self._open_session(inode, names[0], None if is_host else path)
        except OSError as e:
            # The namespace vanished between scan and open (ENOENT, ESTALE,
            # EINVAL): normal under churn; the next scan sees the truth.
            self._error(names[0], "open_namespace", e)
            return
        self.sessions[inode] = session
        if path is not None:
            self.paths[inode] = path
        self._selector.register(session, selectors.EVENT_READ, session)
        if not self.ready.is_set():
            self._unready.add(inode)
        self._apply([NamespaceSeen(inode, names, is_host=is_host)], reason=why)
        session.start(dump)

    def _real_session(self, inode: int, name: str, path: str | None) -> NetlinkSession:
        """A netlink socket inside the namespace at ``path`` (None: our own)."""
        rcvbuf = self.settings.netlink_rcvbuf
        if path is None:
            return Session(inode, name, make_socket(rcvbuf))
        fd = self.enterer.open_ns(path, inode)
        try:
            sock = self.enterer.run_in(fd, lambda: make_socket(rcvbuf))
        finally:
            os.close(fd)
        return Session(inode, name, sock)

    def _namespace_gone(self, inode: int, why: str) -> None:
        # Close the socket first and at once: an open socket inside the
        # namespace keeps it alive, and with it the host end of its veths.
        self._close_session(inode)
        self._asked = {p for p in self._asked if inode not in p}
        self._apply([NamespaceGone(inode)], reason=why)
        self._check_ready()

    def _reopen(self, inode: int, why: str) -> None:
        """Replace a namespace's socket: the kernel forgets a stuck dump with it."""
        ns = self.model.namespaces.get(inode)
        session = self.sessions.get(inode)
        if ns is None or session is None:
            return
        path = self.paths.get(inode)
        self._close_session(inode)
        self._error(ns.name, "dump_stalled", TimeoutError(f"no dump reply for {DUMP_STALL}s"))
        for o in self.observers:
            o.resync(ns.name, why)
        self._namespace_new(inode, ns.names, path, why, dump=why)

    def _close_session(self, inode: int) -> None:
        session = self.sessions.pop(inode, None)
        self.paths.pop(inode, None)
        if session is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(session)
        session.close()

    def _check_ready(self) -> None:
        if self.ready.is_set() or not self._scanned_once:
            return
        for inode in [i for i in self._unready if self._is_complete(i)]:
            self._unready.discard(inode)
        if not self._unready:
            self.ready.set()
            for o in self.observers:
                o.ready(self.model)

    def _is_complete(self, inode: int) -> bool:
        # Synced, and no dump or nsid question outstanding: the veth peers of
        # the first dump are resolved too.
        s = self.sessions.get(inode)
        return s is None or (s.synced and s.idle)

    # -- netlink --

    def _read(self, session: NetlinkSession) -> None:
        t0 = time.perf_counter()
        try:
            events, notes, stale = session.read()
        except OSError as e:
            self._error(session.name, "netlink_read", e)
            if e.errno in (errno.EBADF, errno.ENOTSOCK):
                self._close_session(session.inode)
                self._want_rescan()
            return
        if stale is not None:
            for o in self.observers:
                o.overrun(session.name)
                o.resync(session.name, stale)
        if notes:
            counts: Counter[tuple[str, str]] = Counter((d.type, d.action) for d in notes)
            for o in self.observers:
                o.netlink_events(counts)
        if not events:
            return
        changes = self._apply(events)
        if session.synced and session.inode in self.sessions:
            self._followups(session, events, changes)
        self._resolve_peers(changes)
        elapsed = time.perf_counter() - t0
        for o in self.observers:
            o.processed(elapsed, self.wall_clock())
        if session.inode in self._unready and self._is_complete(session.inode):
            self._unready.discard(session.inode)
            self._check_ready()

    def _apply(self, events: Sequence[Event], reason: str | None = None) -> list[Change]:
        """Apply events under the lock and tell the sinks, grouped by dump reason."""
        out: list[Change] = []
        batches: list[tuple[str | None, list[Change]]] = []
        with self.lock:
            for ev in events:
                changes = self.model.apply(ev)
                if not changes:
                    continue
                why = ev.reason if isinstance(ev, Dump) else reason
                if batches and batches[-1][0] == why:
                    batches[-1][1].extend(changes)
                else:
                    batches.append((why, list(changes)))
                out.extend(changes)
        for why, changes in batches:
            for o in self.observers:
                o.changes(changes, why)
        return out

    def _followups(
        self, session: NetlinkSession, events: Sequence[Event], changes: Sequence[Change]
    ) -> None:
        """Re-dump what the kernel changed without a precise notification."""
        # The notification can reach us while the kernel is still inside the
        # same operation, before it flushes the dependent routes; a dump now
        # could still see them. Dump a little later, and once more later
        # still in case this machine is slow.
        for index in ipv4_stale_links(changes):
            for delay in ROUTE_FOLLOWUP_DELAYS:
                self._later_route_dump(session.inode, "inet", delay, index)
        # A veth created with its peer in another namespace is announced
        # before the peer is attached (IFLA_LINK 0), and no message follows
        # once it is: only a fresh dump shows the peer.
        if any(
            ch.kind == "link"
            and not ch.from_dump
            and isinstance(ch.new, Link)
            and ch.new.kind == "veth"
            and ch.new.peer_index is None
            for ch in changes
        ):
            session.resync("veth_incomplete", kinds=("link",))
        # When a veth end moves to another namespace, the kernel tells nobody
        # about the other end, whose IFLA_LINK_NETNSID (and IFLA_LINK, if the
        # ifindex changed) are now stale: re-dump the other end's links.
        for ch in changes:
            if ch.kind == "veth_peer" and ch.action == "lost" and ch.reason == "moved":
                assert isinstance(ch.old, VethPair)
                partner = self.sessions.get(ch.old.b[0])
                if partner is not None:
                    partner.resync("peer_moved", kinds=("link",))
        for ev in events:
            if isinstance(ev, RouteNew | RouteDel) and self.model.multipath_candidates(
                session.inode, ev.route
            ):
                self._later_route_dump(session.inode, "inet6", ROUTE_FOLLOWUP_DELAYS[0])
                break

    def _later_route_dump(
        self, inode: int, family: Family, delay: float, dev: int | None = None
    ) -> None:
        key = (inode, family, delay, dev)
        if key in self._route_dumps_due:
            return
        self._route_dumps_due.add(key)

        def fire() -> None:
            self._route_dumps_due.discard(key)
            session = self.sessions.get(inode)
            if session is not None:
                session.redump_routes(family, "route_followup", dev)

        self._schedule(delay, "route_followup", fire)

    def _resolve_peers(self, changes: Sequence[Change]) -> None:
        """Ask the kernel for the nsids needed to place new veth ends' peers."""
        for ch in changes:
            if ch.kind != "link" or not isinstance(ch.new, Link) or ch.new.kind != "veth":
                continue
            link = ch.new
            if (ch.inode, link.index) in self.model.peers or link.peer_netnsid is None:
                continue
            ns = self.model.namespaces.get(ch.inode)
            if ns is None or link.peer_netnsid in ns.nsids:
                continue
            session = self.sessions.get(ch.inode)
            if session is None:
                continue
            for target in self.model.peer_candidates(ch.inode, link):
                if (ch.inode, target) in self._asked:
                    continue
                self._asked.add((ch.inode, target))
                self._ask_nsid(session, target)

    def _ask_nsid(self, session: NetlinkSession, target: int) -> None:
        try:
            if target == self.enterer.home.inode:
                fd = self.enterer.home_fd()
            else:
                fd = self.enterer.open_ns(self.paths[target], target)
        except (OSError, KeyError) as e:
            self._error(session.name, "nsid_open", e)
            return
        try:
            session.ask_nsid(target, fd)
        except OSError as e:
            self._error(session.name, "nsid_query", e)
        finally:
            os.close(fd)

    # -- reconcile --

    def _start_reconcile(self) -> None:
        if self._reconcile or self._reconciling is not None:
            return
        self._reconcile.extend(self.sessions)

    def _advance_reconcile(self) -> None:
        """Reconcile one namespace at a time so the dumps never pile up."""
        current = self._reconciling
        if current is not None:
            s = self.sessions.get(current)
            if s is not None and s.busy:
                return
            self._reconciling = None
        while self._reconcile:
            inode = self._reconcile.popleft()
            s = self.sessions.get(inode)
            if s is None or not s.synced:
                continue
            self._reconciling = inode
            s.resync("reconcile")
            for o in self.observers:
                o.resync(s.name, "reconcile")
            return

    def _error(self, netns: str | None, where: str, err: BaseException) -> None:
        for o in self.observers:
            o.error(netns, where, err)
