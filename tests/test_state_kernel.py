"""The kernel state beyond links, addresses and routes: rules, flags, parents, carrier."""

from __future__ import annotations

from typing import Any

import pytest

from nswatch.state import state_json
from tests.conftest import Running
from tests.kernel import Lab, ip, ip_json, wait_for

pytestmark = pytest.mark.kernel


def ns_state(r: Running, name: str) -> dict[str, Any]:
    state: dict[str, Any] = state_json(r.daemon.view())["namespaces"].get(name, {})
    return state


def rules_of(r: Running, name: str) -> set[tuple[Any, ...]]:
    return {
        (x["family"], x["priority"], x["src"], x["table"], x["fwmark"])
        for x in ns_state(r, name).get("rules", [])
    }


def kernel_rules(name: str) -> set[tuple[Any, ...]]:
    out = set()
    for family, flag in (("inet", "-4"), ("inet6", "-6")):
        for x in ip_json(name, flag, "rule", "show"):
            src = x.get("src")
            if src == "all":
                src = None
            elif src is not None:
                src = f"{src}/{x.get('srclen', 32 if family == 'inet' else 128)}"
            mark = x.get("fwmark")
            out.add(
                (
                    family,
                    x["priority"],
                    src,
                    x.get("table"),
                    int(mark, 16) if isinstance(mark, str) else mark,
                )
            )
    return out


def test_policy_rules_follow_the_kernel(lab: Lab, nswatch: Running) -> None:
    """Rules of both families appear, match `ip rule` exactly, and go when deleted."""
    ns = lab.netns("r")
    ip("-n", ns, "rule", "add", "from", "198.18.109.2", "lookup", "100", "priority", "100")
    ip("-n", ns, "-6", "rule", "add", "from", "2001:db8::/64", "lookup", "101")
    ip("-n", ns, "rule", "add", "fwmark", "0x7", "lookup", "102")
    wait_for(lambda: rules_of(nswatch, ns) == kernel_rules(ns), timeout=3)
    assert ("inet", 100, "198.18.109.2/32", "100", None) in rules_of(nswatch, ns)
    ip("-n", ns, "rule", "del", "from", "198.18.109.2", "lookup", "100", "priority", "100")
    wait_for(lambda: rules_of(nswatch, ns) == kernel_rules(ns), timeout=3)
    assert not any(r[1] == 100 for r in rules_of(nswatch, ns))


def test_route_turns_linkdown_without_a_notification(lab: Lab, nswatch: Running) -> None:
    """A peer set down marks routes through its partner linkdown (no route message): the model shows it."""
    ns = lab.netns("l")
    a, b = lab.name("a"), lab.name("b")
    ip("-n", ns, "link", "add", a, "type", "veth", "peer", "name", b)
    ip("-n", ns, "link", "set", a, "up")
    ip("-n", ns, "link", "set", b, "up")
    ip("-n", ns, "addr", "add", "198.18.250.1/24", "dev", a)
    ip("-n", ns, "route", "add", "default", "via", "198.18.250.2")

    def default_flags() -> list[str] | None:
        for r in ns_state(nswatch, ns).get("routes", []):
            if r["dst"] == "default" and r["family"] == "inet":
                return list(r["flags"])
        return None

    wait_for(lambda: default_flags() == [], timeout=3)
    ip("-n", ns, "link", "set", b, "down")
    wait_for(lambda: default_flags() == ["linkdown"], timeout=3)
    ip("-n", ns, "link", "set", b, "up")
    wait_for(lambda: default_flags() == [], timeout=3)


def test_address_flags_and_dad_failure(lab: Lab, nswatch: Running) -> None:
    """IPv6 addresses carry their flags: nodad/permanent, and dadfailed for a duplicate."""
    ns = lab.netns("d")
    a, b = lab.name("a"), lab.name("b")
    ip("-n", ns, "link", "add", a, "type", "veth", "peer", "name", b)
    ip("-n", ns, "addr", "add", "2001:db8:7::1/64", "dev", a, "nodad")
    ip("-n", ns, "link", "set", a, "up")
    ip("-n", ns, "link", "set", b, "up")

    def flags(link: str, address: str) -> list[str] | None:
        for x in ns_state(nswatch, ns).get("addresses", []):
            if x["link"] == link and x["address"] == address:
                return list(x["flags"])
        return None

    wait_for(lambda: "nodad" in (flags(a, "2001:db8:7::1") or []), timeout=3)
    assert "permanent" in (flags(a, "2001:db8:7::1") or [])
    # The same address on the other end, with DAD: its probe meets a's answer.
    ip("-n", ns, "addr", "add", "2001:db8:7::1/64", "dev", b)
    wait_for(lambda: "dadfailed" in (flags(b, "2001:db8:7::1") or []), timeout=5)
    kernel = ip_json(ns, "-6", "addr", "show", "dev", b)
    info = next(i for i in kernel[0]["addr_info"] if i["local"] == "2001:db8:7::1")
    assert info.get("dadfailed") is True


