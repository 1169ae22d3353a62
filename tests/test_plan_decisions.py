"""plan(): each decision of what a namespace still needs, one model difference at a time."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nswatch.config import Profile, parse_config, render_host_name
from nswatch.model import (
    Address,
    AddressNew,
    Link,
    LinkNew,
    Model,
    NamespaceSeen,
    Nexthop,
    NsidLearned,
    Route,
    RouteNew,
)
from nswatch.plan import Blocked, addressing, plan

HOST, NS, OTHER = 1, 2, 3
NAME = "pd1"
HNAME = render_host_name("nsw-{id}", NAME)
HOST_IP, NS_IP = "198.18.3.1", "198.18.3.2"

P2P = """
profiles:
  - name: p2p
    match: "pd*"
    loopback: up
    veth:
      host_name: "nsw-{id}"
      netns_name: eth0
      mtu: 1400
      pool: 198.18.0.0/17
      prefix: 30
      default_route: true
    addresses:
      - {address: 198.18.200.1/32, dev: lo}
    routes:
      - {dst: 198.19.0.0/24, via: host_end, metric: 20}
      - {dst: 198.19.1.0/24, dev: eth0, table: 100}
  - name: bridged
    match: "br*"
    veth:
      host_name: "nsw-{id}"
      netns_name: eth0
      bridge: {name: nswbr0, address: 198.18.128.1/24}
"""


def profile(name: str = NAME) -> Profile:
    p = parse_config(P2P).profile_for(name)
    assert p is not None
    return p


def host_end(**kw: object) -> Link:
    base = Link(50, HNAME, "veth", mtu=1400, admin_up=True, peer_index=2, peer_netnsid=0)
    return replace(base, **kw)  # type: ignore[arg-type]


def ns_end(**kw: object) -> Link:
    base = Link(2, "eth0", "veth", mtu=1400, admin_up=True, peer_index=50, peer_netnsid=0)
    return replace(base, **kw)  # type: ignore[arg-type]


def complete(host: Link | None = None, nsl: Link | None = None) -> Model:
    """A model in which namespace NAME matches the p2p profile exactly."""
    m = Model()
    m.apply(NamespaceSeen(HOST, ("host",), is_host=True))
    m.apply(NamespaceSeen(NS, (NAME,)))
    m.apply(LinkNew(HOST, host or host_end()))
    m.apply(LinkNew(NS, nsl or ns_end()))
    m.apply(LinkNew(NS, Link(1, "lo", "loopback", admin_up=True)))
    m.apply(NsidLearned(HOST, 0, NS))
    m.apply(NsidLearned(NS, 0, HOST))
    m.apply(AddressNew(HOST, Address(50, "inet", HOST_IP, 30)))
    m.apply(AddressNew(NS, Address(2, "inet", NS_IP, 30)))
    m.apply(AddressNew(NS, Address(1, "inet", "198.18.200.1", 32)))
    gw = Route(254, "inet", "unicast", "default", gateway=HOST_IP, dev=2)
    m.apply(RouteNew(NS, gw))
    m.apply(
        RouteNew(NS, Route(254, "inet", "unicast", "198.19.0.0/24", gateway=HOST_IP, priority=20))
    )
    m.apply(RouteNew(NS, Route(100, "inet", "unicast", "198.19.1.0/24", dev=2)))
    return m


def steps(m: Model, name: str = NAME) -> list[str]:
    return [str(s) for s in plan(profile(name), name, m)]


def test_complete_namespace_needs_nothing() -> None:
    """The reference model matches: no step at all (this profile has no sysctls)."""
    m = complete()
    assert m.peers[(HOST, 50)] == (NS, 2)
    assert steps(m) == []


def test_veth_names_present_but_not_paired_waits_instead_of_creating() -> None:
    """Both names existing but not known as each other's peer: no create (it would clash), wait for the peers."""
    m = complete()
    m.veths.unpair((HOST, 50))
    with pytest.raises(Blocked) as e:
        plan(profile(), NAME, m)
    assert e.value.pending


def test_veth_paired_elsewhere_is_left_alone() -> None:
    """A host end paired with a link in another namespace is not this namespace's veth: blocked, not created or touched."""
    m = complete()
    m.apply(NamespaceSeen(OTHER, ("other",)))
    m.veths.unpair((HOST, 50))
    m.veths.pair((HOST, 50), (OTHER, 2))
    with pytest.raises(Blocked) as e:
        plan(profile(), NAME, m)
    assert not e.value.pending


def test_mtu_is_fixed_on_the_side_that_differs() -> None:
    """A paired veth with a wrong MTU gets set_mtu on that end only, not a new veth."""
    assert steps(complete(nsl=ns_end(mtu=1500))) == [f"{NAME}: ip link set eth0 mtu 1400"]
    assert steps(complete(host=host_end(mtu=9000))) == [f"host: ip link set {HNAME} mtu 1400"]


def test_down_ends_are_brought_up() -> None:
    """An admin-down end, on either side, gets link_up."""
    assert steps(complete(host=host_end(admin_up=False))) == [f"host: ip link set {HNAME} up"]
    assert steps(complete(nsl=ns_end(admin_up=False))) == [f"{NAME}: ip link set eth0 up"]


