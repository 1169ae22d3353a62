"""The daemon's own logic against a fake netlink session and a fake clock (no kernel needed)."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nswatch.daemon import Daemon, NetlinkSession, Settings
from nswatch.decode import Decoded
from nswatch.discovery import run_here
from nswatch.model import Change, Dump, DumpKind, Event, Family, Link, LinkNew, Synced
from nswatch.observer import BaseObserver


class FakeClock:
    """Time that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSession:
    """A namespace's netlink conversation, scripted by the test."""

    def __init__(self, inode: int, name: str) -> None:
        self.inode = inode
        self.name = name
        self.synced = False
        self._r, self._w = os.pipe()
        self._pending: list[tuple[list[Event], list[Decoded], str | None]] = []
        self.started: list[str] = []
        self.resyncs: list[tuple[str, tuple[DumpKind, ...]]] = []
        self.route_dumps: list[tuple[Family, str, int | None]] = []
        self.dumping = False
        self.closed = False
        self.fail_next_read: Exception | None = None

    # what the test does
    def feed(self, events: list[Event], stale: str | None = None) -> None:
        self._pending.append((events, [], stale))
        os.write(self._w, b"x")

    def fail(self, err: Exception) -> None:
        """Make the next read raise ``err`` (what it would have read is lost)."""
        self.fail_next_read = err
        os.write(self._w, b"x")

    # the protocol
    def fileno(self) -> int:
        return self._r

    @property
    def busy(self) -> bool:
        return self.dumping

    @property
    def idle(self) -> bool:
        return not self.dumping

    def stalled(self, timeout: float) -> bool:
        return False

    def start(self, reason: str = "initial") -> None:
        self.started.append(reason)
        self.dumping = True

    def resync(self, reason: str, kinds: Iterable[DumpKind] = ("link", "address", "route")) -> None:
        self.resyncs.append((reason, tuple(kinds)))

    def redump_routes(self, family: Family, reason: str, dev: int | None = None) -> None:
        self.route_dumps.append((family, reason, dev))

    def refresh_stats(self) -> None:
        return None

    def ask_nsid(self, target: int, fd: int) -> None:
        return None

    def read(self) -> tuple[list[Event], list[Decoded], str | None]:
        os.read(self._r, 4096)
        if self.fail_next_read is not None:
            err, self.fail_next_read = self.fail_next_read, None
            self._pending.clear()
            raise err
        events: list[Event] = []
        stale = None
        for evs, _notes, st in self._pending:
            events.extend(evs)
            stale = stale or st
            if any(isinstance(e, Synced) for e in evs):
                self.synced = True
                self.dumping = False
        self._pending.clear()
        return events, [], stale

    def close(self) -> None:
        if not self.closed:
            os.close(self._r)
            os.close(self._w)
            self.closed = True


class Recorder(BaseObserver):
    def __init__(self) -> None:
        self.overruns: list[str] = []
        self.resyncs: list[tuple[str, str]] = []
        self.ready_calls = 0
        self.errors: list[tuple[str | None, str, BaseException]] = []

    def error(self, netns: str | None, where: str, err: BaseException) -> None:
        self.errors.append((netns, where, err))

    def overrun(self, netns: str) -> None:
        self.overruns.append(netns)

    def resync(self, netns: str, reason: str) -> None:
        self.resyncs.append((netns, reason))

    def ready(self, model: object) -> None:
        self.ready_calls += 1


class Boom(BaseObserver):
    """A sink with a bug: raises from changes() while armed."""

    def __init__(self) -> None:
        self.armed = False
        self.calls = 0

    def changes(self, changes: Sequence[Change], reason: str | None) -> None:
        self.calls += 1
        if self.armed:
            raise RuntimeError("sink bug")


Rig = tuple[Daemon, FakeClock, dict[int, FakeSession], Recorder]


@pytest.fixture
def boom() -> Boom:
    return Boom()


