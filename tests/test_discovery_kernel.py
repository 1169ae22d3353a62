"""Discovery against the real kernel: identity, strays, the mount table, held files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from nswatch.daemon import Settings
from nswatch.netns import NetnsEnterer
from nswatch.observer import BaseObserver
from tests.conftest import Running, start_daemon, stop_daemon
from tests.kernel import Lab, wait_for

pytestmark = pytest.mark.kernel


class Errors(BaseObserver):
    """Records every error the daemon reports: (netns, where)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, str]] = []
        self._lock = threading.Lock()

    def error(self, netns: str | None, where: str, err: BaseException) -> None:
        with self._lock:
            self.seen.append((netns, where))

    def count(self) -> Counter[tuple[str | None, str]]:
        with self._lock:
            return Counter(self.seen)


def state(r: Running) -> dict[str, Any]:
    with urllib.request.urlopen(r.url + "/api/v1/state", timeout=5) as resp:
        data: dict[str, Any] = json.load(resp)
        return data


def lookup(r: Running, name: str) -> dict[str, Any] | None:
    """GET /api/v1/namespaces/{name}; None on 404."""
    try:
        with urllib.request.urlopen(
            r.url + "/api/v1/namespaces/" + quote(name, safe=""), timeout=5
        ) as resp:
            data: dict[str, Any] = json.load(resp)
            return data
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def mount(*args: str | bytes) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def bind(src: str, dst: str | bytes) -> None:
    """Bind-mount namespace file ``src`` onto a new file ``dst``."""
    open(dst, "w").close()
    mount("--bind", src, dst)


