"""The model against the real kernel: scenarios from the seed walk-through and its edge cases."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from tests.conftest import Running
from tests.kernel import Lab, converge, ip, ip_batch, ip_json, state_of, wait_for

pytestmark = pytest.mark.kernel


def get_state(r: Running) -> dict[str, Any]:
    with urllib.request.urlopen(r.url + "/api/v1/state", timeout=5) as resp:
        data: dict[str, Any] = json.load(resp)
        return data


def pair_set(state: dict[str, Any]) -> set[tuple[tuple[str, str], tuple[str, str]]]:
    out = set()
    for p in state["veth_pairs"]:
        a = (p["a"]["netns"], p["a"]["link"])
        b = (p["b"]["netns"], p["b"]["link"])
        out.add((min(a, b), max(a, b)))
    return out


def test_seed_walkthrough(lab: Lab, nswatch: Running) -> None:
    """The tutorial's steps show up as a namespace, a host<->ns pair, both addresses and routes."""
    ns = lab.netns("ns")
    a, b = lab.name("a"), lab.name("b")
    lab.veth(a, b)
    ip("link", "set", b, "netns", ns)
    ip("addr", "add", "198.18.0.1/24", "dev", a)
    ip("-n", ns, "addr", "add", "198.18.0.2/24", "dev", b)
    ip("link", "set", a, "up")
    ip("-n", ns, "link", "set", b, "up")
    ip("-n", ns, "link", "set", "lo", "up")

    def seen() -> bool:
        st = get_state(nswatch)
        return (("host", a), (ns, b)) in pair_set(st) and any(
            r["dst"] == "198.18.0.0/24" for r in st["namespaces"].get(ns, {"routes": []})["routes"]
        )

    wait_for(seen, timeout=2)
    st = get_state(nswatch)
    ns_links = {link["name"]: link for link in st["namespaces"][ns]["links"]}
    assert ns_links[b]["peer"]["netns"] == "host"
    assert ns_links[b]["peer"]["name"] == a
    host_link = next(link for link in st["namespaces"]["host"]["links"] if link["name"] == a)
    assert host_link["peer"] == {"netns": ns, "index": ns_links[b]["index"], "name": b}
    converge(state_of(nswatch.daemon.view), [ns])


def test_namespace_burst(lab: Lab, nswatch: Running) -> None:
    """A burst of 100 `ip netns add` yields all 100 namespaces, even though each file is mounted late."""
    names = [lab.name(f"b{i}") for i in range(100)]
    ip_batch(f"netns add {n}" for n in names)
    lab.namespaces.extend(names)
    wait_for(lambda: all(n in get_state(nswatch)["namespaces"] for n in names), timeout=5)
    assert nswatch.daemon.ready.is_set()
    ip_batch(f"netns del {n}" for n in names)
    wait_for(lambda: not any(n in get_state(nswatch)["namespaces"] for n in names), timeout=5)


def test_deleting_namespace_releases_it(lab: Lab, nswatch: Running) -> None:
    """After `ip netns del`, nswatch lets go at once and the host end of its veth vanishes within 1 s."""
    ns = lab.netns("d")
    a, b = lab.name("a"), lab.name("b")
    lab.veth(a, b, b_ns=ns)
    wait_for(lambda: (("host", a), (ns, b)) in pair_set(get_state(nswatch)))
    ip("netns", "del", ns)
    t0 = time.monotonic()
    wait_for(lambda: a not in ip("link", "show"), timeout=1.0, interval=0.01)
    assert time.monotonic() - t0 < 1.0
    wait_for(
        lambda: (
            not any(link["name"] == a for link in get_state(nswatch)["namespaces"]["host"]["links"])
        )
    )