@pytest.fixture
def rig(tmp_path: Path, boom: Boom) -> Iterator[Rig]:
    clock = FakeClock()
    sessions: dict[int, FakeSession] = {}

    def open_session(inode: int, name: str, path: str | None) -> NetlinkSession:
        s = FakeSession(inode, name)
        sessions[inode] = s
        return s

    rec = Recorder()
    daemon = Daemon(
        # The fake kernel has no processes to look for in /proc.
        Settings(
            netns_dirs=(str(tmp_path),),
            reconcile_interval=0,
            stats_interval=0,
            discover_processes=False,
        ),
        observers=[boom, rec],
        clock=clock,
        open_session=open_session,
        # The directories are read at once, here: each turn's outcome is known.
        offload=run_here,
    )
    try:
        yield daemon, clock, sessions, rec
    finally:
        daemon.close()
        for s in sessions.values():
            s.close()


def _sync(session: FakeSession, links: Sequence[Link] = ()) -> None:
    session.feed(
        [
            Dump(session.inode, "link", tuple(links)),
            Dump(session.inode, "address", ()),
            Dump(session.inode, "route", ()),
            Synced(session.inode),
        ]
    )


def test_ready_only_after_the_first_full_dump(
    rig: tuple[Daemon, FakeClock, dict[int, FakeSession], Recorder],
) -> None:
    """The daemon is not ready until every session has synced and has nothing outstanding."""
    daemon, _clock, sessions, rec = rig
    daemon.run_once(0)
    host = sessions[daemon.enterer.home.inode]
    assert host.started == ["initial"]
    assert not daemon.ready.is_set()
    _sync(host, [Link(index=1, name="lo", kind="loopback", admin_up=True)])
    daemon.run_once(0.1)
    assert daemon.ready.is_set() and rec.ready_calls == 1
    assert daemon.model.get("host") is not None


def test_admin_down_redumps_that_links_ipv4_routes_later(
    rig: tuple[Daemon, FakeClock, dict[int, FakeSession], Recorder],
) -> None:
    """Admin-down schedules IPv4 route re-dumps of that link only, 20 ms and 300 ms later, not at once."""
    daemon, clock, sessions, _rec = rig
    daemon.run_once(0)
    host = sessions[daemon.enterer.home.inode]
    up = Link(index=7, name="v0", kind="veth", admin_up=True, peer_index=8, peer_netnsid=None)
    _sync(host, [up])
    daemon.run_once(0.1)
    host.feed(
        [LinkNew(host.inode, Link(index=7, name="v0", kind="veth", admin_up=False, peer_index=8))]
    )
    daemon.run_once(0.1)
    assert host.route_dumps == []
    clock.now += 0.021
    daemon.run_once(0)
    assert host.route_dumps == [("inet", "route_followup", 7)]
    clock.now += 0.3
    daemon.run_once(0)
    assert host.route_dumps == [("inet", "route_followup", 7)] * 2


def test_overrun_is_reported(
    rig: tuple[Daemon, FakeClock, dict[int, FakeSession], Recorder],
) -> None:
    """A session that went stale is reported to the sinks as an overrun and a resync."""
    daemon, _clock, sessions, rec = rig
    daemon.run_once(0)
    host = sessions[daemon.enterer.home.inode]
    _sync(host)
    daemon.run_once(0.1)
    host.feed([], stale="overrun")
    daemon.run_once(0.1)
    assert rec.overruns == ["host"] and ("host", "overrun") in rec.resyncs


def test_veth_announced_without_peer_is_redumped(
    rig: tuple[Daemon, FakeClock, dict[int, FakeSession], Recorder],
) -> None:
    """A veth notified before its peer is attached triggers a link re-dump of that namespace."""
    daemon, _clock, sessions, _rec = rig
    daemon.run_once(0)
    host = sessions[daemon.enterer.home.inode]
    _sync(host)
    daemon.run_once(0.1)
    host.feed([LinkNew(host.inode, Link(index=9, name="v9", kind="veth"))])
    daemon.run_once(0.1)
    assert ("veth_incomplete", ("link",)) in host.resyncs


