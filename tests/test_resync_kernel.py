"""Recovery against the real kernel: overruns, reconcile, and randomized churn end exact."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import pytest

from nswatch.daemon import Settings
from nswatch.model import Change, Link, LinkNew
from nswatch.observer import BaseObserver
from tests.conftest import start_daemon, stop_daemon
from tests.kernel import Lab, converge, ip, state_of, wait_for

pytestmark = pytest.mark.kernel


class Recorder(BaseObserver):
    """Counts what the daemon reports."""

    def __init__(self) -> None:
        self.overruns = 0
        self.resyncs: list[str] = []
        self.found: list[Change] = []

    def overrun(self, netns: str) -> None:
        self.overruns += 1

    def resync(self, netns: str, reason: str) -> None:
        self.resyncs.append(reason)

    def changes(self, changes: Sequence[Change], reason: str | None) -> None:
        if reason == "reconcile":
            self.found.extend(changes)


def test_overrun_triggers_resync_and_converges(lab: Lab) -> None:
    """With a tiny receive buffer a burst overruns the socket; the namespace is re-dumped and ends exact."""
    ns = lab.netns("ov")
    ip("-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    rec = Recorder()
    running = start_daemon(
        Settings(include=f"^{lab.prefix}", netlink_rcvbuf=4096, reconcile_interval=0),
        observers=[rec],
    )
    try:
        lines = [f"addr add 198.18.{i // 250}.{i % 250 + 1}/32 dev v0" for i in range(600)]
        lines += [f"addr add 2001:db8:5::{i:x}/128 dev v1 nodad" for i in range(1, 300)]
        lines += ["link set v0 up", "link set v1 up"]
        lines += [f"route add 198.19.{i}.0/24 dev v0" for i in range(200)]
        path = f"/tmp/{lab.prefix}.batch"
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        try:
            ip("-n", ns, "-batch", path)
        finally:
            os.unlink(path)
        wait_for(lambda: rec.overruns > 0, timeout=5)
        assert "overrun" in rec.resyncs
        converge(state_of(running.daemon.view), [ns], timeout=10)
    finally:
        stop_daemon(running)


def test_reconcile_repairs_and_counts(lab: Lab) -> None:
    """The periodic reconcile finds a link the model should not have, removes it and reports it."""
    ns = lab.netns("rc")
    rec = Recorder()
    running = start_daemon(
        Settings(include=f"^{lab.prefix}", reconcile_interval=0.3), observers=[rec]
    )
    try:
        d = running.daemon
        inode = d.model.get(ns).inode  # type: ignore[union-attr]
        ghost = Link(index=4242, name="ghost0", kind="device")

        def inject() -> None:
            d._apply([LinkNew(inode, ghost)])

        d.wake(inject)
        wait_for(lambda: 4242 in d.view().namespaces[inode].links)
        wait_for(
            lambda: any(c.kind == "link" and c.action == "removed" for c in rec.found), timeout=5
        )
        assert 4242 not in d.view().namespaces[inode].links
        converge(state_of(d.view), [ns])
    finally:
        stop_daemon(running)


def churn_seed() -> int:
    """NSWATCH_CHURN_SEED when set (to replay a failure), else a fresh random seed."""
    env = os.environ.get("NSWATCH_CHURN_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "big")


def test_randomized_churn_ends_exact(lab: Lab) -> None:
    """Random namespace, veth, bridge, address, route, up/down, move and rename churn ends in exact agreement."""
    seed = churn_seed()
    # Shown by pytest when the test fails (captured output), with how to replay it.
    print(f"churn seed {seed}: replay with NSWATCH_CHURN_SEED={seed}")
    rng = random.Random(seed)
    running = start_daemon(Settings(include=f"^{lab.prefix}", reconcile_interval=0))
    namespaces: list[str] = []
    # netns ("" = host) -> the links the kernel accepted from us, by name.
    links: dict[str, list[str]] = {}
    # Both ends of each veth we made, (netns, name) -> (netns, name): deleting
    # one end, or the namespace of one end, deletes the other.
    peers: dict[tuple[str, str], tuple[str, str]] = {}
    counter = 0

    def fresh(prefix: str) -> str:
        nonlocal counter
        counter += 1
        return f"{prefix}{counter}"

    def where(ns: str) -> list[str]:
        return ["-n", ns] if ns else []

    def pick_ns(with_host: bool = True) -> str:
        choices = namespaces + ([""] if with_host else [])
        return rng.choice(choices) if choices else ""

    def try_ip(*args: str) -> bool:
        # Random operations may be invalid (e.g. a gateway not on-link); the
        # kernel refusing them is part of the churn. True when it accepted.
        try:
            ip(*args)
        except RuntimeError:
            return False
        return True

    def forget(end: tuple[str, str]) -> None:
        """A link is gone: drop it, and its veth peer, from what we track."""
        for e in (end, peers.pop(end, None)):
            if e is None:
                continue
            peers.pop(e, None)
            if e[1] in links.get(e[0], []):
                links[e[0]].remove(e[1])

    def rekey(old: tuple[str, str], new: tuple[str, str]) -> None:
        """A link moved or was renamed: its peer now points at its new place."""
        other = peers.pop(old, None)
        if other is not None:
            peers[new] = other
            peers[other] = new

    def add_veth(a: tuple[str, str], b: tuple[str, str]) -> None:
        links[a[0]].append(a[1])
        links[b[0]].append(b[1])
        peers[a] = b
        peers[b] = a

    try:
        for _ in range(4):
            ns = lab.netns(fresh("c"))
            namespaces.append(ns)
            links[ns] = []
        links[""] = []
        for _step in range(120):
            op = rng.choice(
                [
                    "ns_add",
                    "ns_del",
                    "veth_host",
                    "veth_nsns",
                    "move",
                    "bridge",
                    "addr4",
                    "addr6",
                    "route",
                    "updown",
                    "rename",
                    "link_del",
                ]
            )
            if op == "ns_add" and len(namespaces) < 8:
                ns = lab.netns(fresh("c"))
                namespaces.append(ns)
                links[ns] = []
            elif op == "ns_del" and len(namespaces) > 2:
                ns = namespaces.pop(rng.randrange(len(namespaces)))
                ip("netns", "del", ns)
                for name in list(links.pop(ns, [])):
                    forget((ns, name))
            elif op == "veth_host" and namespaces:
                ns = pick_ns(with_host=False)
                a, b = lab.name(fresh("h")), fresh("e")
                if try_ip("link", "add", a, "type", "veth", "peer", "name", b, "netns", ns):
                    lab.host_links.append(a)
                    add_veth(("", a), (ns, b))
            elif op == "veth_nsns" and len(namespaces) >= 2:
                x, y = rng.sample(namespaces, 2) if rng.random() < 0.7 else [pick_ns(False)] * 2
                a, b = fresh("x"), fresh("y")
                if try_ip("-n", x, "link", "add", a, "type", "veth", "peer", "name", b, "netns", y):
                    add_veth((x, a), (y, b))
            elif op == "move":
                src = pick_ns()
                if links.get(src):
                    name = rng.choice(links[src])
                    # Moving into the host would need a pid there; not done.
                    dst = pick_ns(with_host=False)
                    if (
                        dst
                        and dst != src
                        and name not in links[dst]
                        and not name.startswith(lab.prefix)
                        and try_ip(*where(src), "link", "set", name, "netns", dst)
                    ):
                        links[src].remove(name)
                        links[dst].append(name)
                        rekey((src, name), (dst, name))
            elif op == "bridge":
                ns = pick_ns(with_host=False)
                if ns:
                    br = fresh("br")
                    if try_ip("-n", ns, "link", "add", br, "type", "bridge"):
                        links[ns].append(br)
                        ports = [n for n in links[ns] if not n.startswith("br")]
                        if ports:
                            try_ip("-n", ns, "link", "set", rng.choice(ports), "master", br)
                        try_ip("-n", ns, "link", "set", br, "up")
            elif op in ("addr4", "addr6"):
                ns = pick_ns()
                if links.get(ns):
                    dev = rng.choice(links[ns])
                    if op == "addr4":
                        addr = f"198.18.{rng.randrange(256)}.{rng.randrange(1, 255)}/{rng.choice([24, 30, 32])}"
                    else:
                        addr = f"2001:db8:{rng.randrange(65536):x}::{rng.randrange(1, 999):x}/64"
                    verb = "del" if rng.random() < 0.25 else "add"
                    try_ip(
                        *where(ns),
                        "addr",
                        verb,
                        addr,
                        "dev",
                        dev,
                        *(["nodad"] if op == "addr6" and verb == "add" else []),
                    )
            elif op == "route":
                ns = pick_ns(with_host=False)
                if ns and links.get(ns):
                    dev = rng.choice(links[ns])
                    dst = f"198.19.{rng.randrange(256)}.0/24"
                    metric = str(rng.choice([0, 10, 100]))
                    if rng.random() < 0.5:
                        try_ip("-n", ns, "route", "add", dst, "dev", dev, "metric", metric)
                    else:
                        try_ip(
                            "-n",
                            ns,
                            "route",
                            "add",
                            dst,
                            "via",
                            "198.18.0.1",
                            "dev",
                            dev,
                            "onlink",
                            "metric",
                            metric,
                        )
                    if rng.random() < 0.3:
                        try_ip("-n", ns, "route", "del", dst)
                    if rng.random() < 0.2:
                        v6 = f"2001:db8:ff{rng.randrange(16):x}::/64"
                        try_ip("-n", ns, "-6", "route", "add", v6, "dev", dev, "metric", metric)
            elif op == "updown":
                ns = pick_ns()
                if links.get(ns):
                    state = rng.choice(["up", "up", "down"])
                    try_ip(*where(ns), "link", "set", rng.choice(links[ns]), state)
            elif op == "rename":
                ns = pick_ns(with_host=False)
                if ns and links.get(ns):
                    old = rng.choice(links[ns])
                    new = fresh("r")
                    try_ip("-n", ns, "link", "set", old, "down")
                    if try_ip("-n", ns, "link", "set", old, "name", new):
                        links[ns][links[ns].index(old)] = new
                        rekey((ns, old), (ns, new))
            elif op == "link_del":
                ns = pick_ns()
                if links.get(ns):
                    name = rng.choice(links[ns])
                    if try_ip(*where(ns), "link", "del", name):
                        forget((ns, name))
        # What we tracked is only a guide for picking; the kernel is the truth.
        converge(state_of(running.daemon.view), namespaces, timeout=10)
    except Exception as e:
        raise AssertionError(f"churn seed {seed} (NSWATCH_CHURN_SEED={seed}): {e}") from e
    finally:
        stop_daemon(running)