def test_macvlan_parent_in_another_namespace(lab: Lab, nswatch: Running) -> None:
    """A macvlan moved into a namespace points at its lower device on the host: `parent` is resolved."""
    ns = lab.netns("m")
    a, b = lab.name("a"), lab.name("b")
    lab.veth(a, b)
    mv = lab.name("mv")
    ip("link", "add", mv, "link", a, "type", "macvlan", "mode", "bridge")
    ip("link", "set", mv, "netns", ns)

    def parent() -> dict[str, Any] | None:
        for link in ns_state(nswatch, ns).get("links", []):
            if link["name"] == mv:
                p: dict[str, Any] | None = link["parent"]
                return p
        return None

    wait_for(lambda: parent() is not None, timeout=3)
    p = parent()
    assert p is not None and (p["netns"], p["name"]) == ("host", a)


def test_carrier_and_counters_of_a_link(lab: Lab, nswatch: Running) -> None:
    """carrier, carrier_changes, txqlen and flags match what `ip -d -s link` says."""
    ns = lab.netns("c")
    a, b = lab.name("a"), lab.name("b")
    ip("-n", ns, "link", "add", a, "type", "veth", "peer", "name", b)
    ip("-n", ns, "link", "set", a, "up", "txqueuelen", "321")
    ip("-n", ns, "link", "set", b, "up")
    ip("-n", ns, "link", "set", b, "down")
    ip("-n", ns, "link", "set", a, "alias", "uplink")

    def link() -> dict[str, Any] | None:
        links: list[dict[str, Any]] = ns_state(nswatch, ns).get("links", [])
        return next((x for x in links if x["name"] == a), None)

    def matches() -> bool:
        have = link()
        want = ip_json(ns, "-d", "link", "show", "dev", a)[0]
        # iproute2 6.1's JSON has no carrier_changes; the namespace's sysfs does.
        sysfs = f"/sys/class/net/{a}/carrier_changes"
        changes = int(ip("netns", "exec", ns, "cat", sysfs))
        return (
            have is not None
            and have["carrier"] is False
            and have["carrier_changes"] == changes >= 2
            and have["txqlen"] == want["txqlen"] == 321
            and have["ifalias"] == want.get("ifalias") == "uplink"
            and "UP" in have["flags"]
            and "LOWER_UP" not in have["flags"]
        )

    wait_for(matches, timeout=3)


def test_tentative_address_is_shown_while_dad_runs(lab: Lab, nswatch: Running) -> None:
    """An IPv6 address under duplicate-address detection is in the model at once, flagged tentative."""
    ns = lab.netns("t")
    a, b = lab.name("a"), lab.name("b")
    ip("-n", ns, "link", "add", a, "type", "veth", "peer", "name", b)
    ip("-n", ns, "link", "set", a, "up")
    ip("-n", ns, "link", "set", b, "up")
    wait_for(lambda: any(x["name"] == a for x in ns_state(nswatch, ns).get("links", [])))
    # Ten probes a second apart: DAD runs for ~10 s, far longer than the model needs.
    ip("netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{a}.dad_transmits=10")
    ip("netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.neigh.{a}.retrans_time_ms=1000")
    ip("-n", ns, "addr", "add", "2001:db8:9::1/64", "dev", a)

    def flags() -> list[str] | None:
        for x in ns_state(nswatch, ns).get("addresses", []):
            if x["link"] == a and x["address"] == "2001:db8:9::1":
                return list(x["flags"])
        return None

    wait_for(lambda: "tentative" in (flags() or []), timeout=5)
    kernel = ip_json(ns, "-6", "addr", "show", "dev", a)[0]["addr_info"]
    assert any(i["local"] == "2001:db8:9::1" and i.get("tentative") for i in kernel)
    wait_for(lambda: flags() == ["permanent"], timeout=20)


def test_macvlan_parent_in_a_namespace_other_than_the_host(lab: Lab, nswatch: Running) -> None:
    """A macvlan whose lower device lives in another named namespace (no veth between them) resolves too."""
    low, top = lab.netns("lo"), lab.netns("tp")
    a, b = lab.name("a"), lab.name("b")
    ip("-n", low, "link", "add", a, "type", "veth", "peer", "name", b)
    mv = lab.name("mv")
    ip("-n", low, "link", "add", mv, "link", a, "type", "macvlan", "mode", "bridge")
    ip("-n", low, "link", "set", mv, "netns", top)

    def parent() -> dict[str, Any] | None:
        for link in ns_state(nswatch, top).get("links", []):
            if link["name"] == mv:
                p: dict[str, Any] | None = link["parent"]
                return p
        return None

    wait_for(lambda: parent() is not None, timeout=3)
    p = parent()
    assert p is not None and (p["netns"], p["name"]) == (low, a)
