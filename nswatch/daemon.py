"""The daemon: wires sources (namespace directories, netlink) to the model and sinks.

Wiring only. The parts, each in its own module:

- :class:`nswatch.loop.Loop` — the one event-loop thread: selector, timers, inbox, clock;
- :class:`nswatch.discovery.Discovery` — which namespaces exist (directories, rescans);
- :class:`nswatch.sessions.Sessions` — one netlink session per namespace, and the
  follow-ups carried out on them;
- :func:`nswatch.followups.followups` — the kernel's quirks, pure;
- :class:`nswatch.model.Model` (with :mod:`nswatch.peers`) — the state, pure;
- :mod:`nswatch.periodic` and :class:`nswatch.readiness.Readiness` — safety nets, readiness;
- :class:`nswatch.observer.Fanout` — the sinks.

The loop's thread owns the model. Other threads (HTTP, the directory
watcher) only read a copy of the model taken under the lock, or hand work
in through :meth:`Daemon.wake`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

from nswatch.decode import Decoded
from nswatch.discovery import DirWatch, DirWatchFactory, Discovery, Offload, Seen
from nswatch.followups import LookInProc, followups
from nswatch.loop import Loop
from nswatch.model import (
    Change,
    Dump,
    Event,
    GoneReason,
    Model,
    NamespaceGone,
    NamespaceSeen,
)
from nswatch.netns import NameFilter, NetnsEnterer
from nswatch.observer import Fanout, Observer
from nswatch.periodic import Reconciler, StatsRefresher
from nswatch.readiness import Readiness
from nswatch.sessions import NetlinkSession, SessionOpener, Sessions
from nswatch.settings import Settings

__all__ = ["Daemon", "DirWatch", "NetlinkSession", "SessionOpener", "Settings"]

TICK = 0.5


class Daemon:
    """Keeps :attr:`model` equal to the kernel's state of every watched namespace."""

    def __init__(
        self,
        settings: Settings,
        *,
        observers: Sequence[Observer] = (),
        enterer: NetnsEnterer | None = None,
        dirwatch_factory: DirWatchFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        open_session: SessionOpener | None = None,
        discover_processes: bool | None = None,
        proc: str = "/proc",
        offload: Offload | None = None,
    ) -> None:
        self.settings = settings
        self.observers = Fanout(observers)
        self.clock = clock
        self.wall_clock = wall_clock
        self.model = Model()
        self.lock = threading.Lock()
        self._view: Model | None = None
        self.enterer = enterer or NetnsEnterer()
        self._own_enterer = enterer is None
        self.loop = Loop(clock, lambda where, e: self.observers.error(None, where, e))
        self.sessions = Sessions(
            self.loop, self.enterer, self, lambda: self.settings.netlink_rcvbuf, open_session
        )
        self.discovery = Discovery(
            settings.netns_dirs,
            NameFilter(settings.include, settings.exclude),
            settings.host_label,
            self.enterer.home.inode,
            self.enterer.home.dev,
            self,
            self.loop,
            dirwatch_factory,
            discover_processes=(
                settings.discover_processes if discover_processes is None else discover_processes
            ),
            proc=proc,
            # The directories and /proc are read on the loop's worker thread.
            offload=offload or self.loop.offload,
        )
        self.readiness = Readiness(self._is_complete, lambda: self.observers.ready(self.model))
        self.ready = self.readiness.event
        self._stats = StatsRefresher(self.sessions)
        self._reconcile = Reconciler(
            self.sessions, lambda ns: self.observers.resync(ns, "reconcile")
        )
        self._stop = threading.Event()
        self.stopped = threading.Event()
        self.last_tick = clock()
        #: Each periodic timer's generation, by name: a new interval starts a new one.
        self._timers: dict[str, int] = {}
        self.loop_thread: threading.Thread | None = None

    # -- thread-safe entry points --

    def wake(self, fn: Callable[[], None] | None = None) -> None:
        """Run ``fn`` on the event loop (or just wake it). Safe from any thread."""
        self.loop.call_soon(fn)

    def notify_dir(self, path: str | None) -> None:
        """A namespace directory changed (called from the directory watcher's thread)."""
        self.wake(self._want_rescan)

    def request_stop(self) -> None:
        """Ask the loop to stop; safe from signal handlers and other threads."""
        self._stop.set()
        self.wake()

    def reconfigure(self, settings: Settings) -> None:
        """Take new settings (SIGHUP reload); safe from any thread."""
        self.wake(lambda: self._reconfigure(settings))

    def path_of(self, name: str) -> str | None:
        """The file a namespace is mounted on, by any of its names (any thread)."""
        inode = self.model.by_name.get(name)
        return self.sessions.path_of(inode) if inode is not None else None

    def unwatched(self) -> dict[str, str]:
        """Namespaces that exist but are not watched now: name -> reason (any thread).

        ``/readyz`` must not answer 200 while this is not empty.
        """
        return dict(self.discovery.unwatched)

    def unwatched_counts(self) -> dict[str, int]:
        """How many namespaces and directory entries are not watched, per reason (any thread)."""
        return dict(self.discovery.unwatched_counts)

    def view(self) -> Model:
        """The model as of now, for readers on other threads: shared, never to be mutated.

        One view is made per model version, by the first reader that asks,
        and only the namespaces changed since the previous view are copied;
        every other reader of that version gets the same object.
        """
        with self.lock:
            view = self._view
            if view is None or view.version != self.model.version:
                view = self._view = self.model.snapshot(view)
            return view

    def shown_version(self) -> int:
        """The live model's shown version, without the lock (for a cached document's check).

        One attribute read, atomic under the GIL. Mid-batch it is a version
        no view was made for, so no document matches it and the reader goes
        the slow way, to :meth:`view`.
        """
        return self.model.shown_version

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
            self.discovery.start(self.notify_dir)
            self._safety_nets(None)
            while not self._stop.is_set():
                self.run_once(TICK)
        finally:
            self._shutdown()

    def run_once(self, timeout: float) -> None:
        """One turn of the loop: wait for sockets or timers, then handle them."""
        if self.discovery.wanted:
            self._rescan("event")
        self.loop.run_once(timeout)
        self._reconcile.advance()
        self._stats.advance()
        self.last_tick = self.clock()
        self.observers.tick(self.model)

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
        self.observers.stopping()
        self.discovery.stop()
        self.sessions.close_all()
        self.loop.close()
        if self._own_enterer:
            self.enterer.close()
        self.stopped.set()

    def _safety_nets(self, old: Settings | None) -> None:
        """Start each periodic safety net whose interval is new (at start: all of them)."""
        s = self.settings
        for name, interval, was, fn in (
            ("rescan", s.rescan_interval, old and old.rescan_interval, self._periodic_rescan),
            ("stats", s.stats_interval, old and old.stats_interval, self._stats.due),
            (
                "reconcile",
                s.reconcile_interval,
                old and old.reconcile_interval,
                self._reconcile.due,
            ),
        ):
            if old is None or interval != was:
                self._every(interval, name, fn)

    def _every(self, interval: float, name: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` every ``interval`` seconds (0: never), until ``name`` is given
        another interval (the timer already set then ends without running)."""
        generation = self._timers[name] = self._timers.get(name, 0) + 1
        if interval <= 0:
            return

        def again() -> None:
            if self._timers[name] != generation:
                return
            # Reschedule even when fn raises (the loop reports it): one bad
            # turn must not end a safety net for good.
            try:
                fn()
            finally:
                if self._timers[name] == generation:
                    self.loop.call_later(interval, name, again)

        self.loop.call_later(interval, name, again)

    # -- namespaces (discovery's owner) --

    def _want_rescan(self) -> None:
        self.discovery.wanted = True

    def _rescan(self, why: str) -> None:
        self.discovery.rescan(why, self.readiness.check)

    def _periodic_rescan(self) -> None:
        self._rescan("periodic")
        for inode in self.sessions.stalled():
            self._reopen(inode, "stalled")

    def _reconfigure(self, settings: Settings) -> None:
        old, self.settings = self.settings, settings
        self._safety_nets(old)
        self.discovery.reconfigure(
            settings.netns_dirs,
            NameFilter(settings.include, settings.exclude),
            settings.host_label,
            settings.discover_processes,
        )
        # Socket buffer sizes apply to new sockets; filters and directories
        # take effect with this rescan (namespaces now filtered out are let go).
        self._rescan("reload")

    def watched(self) -> list[int]:
        """Inodes of the namespaces watched now."""
        return list(self.sessions)

    def names_of(self, inode: int) -> tuple[str, ...] | None:
        """The names of a watched namespace, or None."""
        if inode not in self.sessions:
            return None
        ns = self.model.namespaces.get(inode)
        return ns.names if ns is not None else ()

    def namespace_new(self, seen: Seen, why: str, dump: str = "initial") -> None:
        """Open a session in a namespace that appeared, and dump it (OSError: cannot)."""
        session = self.sessions.open(seen.inode, seen.names[0], seen.path, why)
        self.readiness.watch(seen.inode)
        self._apply([_seen_event(seen)], reason=why)
        session.start(dump)

    def namespace_renamed(self, seen: Seen) -> None:
        """A watched namespace's names, file or holder changed."""
        self.sessions.moved(seen.inode, seen.path)
        self._apply([_seen_event(seen)])

    def namespace_gone(self, inode: int, why: str, reason: GoneReason = "deleted") -> None:
        """A namespace went (or is no longer watched): let go of it at once, then drop it."""
        # Close the socket first: an open socket inside the namespace keeps it
        # alive, and with it the host end of its veths.
        self.sessions.close(inode)
        self._apply([NamespaceGone(inode, reason)], reason=why)
        self.readiness.check()

    def cannot_watch(self, name: str, reason: str, err: BaseException | None) -> None:
        """Something cannot be watched: said once per name and reason (discovery sees to it)."""
        self.observers.error(name, reason, err or OSError(reason.replace("_", " ")))

    def _reopen(self, inode: int, why: str) -> None:
        """Replace a namespace's socket: the kernel forgets a stuck dump with it."""
        ns = self.model.namespaces.get(inode)
        if ns is None or inode not in self.sessions:
            return
        path = self.sessions.path_of(inode)
        self.sessions.close(inode)
        self.observers.error(ns.name, "dump_stalled", TimeoutError("no dump reply in time"))
        self.observers.resync(ns.name, why)
        try:
            self.namespace_new(Seen(inode, ns.names, path, ns.is_host, ns.owner), why, dump=why)
        except OSError as e:
            # Gone meanwhile, or out of fds: the next scan finds out which.
            self.observers.error(ns.name, "open_namespace", e)
            self._want_rescan()

    def _is_complete(self, inode: int) -> bool:
        # Synced, and no dump or nsid question outstanding: the veth peers of
        # the first dump are resolved too.
        s = self.sessions.get(inode)
        return s is None or (s.synced and s.idle)

    # -- what sessions read (sessions' owner) --

    def batch(
        self, session: NetlinkSession, events: list[Event], notes: list[Decoded], stale: str | None
    ) -> None:
        """Apply one read's events to the model, then carry out the follow-ups."""
        t0 = time.perf_counter()
        if stale is not None:
            # Only ENOBUFS is an overrun; a message that failed to decode
            # also resyncs the namespace, under its own reason.
            if stale == "overrun":
                self.observers.overrun(session.name)
            self.observers.resync(session.name, stale)
        if notes:
            self.observers.netlink_events(Counter((d.type, d.action) for d in notes))
        if not events:
            return
        changes = self._apply(events)
        live = session.inode in self.sessions
        actions = followups(
            session.inode, events, changes, self.model, synced=session.synced and live
        )
        if any(isinstance(a, LookInProc) for a in actions):
            self.discovery.hint()
        self.sessions.carry_out(actions)
        self.observers.processed(time.perf_counter() - t0, self.wall_clock())
        # After the follow-ups: an nsid question just sent keeps the namespace unready.
        self.readiness.progress(session.inode)

    def error(self, netns: str | None, where: str, err: BaseException) -> None:
        """A handled error from the kernel or the file system."""
        self.observers.error(netns, where, err)

    def lost(self, inode: int) -> None:
        """A session's socket broke: find the namespace again."""
        self._want_rescan()

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
            self.observers.changes(changes, why)
        return out


def _seen_event(seen: Seen) -> NamespaceSeen:
    return NamespaceSeen(seen.inode, seen.names, is_host=seen.is_host, owner=seen.owner)