def _synced_host(rig: Rig) -> FakeSession:
    daemon, _clock, sessions, _rec = rig
    daemon.run_once(0)
    host = sessions[daemon.enterer.home.inode]
    _sync(host)
    daemon.run_once(0.1)
    assert daemon.ready.is_set()
    return host


def _dev(index: int) -> Link:
    return Link(index=index, name=f"d{index}", kind="device")


def test_observer_exception_is_reported_and_the_loop_goes_on(rig: Rig, boom: Boom) -> None:
    """A sink raising from changes() is reported through error(); the model and other sinks carry on."""
    daemon, _clock, _sessions, rec = rig
    host = _synced_host(rig)
    boom.armed = True
    host.feed([LinkNew(host.inode, _dev(3))])
    daemon.run_once(0.1)
    assert [(n, w, str(e)) for n, w, e in rec.errors] == [
        (None, "observer:Boom.changes", "sink bug")
    ]
    ns = daemon.model.namespaces[host.inode]
    assert 3 in ns.links
    host.feed([LinkNew(host.inode, _dev(4))])
    daemon.run_once(0.1)
    assert 4 in ns.links and boom.calls >= 3 and len(rec.errors) == 2


def test_timer_exception_is_reported_and_later_timers_still_run(rig: Rig) -> None:
    """A timer callback that raises is reported as timer:<name>; the next timers and reads still run."""
    daemon, clock, _sessions, rec = rig
    host = _synced_host(rig)
    ran: list[str] = []

    def bad() -> None:
        ran.append("bad")
        raise ValueError("timer bug")

    daemon.loop.call_later(0.5, "bad", bad)
    daemon.loop.call_later(0.6, "good", lambda: ran.append("good"))
    clock.now += 1.0
    daemon.run_once(0)
    assert ran == ["bad", "good"]
    assert [(w, str(e)) for _n, w, e in rec.errors] == [("timer:bad", "timer bug")]
    host.feed([LinkNew(host.inode, _dev(5))])
    daemon.run_once(0.1)
    assert 5 in daemon.model.namespaces[host.inode].links


def test_periodic_job_that_raises_keeps_its_schedule(rig: Rig) -> None:
    """A periodic safety net (rescan, stats, reconcile) that raises once is reported and still runs at its next interval."""
    daemon, clock, _sessions, rec = rig
    _synced_host(rig)
    runs: list[float] = []

    def flaky() -> None:
        runs.append(clock.now)
        if len(runs) == 1:
            raise OSError("transient")

    daemon._every(10.0, "flaky", flaky)
    for _ in range(3):
        clock.now += 10.0
        daemon.run_once(0)
    assert len(runs) == 3
    assert [w for _n, w, _e in rec.errors] == ["timer:flaky"]


def test_exception_in_a_session_read_resyncs_that_namespace(rig: Rig) -> None:
    """A bug while reading a session is reported as netlink_session and re-dumps that namespace only."""
    daemon, _clock, _sessions, rec = rig
    host = _synced_host(rig)
    host.resyncs.clear()
    host.fail(RuntimeError("decoder bug"))
    daemon.run_once(0.1)
    assert [(n, w, str(e)) for n, w, e in rec.errors] == [
        ("host", "netlink_session", "decoder bug")
    ]
    assert host.resyncs == [("error", ("link", "address", "route"))]
    host.feed([LinkNew(host.inode, _dev(6))])
    daemon.run_once(0.1)
    assert 6 in daemon.model.namespaces[host.inode].links