def test_loopback_down_is_brought_up() -> None:
    """`loopback: up` adds link_up for lo only when lo is down."""
    m = complete()
    m.apply(LinkNew(NS, Link(1, "lo", "loopback", admin_up=False)))
    assert steps(m) == [f"{NAME}: ip link set lo up"]


def test_address_on_the_wrong_link_is_missing() -> None:
    """An address counts only on the link the profile names, with the same prefix length."""
    m = complete()
    ns = m.namespaces[NS]
    del ns.addresses[(2, "inet", NS_IP, 30)]
    m.apply(AddressNew(NS, Address(1, "inet", NS_IP, 30)))
    m.apply(AddressNew(NS, Address(2, "inet", NS_IP, 24)))
    assert steps(m) == [f"{NAME}: ip addr add {NS_IP}/30 dev eth0"]


def test_extra_address_missing() -> None:
    """A profile address absent from its device is added."""
    m = complete()
    del m.namespaces[NS].addresses[(1, "inet", "198.18.200.1", 32)]
    assert steps(m) == [f"{NAME}: ip addr add 198.18.200.1/32 dev lo"]


def _drop_route(m: Model, dst: str) -> Route:
    ns = m.namespaces[NS]
    key = next(k for k, r in ns.routes.items() if r.dst == dst)
    return ns.routes.pop(key)


def test_default_route_through_another_gateway_or_device_is_missing() -> None:
    """The default route must go via the host end and out of eth0."""
    m = complete()
    _drop_route(m, "default")
    m.apply(RouteNew(NS, Route(254, "inet", "unicast", "default", gateway="198.18.3.9", dev=2)))
    want = [f"{NAME}: ip route add default via {HOST_IP} dev eth0"]
    assert steps(m) == want
    _drop_route(m, "default")
    m.apply(RouteNew(NS, Route(254, "inet", "unicast", "default", gateway=HOST_IP, dev=1)))
    assert steps(m) == want


def test_route_metric_and_table_must_match() -> None:
    """A route with the wrong metric, or in the wrong table, does not satisfy the profile."""
    m = complete()
    r = _drop_route(m, "198.19.0.0/24")
    m.apply(RouteNew(NS, replace(r, priority=30)))
    assert steps(m) == [f"{NAME}: ip route add 198.19.0.0/24 via {HOST_IP} metric 20"]
    m = complete()
    r = _drop_route(m, "198.19.1.0/24")
    m.apply(RouteNew(NS, replace(r, table=254)))
    assert steps(m) == [f"{NAME}: ip route add 198.19.1.0/24 dev eth0 table 100"]


def test_multipath_route_through_the_gateway_satisfies() -> None:
    """A multipath route with a nexthop via the wanted gateway counts as present."""
    m = complete()
    r = _drop_route(m, "198.19.0.0/24")
    hops = (Nexthop("198.18.3.5", 2), Nexthop(HOST_IP, 2))
    m.apply(RouteNew(NS, replace(r, gateway=None, nexthops=hops)))
    assert steps(m) == []


def test_existing_subnet_is_kept_in_the_plan() -> None:
    """A namespace with its host end addressed from the pool keeps that subnet for the missing end."""
    m = complete()
    del m.namespaces[NS].addresses[(2, "inet", NS_IP, 30)]
    addr = addressing(profile(), NAME, m, "host")
    assert (str(addr.host), str(addr.netns), addr.gateway) == (
        f"{HOST_IP}/30",
        f"{NS_IP}/30",
        HOST_IP,
    )


def _bridged(bridge: Link | None, master: int | None, bridge_addr: bool) -> Model:
    name = "br1"
    hname = render_host_name("nsw-{id}", name)
    m = Model()
    m.apply(NamespaceSeen(HOST, ("host",), is_host=True))
    m.apply(NamespaceSeen(NS, (name,)))
    if bridge is not None:
        m.apply(LinkNew(HOST, bridge))
        if bridge_addr:
            m.apply(AddressNew(HOST, Address(bridge.index, "inet", "198.18.128.1", 24)))
    m.apply(LinkNew(HOST, host_end(name=hname, master=master, mtu=1500)))
    m.apply(LinkNew(NS, ns_end(mtu=1500)))
    m.apply(NsidLearned(HOST, 0, NS))
    m.apply(AddressNew(NS, Address(2, "inet", "198.18.128.7", 24)))
    return m


def test_bridge_steps_follow_what_exists() -> None:
    """Bridge: created, addressed and brought up only as far as needed; a wrong master is fixed."""
    br = Link(40, "nswbr0", "bridge", admin_up=True)
    hname = render_host_name("nsw-{id}", "br1")
    assert steps(_bridged(br, 40, True), "br1") == []
    assert steps(_bridged(replace(br, admin_up=False), 40, True), "br1") == [
        "host: ip link set nswbr0 up"
    ]
    assert steps(_bridged(br, 40, False), "br1") == ["host: ip addr add 198.18.128.1/24 dev nswbr0"]
    assert steps(_bridged(br, None, True), "br1") == [f"host: ip link set {hname} master nswbr0"]
    ops = [s.op for s in plan(profile("br1"), "br1", _bridged(None, None, False))]
    assert ops[:4] == ["create_bridge", "add_address", "link_up", "set_master"]
