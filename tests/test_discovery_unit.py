"""Discovery's rules against a fake /proc and fake sessions (no kernel needed)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nswatch.daemon import Daemon, NetlinkSession, Settings
from nswatch.discovery import run_here
from tests.test_daemon_fake import FakeSession

ANON = 4026599999
CID = "0123456789abcdef" * 4


def fake_process(proc: Path, pid: int, inode: int, comm: str, cgroup: str) -> None:
    d = proc / str(pid)
    (d / "ns").mkdir(parents=True)
    os.symlink(f"net:[{inode}]", d / "ns" / "net")
    (d / "comm").write_text(comm + "\n")
    (d / "cgroup").write_text(cgroup)


class Rig:
    def __init__(self, tmp: Path, settings: Settings, refuse: set[str]) -> None:
        self.proc = tmp / "proc"
        self.proc.mkdir()
        self.opened: list[str | None] = []
        self.sessions: list[FakeSession] = []

        def open_session(inode: int, name: str, path: str | None) -> NetlinkSession:
            self.opened.append(path)
            if path in refuse:
                raise PermissionError(13, "Permission denied")
            s = FakeSession(inode, name)
            self.sessions.append(s)
            return s

        self.daemon = Daemon(
            settings,
            open_session=open_session,
            discover_processes=True,
            proc=str(self.proc),
            # The directories and /proc are read at once, here: each turn's outcome is known.
            offload=run_here,
        )

    def close(self) -> None:
        self.daemon.close()
        for s in self.sessions:
            s.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    me = os.getpid()
    refuse = {f"{tmp_path}/proc/{me - 1}/ns/net"}
    r = Rig(tmp_path, Settings(netns_dirs=(str(tmp_path / "none"),), stats_interval=0), refuse)
    try:
        yield r
    finally:
        r.close()


def test_entered_through_a_holder_that_answers(rig: Rig) -> None:
    """A holder whose namespace file answers EACCES is skipped; another holder of it serves, and is watched."""
    me = os.getpid()
    fake_process(rig.proc, me - 1, ANON, "sandbox", "0::/init.scope\n")
    fake_process(rig.proc, me, ANON, "worker", f"0::/system.slice/docker-{CID}.scope\n")
    rig.daemon.run_once(0)
    ns = rig.daemon.model.namespaces.get(ANON)
    assert ns is not None
    assert rig.opened[-2:] == [f"{rig.proc}/{me - 1}/ns/net", f"{rig.proc}/{me}/ns/net"]
    assert ns.owner is not None and ns.owner.pid == me and ns.owner.container_id == CID
    assert rig.daemon.discovery.holder_pid(ANON) == me
    assert rig.daemon.unwatched() == {}


def test_container_names_and_filters(tmp_path: Path) -> None:
    """An anonymous namespace is named after its container, and include/exclude apply to that name."""
    me = os.getpid()
    settings = Settings(netns_dirs=(str(tmp_path / "none"),), stats_interval=0, exclude="^pid:")
    r = Rig(tmp_path, settings, set())
    try:
        fake_process(r.proc, me, ANON, "worker", f"0::/system.slice/docker-{CID}.scope\n")
        fake_process(r.proc, me + 1, ANON + 1, "sleep", "0::/user.slice/session-1.scope\n")
        r.daemon.run_once(0)
        names = {i: ns.name for i, ns in r.daemon.model.namespaces.items() if not ns.is_host}
        assert names == {ANON: "container:0123456789ab"}
    finally:
        r.close()


def test_every_holder_refusing_is_reported(tmp_path: Path) -> None:
    """When no holder lets us in, the namespace is listed as unwatched (permission_denied), not silently skipped."""
    me = os.getpid()
    refuse = {f"{tmp_path}/proc/{me}/ns/net"}
    r = Rig(tmp_path, Settings(netns_dirs=(str(tmp_path / "none"),), stats_interval=0), refuse)
    try:
        fake_process(r.proc, me, ANON, "worker", "0::/system.slice/foo.service\n")
        r.daemon.run_once(0)
        assert r.daemon.unwatched() == {"unit:foo.service": "permission_denied"}
        assert r.daemon.unwatched_counts()["permission_denied"] == 1
    finally:
        r.close()


def test_a_holder_that_execs_is_shown_as_it_is_after_a_periodic_rescan(rig: Rig) -> None:
    """A holder that execs keeps its PID: its owner, kept between rescans, is read again at
    the next periodic one, and the model shows the new command; the label, made once, stays."""
    me = os.getpid()
    fake_process(rig.proc, me, ANON, "ip", "0::/init.scope\n")
    rig.daemon.run_once(0)

    def owner_comm() -> str | None:
        ns = rig.daemon.model.namespaces[ANON]
        return ns.owner.comm if ns.owner is not None else None

    label = rig.daemon.model.namespaces[ANON].name
    assert owner_comm() == "ip"
    (rig.proc / str(me) / "comm").write_text("sleeper\n")
    rig.daemon.discovery.rescan("event")
    assert owner_comm() == "ip"
    rig.daemon.discovery.rescan("periodic")
    assert owner_comm() == "sleeper"
    assert rig.daemon.model.namespaces[ANON].name == label