def test_same_ifindex_in_two_namespaces(lab: Lab, nswatch: Running) -> None:
    """Pairs resolve by namespace, not ifindex: equal ifindexes in two namespaces stay apart."""
    n1, n2, n3 = lab.netns("n1"), lab.netns("n2"), lab.netns("n3")
    # Created inside fresh namespaces, x0 gets the same ifindex in n1 and n3.
    ip("-n", n1, "link", "add", "x0", "type", "veth", "peer", "name", "y0", "netns", n2)
    ip("-n", n3, "link", "add", "x0", "type", "veth", "peer", "name", "y1", "netns", n2)
    ip("-n", n3, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
    x0_1 = ip_json(n1, "link", "show", "x0")[0]["ifindex"]
    x0_3 = ip_json(n3, "link", "show", "x0")[0]["ifindex"]
    assert x0_1 == x0_3
    want = {
        ((n1, "x0"), (n2, "y0")),
        ((n2, "y1"), (n3, "x0")),
        ((n3, "p0"), (n3, "p1")),
    }
    wait_for(lambda: want <= pair_set(get_state(nswatch)))
    converge(state_of(nswatch.daemon.view), [n1, n2, n3])


def test_move_and_rename(lab: Lab, nswatch: Running) -> None:
    """A move re-keys the link in its new namespace and a rename keeps the pair; the model stays exact."""
    n1, n2 = lab.netns("m1"), lab.netns("m2")
    a, b = lab.name("a"), lab.name("b")
    lab.veth(a, b, b_ns=n1)
    wait_for(lambda: (("host", a), (n1, b)) in pair_set(get_state(nswatch)))
    ip("-n", n1, "link", "set", b, "netns", n2)
    wait_for(lambda: (("host", a), (n2, b)) in pair_set(get_state(nswatch)))
    ip("-n", n2, "link", "set", b, "name", "renamed0")
    wait_for(lambda: (("host", a), (n2, "renamed0")) in pair_set(get_state(nswatch)))
    converge(state_of(nswatch.daemon.view), [n1, n2])


def test_ipv4_routes_vanish_silently(lab: Lab, nswatch: Running) -> None:
    """IPv4 routes the kernel drops without RTM_DELROUTE (link down, address removed) leave the model too."""
    ns = lab.netns("r")
    ip("-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    ip("-n", ns, "addr", "add", "198.18.1.1/24", "dev", "v0")
    ip("-n", ns, "link", "set", "v0", "up")
    ip("-n", ns, "link", "set", "v1", "up")
    ip("-n", ns, "route", "add", "198.18.2.0/24", "via", "198.18.1.2", "metric", "5")
    converge(state_of(nswatch.daemon.view), [ns])
    ip("-n", ns, "link", "set", "v0", "down")
    converge(state_of(nswatch.daemon.view), [ns])
    ip("-n", ns, "link", "set", "v0", "up")
    ip("-n", ns, "route", "add", "198.18.2.0/24", "via", "198.18.1.2", "metric", "5")
    converge(state_of(nswatch.daemon.view), [ns])
    ip("-n", ns, "addr", "del", "198.18.1.1/24", "dev", "v0")
    converge(state_of(nswatch.daemon.view), [ns])


def test_ipv6_and_multipath_routes(lab: Lab, nswatch: Running) -> None:
    """IPv6 addresses and ECMP routes (merged by the kernel) match `ip -6 route`."""
    ns = lab.netns("six")
    ip("-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    ip("-n", ns, "link", "set", "v0", "up")
    ip("-n", ns, "link", "set", "v1", "up")
    ip("-n", ns, "addr", "add", "2001:db8:1::1/64", "dev", "v0", "nodad")
    ip("-n", ns, "addr", "add", "2001:db8:2::1/64", "dev", "v1", "nodad")
    ip("-n", ns, "route", "add", "2001:db8:9::/64", "via", "2001:db8:1::2", "metric", "10")
    ip("-n", ns, "route", "append", "2001:db8:9::/64", "via", "2001:db8:2::2", "metric", "10")
    ip("-n", ns, "route", "add", "198.18.9.0/24", "nexthop", "dev", "v0", "nexthop", "dev", "v1")
    converge(state_of(nswatch.daemon.view), [ns])
    ip("-n", ns, "route", "del", "2001:db8:9::/64", "via", "2001:db8:1::2", "metric", "10")
    converge(state_of(nswatch.daemon.view), [ns])
    ip("-n", ns, "route", "replace", "198.18.9.0/24", "dev", "v0", "metric", "0")
    converge(state_of(nswatch.daemon.view), [ns])


def test_bridge_and_unwatched_peer(lab: Lab, nswatch: Running) -> None:
    """Bridge masters are named, and a veth whose peer is in an unwatched namespace keeps peer null."""
    ns = lab.netns("br")
    hidden = f"nswU{lab.prefix[4:]}h"
    ip("netns", "add", hidden)
    lab.namespaces.append(hidden)
    ip("-n", ns, "link", "add", "br0", "type", "bridge")
    ip("-n", ns, "link", "add", "e0", "type", "veth", "peer", "name", "e1", "netns", hidden)
    ip("-n", ns, "link", "set", "e0", "master", "br0")
    ip("-n", ns, "link", "set", "br0", "up")
    converge(state_of(nswatch.daemon.view), [ns])
    st = get_state(nswatch)
    e0 = next(link for link in st["namespaces"][ns]["links"] if link["name"] == "e0")
    assert e0["master"] == "br0"
    assert e0["peer"] is None
    assert e0["peer_index"] is not None and e0["peer_netnsid"] is not None
    assert hidden not in st["namespaces"]


def test_two_names_one_namespace(lab: Lab, nswatch: Running) -> None:
    """Two names bound to one namespace are one namespace with two names; a name bound to the host is the host."""
    ns = lab.netns("one")
    alias = lab.name("two")
    host_alias = lab.name("hst")
    # `ip netns attach NAME PID` binds an existing process's namespace to a name.
    import os
    import subprocess

    proc = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "30"])
    try:
        wait_for(
            lambda: (
                os.path.exists(f"/proc/{proc.pid}/ns/net")
                and os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino
            )
        )
        ip("netns", "attach", alias, str(proc.pid))
        lab.namespaces.append(alias)
        ip("netns", "attach", host_alias, str(os.getpid()))
        lab.namespaces.append(host_alias)

        def ok() -> bool:
            st = get_state(nswatch)
            names = st["namespaces"].get(ns, {}).get("names", [])
            return (
                alias in names
                and host_alias in st["namespaces"]["host"]["names"]
                and alias not in st["namespaces"]
            )

        wait_for(ok)
    finally:
        proc.kill()
        proc.wait()


def test_counters_refresh_without_link_events(lab: Lab) -> None:
    """Traffic moves the link counters in the model, though the kernel sends no link message for it."""
    from nswatch.daemon import Settings
    from tests.conftest import start_daemon, stop_daemon

    n1, n2 = lab.netns("p1"), lab.netns("p2")
    ip("-n", n1, "link", "add", "e0", "type", "veth", "peer", "name", "e1", "netns", n2)
    ip("-n", n1, "addr", "add", "198.18.40.1/30", "dev", "e0")
    ip("-n", n2, "addr", "add", "198.18.40.2/30", "dev", "e1")
    ip("-n", n1, "link", "set", "e0", "up")
    ip("-n", n2, "link", "set", "e1", "up")
    running = start_daemon(
        Settings(include=f"^{lab.prefix}", reconcile_interval=0, stats_interval=0.2)
    )
    try:
        import subprocess

        subprocess.run(
            ["ip", "netns", "exec", n1, "ping", "-c", "5", "-i", "0.05", "-W", "1", "198.18.40.2"],
            check=True,
            capture_output=True,
        )

        def rx() -> int:
            ns = running.daemon.view().get(n2)
            assert ns is not None
            link = ns.link_by_name("e1")
            return link.stats.rx_packets if link and link.stats else 0

        wait_for(lambda: rx() >= 5, timeout=5)
    finally:
        stop_daemon(running)