def test_broken_socket_is_closed_and_the_namespace_found_again(rig: Rig) -> None:
    """EBADF from a session's read closes it; the next rescan opens a new session and dumps again."""
    daemon, _clock, sessions, rec = rig
    host = _synced_host(rig)
    host.fail(OSError(errno.EBADF, "Bad file descriptor"))
    daemon.run_once(0.1)
    assert [w for _n, w, _e in rec.errors] == ["netlink_read"]
    assert host.closed
    daemon.run_once(0)
    again = sessions[daemon.enterer.home.inode]
    assert again is not host and again.started == ["initial"]


def test_decode_error_is_a_resync_not_an_overrun(rig: Rig) -> None:
    """A session that went stale for a reason other than ENOBUFS is resynced under that reason, not counted as an overrun."""
    daemon, _clock, _sessions, rec = rig
    host = _synced_host(rig)
    host.feed([], stale="decode_error")
    daemon.run_once(0.1)
    assert rec.overruns == [] and rec.resyncs == [("host", "decode_error")]


def test_a_reload_gives_the_safety_nets_their_new_intervals(rig: Rig) -> None:
    """A reload's new reconcile_interval takes effect at once: 0 -> 10 s starts a
    reconcile every 10 s, 10 -> 30 s spaces them out, and back to 0 stops them."""
    daemon, clock, _sessions, _rec = rig
    host = _synced_host(rig)

    def reconciles_over(seconds: float) -> int:
        before = len(host.resyncs)
        for _ in range(int(seconds)):
            clock.now += 1.0
            daemon.run_once(0)
            daemon.run_once(0)
        return sum(1 for reason, _kinds in host.resyncs[before:] if reason == "reconcile")

    assert reconciles_over(30) == 0
    for interval, expected in ((10.0, 3), (30.0, 1), (0.0, 0)):
        daemon.reconfigure(replace(daemon.settings, reconcile_interval=interval))
        daemon.run_once(0)
        assert reconciles_over(30) == expected, interval


def test_the_loop_goes_on_while_the_namespace_directories_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rescan reads the directories on the loop's worker: while that read is slow (a
    stat() per entry, each waiting for the GIL under readers), netlink events are still
    applied, and the rescan's outcome lands once the read is over."""
    import nswatch.discovery
    import nswatch.netns

    clock = FakeClock()
    sessions: dict[int, FakeSession] = {}

    def open_session(inode: int, name: str, path: str | None) -> NetlinkSession:
        s = sessions[inode] = FakeSession(inode, name)
        return s

    daemon = Daemon(
        Settings(netns_dirs=(str(tmp_path),), reconcile_interval=0, stats_interval=0),
        clock=clock,
        open_session=open_session,
        discover_processes=False,
    )
    release = threading.Event()
    real = nswatch.netns.scan_dirs
    reads: list[float] = []

    def slow(*args: Any) -> Any:
        if reads:
            release.wait(5)
        reads.append(time.monotonic())
        return real(*args)

    monkeypatch.setattr(nswatch.discovery, "scan_dirs", slow)
    try:
        wait_for_turns(daemon, lambda: daemon.enterer.home.inode in sessions)
        host = sessions[daemon.enterer.home.inode]
        _sync(host)
        wait_for_turns(daemon, daemon.ready.is_set)
        daemon.notify_dir(str(tmp_path))  # a directory event: a rescan, whose read hangs
        daemon.run_once(0)
        t0 = time.monotonic()
        host.feed([LinkNew(host.inode, _dev(7))])
        wait_for_turns(daemon, lambda: 7 in daemon.model.namespaces[host.inode].links)
        assert time.monotonic() - t0 < 2.0, "the link waited for the directory read"
        assert len(reads) == 1  # the second read is still hanging
        release.set()
        wait_for_turns(daemon, lambda: len(reads) == 2 and not daemon.discovery.wanted)
    finally:
        release.set()
        daemon.close()
        for s in sessions.values():
            s.close()


def wait_for_turns(daemon: Daemon, cond: Callable[[], object], timeout: float = 5.0) -> None:
    """Turn the loop until ``cond`` holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met"
        daemon.run_once(0.05)