@pytest.fixture
def base(lab: Lab) -> Iterator[Path]:
    """A temp directory whose mounts are all undone at the end."""
    path = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}-"))
    try:
        yield path
    finally:
        for _ in range(5):
            points = [
                line.split()[4]
                for line in Path("/proc/self/mountinfo").read_bytes().splitlines()
                if line.split()[4].startswith(os.fsencode(path))
            ]
            if not points:
                break
            for p in sorted(points, reverse=True):
                subprocess.run(["umount", "-l", p], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def inode_of(path: str | bytes) -> int:
    return os.stat(path).st_ino


# --- identity -------------------------------------------------------------------------


def test_namespace_named_like_the_host_label(lab: Lab) -> None:
    """`ip netns add x` with host_label x: the host keeps x, the namespace gets x@<inode>."""
    label = lab.name("x")
    r = start_daemon(Settings(include=f"^{lab.prefix}", host_label=label, reconcile_interval=0))
    try:
        ns = lab.netns("x")
        inode = inode_of(f"/run/netns/{ns}")
        wait_for(lambda: f"{label}@{inode}" in state(r)["namespaces"], timeout=3)
        st = state(r)
        host = r.daemon.enterer.home.inode
        assert st["namespaces"][label]["inode"] == host
        assert (lookup(r, label) or {}).get("inode") == host
        assert (lookup(r, f"{label}@{inode}") or {}).get("inode") == inode
        assert (lookup(r, str(inode)) or {}).get("inode") == inode
    finally:
        stop_daemon(r)


def test_one_name_in_two_directories(lab: Lab, base: Path) -> None:
    """Two namespaces called `a` in two directories: distinct labels, and `a` finds the survivor."""
    n1, n2 = lab.netns("1"), lab.netns("2")
    d1, d2 = base / "run-netns", base / "docker-netns"
    d1.mkdir()
    d2.mkdir()
    bind(f"/run/netns/{n1}", str(d1 / "a"))
    bind(f"/run/netns/{n2}", str(d2 / "a"))
    i1, i2 = inode_of(f"/run/netns/{n1}"), inode_of(f"/run/netns/{n2}")
    r = start_daemon(
        Settings(netns_dirs=(str(d1), str(d2)), reconcile_interval=0, discover_processes=False)
    )
    try:
        # The first configured directory goes first in a scan.
        wait_for(lambda: {"a", f"a@{i2}"} <= set(state(r)["namespaces"]), timeout=3)
        assert state(r)["namespaces"]["a"]["inode"] == i1
        subprocess.run(["umount", str(d1 / "a")], check=True)
        os.unlink(d1 / "a")
        wait_for(lambda: (lookup(r, "a") or {}).get("inode") == i2, timeout=2)
        assert set(state(r)["namespaces"]) == {"host", f"a@{i2}"}
        assert "a" in r.daemon.view().by_name and i1 not in r.daemon.view().by_name.values()
    finally:
        stop_daemon(r)


def test_names_that_are_not_utf8(lab: Lab, base: Path) -> None:
    """`x-\\xff\\xfe` and `x-\\xfe\\xff` are two namespaces under two escaped labels, each reachable."""
    n1, n2 = lab.netns("1"), lab.netns("2")
    d = base / "netns"
    d.mkdir()
    bind(f"/run/netns/{n1}", os.fsencode(d) + b"/x-\xff\xfe")
    bind(f"/run/netns/{n2}", os.fsencode(d) + b"/x-\xfe\xff")
    r = start_daemon(Settings(netns_dirs=(str(d),), reconcile_interval=0, discover_processes=False))
    try:
        want = {
            "x-\\xff\\xfe": inode_of(f"/run/netns/{n1}"),
            "x-\\xfe\\xff": inode_of(f"/run/netns/{n2}"),
        }
        wait_for(lambda: set(want) <= set(state(r)["namespaces"]), timeout=3)
        for label, inode in want.items():
            assert (lookup(r, label) or {}).get("inode") == inode
    finally:
        stop_daemon(r)


# --- strays ---------------------------------------------------------------------------


def test_stray_entries_are_said_once_and_left_alone(lab: Lab, base: Path) -> None:
    """A plain file, a directory, a symlink loop and another kind of nsfs file: one line each, no retries."""
    d = base / "netns"
    d.mkdir()
    (d / "file").write_text("")
    (d / "dir").mkdir()
    os.symlink("loop", d / "loop")
    bind("/proc/self/ns/ipc", str(d / "ipc"))
    errors = Errors()
    r = start_daemon(
        Settings(netns_dirs=(str(d),), reconcile_interval=0, discover_processes=False),
        observers=[errors],
    )
    rescans = Counter[str]()
    real = r.daemon.discovery.rescan

    def counting(why: str, done: Callable[[], None] = lambda: None) -> None:
        rescans[why] += 1
        real(why, done)

    r.daemon.discovery.rescan = counting  # type: ignore[method-assign]
    try:
        time.sleep(3.5)
        # Rescans for events (other tests mount and unmount meanwhile) are
        # fine; rescans driven by retry timers are what must stop.
        before = rescans["pending"] + rescans["retry"]
        time.sleep(2.5)
        assert rescans["pending"] + rescans["retry"] == before, f"still retrying: {rescans}"
        seen = errors.count()
        assert seen == {
            (str(d / "file"), "not_a_mount_point"): 1,
            (str(d / "dir"), "not_a_network_namespace"): 1,
            (str(d / "ipc"), "not_a_network_namespace"): 1,
            (str(d / "loop"), "unreadable"): 1,
        }
        counts = r.daemon.unwatched_counts()
        assert counts["not_a_mount_point"] == 1
        assert counts["not_a_network_namespace"] == 2
        assert counts["unreadable"] == 1
        # Strays are no namespaces: readiness does not wait for them.
        assert r.daemon.unwatched() == {}
    finally:
        stop_daemon(r)


# --- the mount table ------------------------------------------------------------------


def test_mount_changes_are_seen_within_a_second(lab: Lab, base: Path) -> None:
    """umount of a namespace file, a new mount on it, and a tmpfs over the directory: each seen in 1 s."""
    ns = lab.netns("m")
    d = base / "netns"
    d.mkdir()
    bind(f"/run/netns/{ns}", str(d / "a"))
    r = start_daemon(
        Settings(
            netns_dirs=(str(d),), reconcile_interval=0, rescan_interval=30, discover_processes=False
        )
    )
    try:
        wait_for(lambda: r.daemon.view().get("a") is not None, timeout=2)
        subprocess.run(["umount", str(d / "a")], check=True)
        wait_for(lambda: r.daemon.view().get("a") is None, timeout=1)
        mount("--bind", f"/run/netns/{ns}", str(d / "a"))
        wait_for(lambda: r.daemon.view().get("a") is not None, timeout=1)
        mount("-t", "tmpfs", "nswG-cover", str(d))
        wait_for(lambda: r.daemon.view().get("a") is None, timeout=1)
        subprocess.run(["umount", str(d)], check=True)
        wait_for(lambda: r.daemon.view().get("a") is not None, timeout=1)
    finally:
        stop_daemon(r)


class SpyEnterer(NetnsEnterer):
    """Records every namespace file opened."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: list[str] = []

    def open_ns(self, path: str, inode: int | None = None) -> int:
        self.opened.append(path)
        return super().open_ns(path, inode)


def test_veth_peers_resolve_without_opening_namespace_files(lab: Lab) -> None:
    """Each namespace file is opened once (to enter it); nsid questions hold no fd on it.

    An fd on the file pins its mount: a plain `umount` at that moment fails
    with EBUSY (seen 3 times in 300 while nswatch asked nsids).
    """
    spy = SpyEnterer()
    r = start_daemon(Settings(include=f"^{lab.prefix}", reconcile_interval=0), enterer=spy)
    try:
        n1, n2 = lab.netns("1"), lab.netns("2")
        a, b = lab.name("a"), lab.name("b")
        lab.veth(a, b, a_ns=n1, b_ns=n2)

        def paired() -> bool:
            v = r.daemon.view()
            ns1 = v.get(n1)
            link = ns1.link_by_name(a) if ns1 is not None else None
            return link is not None and v.peer_of(ns1.inode, link.index) is not None  # type: ignore[union-attr]

        wait_for(paired, timeout=3)
        opened = Counter(spy.opened)
        assert opened == {f"/run/netns/{n1}": 1, f"/run/netns/{n2}": 1}
    finally:
        stop_daemon(r)
        spy.close()
