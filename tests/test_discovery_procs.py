"""Namespaces no file holds, found through /proc, and let go of the moment their last process exits."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from nswatch.daemon import Settings
from nswatch.model import Change, LinkRemoved, NamespaceRemoved, NamespaceRenamed
from nswatch.observer import BaseObserver
from tests.conftest import Running, start_daemon, stop_daemon
from tests.kernel import Lab, ip, wait_for

pytestmark = pytest.mark.kernel


class Changes(BaseObserver):
    """Records every change the daemon reports."""

    def __init__(self) -> None:
        self.seen: list[Change] = []
        self._lock = threading.Lock()

    def changes(self, changes: Sequence[Change], reason: str | None) -> None:
        with self._lock:
            self.seen.extend(changes)

    def all(self) -> list[Change]:
        with self._lock:
            return list(self.seen)


@pytest.fixture
def sleeper(lab: Lab) -> Iterator[str]:
    """A `sleep` whose command name carries the lab prefix (so filters can pick it)."""
    d = tempfile.mkdtemp(prefix=f"{lab.prefix}-")
    path = os.path.join(d, lab.name("s"))
    os.symlink(shutil.which("sleep") or "/bin/sleep", path)
    try:
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


def spawn(*argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)


def exec_done(pid: int, sleeper: str) -> str:
    """Wait until ``pid`` runs the sleeper and return its comm.

    `unshare -n` and `ip netns exec` enter the namespace before they exec:
    in between, the comm is still theirs, and a label read then is wrong.
    """
    want = os.path.basename(sleeper)[:15]  # the kernel keeps TASK_COMM_LEN - 1 bytes
    wait_for(lambda: Path(f"/proc/{pid}/comm").read_text().strip() == want)
    return want


def ns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def peer_of(r: Running, label: str, link: str) -> tuple[str, str] | None:
    v = r.daemon.view()
    ns = v.get(label)
    found = ns.link_by_name(link) if ns is not None else None
    if ns is None or found is None:
        return None
    peer = v.peer_of(ns.inode, found.index)
    return (peer.netns, peer.name) if peer is not None else None


def settings(lab: Lab, **kw: object) -> Settings:
    # Anonymous names are "pid:<pid>:<comm>"; the sleeper's comm has the prefix.
    return Settings(include=f"^({lab.prefix}|pid:[0-9]+:{lab.prefix})", reconcile_interval=0, **kw)  # type: ignore[arg-type]


def test_unshare_namespace_found_from_a_veth_hint_and_let_go_on_exit(
    lab: Lab, sleeper: str
) -> None:
    """`unshare -n` plus a veth into it: found within 2 s, named from its process; its exit frees the veth within 1 s."""
    r = start_daemon(settings(lab, rescan_interval=30), discover_processes=True)
    proc = spawn("unshare", "-n", sleeper, "60")
    try:
        wait_for(lambda: os.stat(f"/proc/{proc.pid}/ns/net").st_ino != r.daemon.enterer.home.inode)
        comm = exec_done(proc.pid, sleeper)
        label = f"pid:{proc.pid}:{comm}"
        a = lab.name("a")
        ip("link", "add", a, "type", "veth", "peer", "name", "eth0", "netns", str(proc.pid))
        lab.host_links.append(a)
        wait_for(lambda: peer_of(r, "host", a) == (label, "eth0"), timeout=2)
        ns = r.daemon.view().get(label)
        assert ns is not None and ns.inode == ns_inode(proc.pid)
        assert ns.owner is not None and (ns.owner.pid, ns.owner.comm) == (proc.pid, comm)
        assert r.daemon.discovery.holder_pid(ns.inode) == proc.pid
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        wait_for(lambda: a not in ip("link", "show"), timeout=1.0, interval=0.01)
        assert time.monotonic() - t0 < 1.0
        wait_for(lambda: r.daemon.view().get(label) is None)
    finally:
        proc.kill()
        proc.wait()
        stop_daemon(r)


def test_periodic_scan_finds_a_namespace_without_veths(lab: Lab, sleeper: str) -> None:
    """A namespace with nothing in it but lo is found by the periodic /proc scan."""
    r = start_daemon(settings(lab, rescan_interval=0.5), discover_processes=True)
    proc = spawn("unshare", "-n", sleeper, "60")
    try:
        wait_for(lambda: ns_inode(proc.pid) != r.daemon.enterer.home.inode)
        wait_for(lambda: r.daemon.view().get(str(ns_inode(proc.pid))) is not None, timeout=3)
        ns = r.daemon.view().get(str(ns_inode(proc.pid)))
        assert ns is not None and ns.name.startswith(f"pid:{proc.pid}:")
        assert ns.link_by_name("lo") is not None
    finally:
        proc.kill()
        proc.wait()
        stop_daemon(r)


def _named_with_process(
    lab: Lab, sleeper: str, r: Running
) -> tuple[str, str, subprocess.Popen[bytes]]:
    ns = lab.netns("d")
    proc = spawn("ip", "netns", "exec", ns, sleeper, "60")
    a, b = lab.name("a"), lab.name("b")
    lab.veth(a, b, b_ns=ns)
    wait_for(lambda: peer_of(r, "host", a) == (ns, b), timeout=3)
    wait_for(lambda: ns_inode(proc.pid) == os.stat(f"/run/netns/{ns}").st_ino)
    # Named after its process once the file goes: that must be the sleeper
    # (the filter takes its name), not `ip` before its exec.
    exec_done(proc.pid, sleeper)
    return ns, a, proc


def test_netns_del_with_a_process_inside_lives_on_anonymous(lab: Lab, sleeper: str) -> None:
    """`ip netns del` while a process lives in it: with discovery it stays watched, veth resolved, nothing deleted."""
    changes = Changes()
    r = start_daemon(settings(lab), discover_processes=True, observers=[changes])
    proc: subprocess.Popen[bytes] | None = None
    try:
        ns, a, proc = _named_with_process(lab, sleeper, r)
        ip("netns", "del", ns)
        comm = exec_done(proc.pid, sleeper)
        label = f"pid:{proc.pid}:{comm}"
        wait_for(lambda: peer_of(r, "host", a) == (label, lab.name("b")), timeout=2)
        inode = ns_inode(proc.pid)
        # Only what concerns this lab (other tests may share the host).
        seen = [
            c
            for c in changes.all()
            if c.inode == inode
            or (isinstance(c, LinkRemoved) and c.link.name.startswith(lab.prefix))
        ]
        assert any(isinstance(c, NamespaceRenamed) and c.netns == label for c in seen)
        assert not any(isinstance(c, LinkRemoved | NamespaceRemoved) for c in seen), seen
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        stop_daemon(r)


def test_netns_del_with_a_process_inside_is_unwatched_not_deleted(lab: Lab, sleeper: str) -> None:
    """Without discovery, `ip netns del` of a namespace still in use is "unwatched", never "deleted"."""
    changes = Changes()
    r = start_daemon(settings(lab), discover_processes=False, observers=[changes])
    proc: subprocess.Popen[bytes] | None = None
    try:
        ns, a, proc = _named_with_process(lab, sleeper, r)
        ip("netns", "del", ns)
        wait_for(lambda: r.daemon.view().get(ns) is None, timeout=2)
        inode = ns_inode(proc.pid)
        seen = [
            c
            for c in changes.all()
            if c.inode == inode
            or (isinstance(c, LinkRemoved) and c.link.name.startswith(lab.prefix))
        ]
        removed = [c for c in seen if isinstance(c, NamespaceRemoved)]
        assert [(c.netns, c.reason) for c in removed] == [(ns, "unwatched")]
        reasons = {c.reason for c in seen if isinstance(c, LinkRemoved)}
        assert reasons == {"unwatched"}, reasons
        # The host end still exists, in the kernel and in the model.
        assert a in ip("link", "show")
        host = r.daemon.view().get("host")
        assert host is not None and host.link_by_name(a) is not None
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        stop_daemon(r)


def test_a_namespace_whose_file_goes_is_named_after_what_its_holder_runs_then(
    lab: Lab, sleeper: str
) -> None:
    """`ip netns del` of a namespace whose holder exec'd since the daemon last read it
    (the PID stays): it is renamed after the command it runs now, never let go."""
    changes = Changes()
    r = start_daemon(settings(lab), discover_processes=True, observers=[changes])
    ns = lab.netns("d")
    # A shell that execs the sleeper when told: "sh" first, then the lab's name.
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, "sh", "-c", f"read go; exec {sleeper} 60"],
        stdin=subprocess.PIPE,
    )
    try:
        a, b = lab.name("a"), lab.name("b")
        lab.veth(a, b, b_ns=ns)
        wait_for(lambda: peer_of(r, "host", a) == (ns, b), timeout=3)
        wait_for(lambda: Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sh")
        # A reload reads /proc: the holder is known, and kept, while the file is there.
        r.daemon.reconfigure(r.daemon.settings)
        wait_for(lambda: (v := r.daemon.view().get(ns)) is not None and v.owner is not None)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        comm = exec_done(proc.pid, sleeper)
        ip("netns", "del", ns)
        label = f"pid:{proc.pid}:{comm}"
        wait_for(lambda: peer_of(r, "host", a) == (label, b), timeout=3)
        inode = ns_inode(proc.pid)
        seen = [c for c in changes.all() if c.inode == inode]
        assert any(isinstance(c, NamespaceRenamed) and c.netns == label for c in seen)
        assert not any(isinstance(c, NamespaceRemoved) for c in seen), seen
    finally:
        proc.kill()
        proc.wait()
        stop_daemon(r)
