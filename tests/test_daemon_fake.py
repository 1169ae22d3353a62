"""The daemon's own logic against a fake netlink session and a fake clock (no kernel needed)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest

from nswatch.daemon import Daemon, NetlinkSession, Settings
from nswatch.decode import Decoded
from nswatch.model import Dump, DumpKind, Event, Family, Link, LinkNew, Synced
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

    # what the test does
    def feed(self, events: list[Event], stale: str | None = None) -> None:
        self._pending.append((events, [], stale))
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

    def overrun(self, netns: str) -> None:
        self.overruns.append(netns)

    def resync(self, netns: str, reason: str) -> None:
        self.resyncs.append((netns, reason))

    def ready(self, model: object) -> None:
        self.ready_calls += 1


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Daemon, FakeClock, dict[int, FakeSession], Recorder]]:
    clock = FakeClock()
    sessions: dict[int, FakeSession] = {}

    def open_session(inode: int, name: str, path: str | None) -> NetlinkSession:
        s = FakeSession(inode, name)
        sessions[inode] = s
        return s

    rec = Recorder()
    daemon = Daemon(
        Settings(netns_dirs=(str(tmp_path),), reconcile_interval=0, stats_interval=0),
        observers=[rec],
        clock=clock,
        open_session=open_session,
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
