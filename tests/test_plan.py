"""Planning: profile + model -> steps, and stateless subnet allocation."""

from __future__ import annotations

import ipaddress

from nswatch.config import parse_config, render_host_name
from nswatch.model import (
    Address,
    AddressNew,
    Link,
    LinkNew,
    Model,
    NamespaceSeen,
    NsidLearned,
    Route,
    RouteNew,
)
from nswatch.plan import addressing, allocate_subnet, drift, plan

SEED = """
profiles:
  - name: lab
    match: "nstest*"
    loopback: up
    sysctls:
      net.ipv4.ip_forward: 1
    veth:
      host_name: "nsw-{id}"
      netns_name: eth0
      mtu: 1500
      pool: 198.18.0.0/17
      prefix: 30
      default_route: true
    routes:
      - {dst: 198.19.0.0/24, via: host_end}
    enforce: true
  - name: containers
    match: "regex:^ctr-[0-9]+$"
    loopback: up
    veth:
      host_name: "nsw-{id}"
      netns_name: eth0
      bridge: {name: nswbr0, address: 198.18.128.1/24}
      default_route: true
"""
HOST, NS = 1, 2


def model_with(name: str) -> Model:
    m = Model()
    m.apply(NamespaceSeen(HOST, ("host",), is_host=True))
    m.apply(NamespaceSeen(NS, (name,)))
    m.apply(LinkNew(NS, Link(index=1, name="lo", kind="loopback")))
    return m


def test_fresh_namespace_gets_the_whole_seed() -> None:
    """An empty namespace gets veth, addresses, links up, lo, sysctl, default and extra route, in order."""
    config = parse_config(SEED)
    profile = config.profile_for("nstest1")
    assert profile is not None
    m = model_with("nstest1")
    steps = plan(profile, "nstest1", m)
    hname = render_host_name("nsw-{id}", "nstest1")
    ops = [(s.op, s.netns, s.link) for s in steps]
    assert ops[0] == ("create_veth", "host", hname)
    assert ("link_up", "nstest1", "lo") in ops
    assert ("set_sysctl", "nstest1", "net.ipv4.ip_forward") in ops
    addrs = [s.value for s in steps if s.op == "add_address"]
    host_if, ns_if = (ipaddress.ip_interface(a) for a in addrs)
    assert host_if.network == ns_if.network and host_if.network.prefixlen == 30
    assert int(ns_if.ip) == int(host_if.ip) + 1
    routes = [(s.value, s.via) for s in steps if s.op == "add_route"]
    assert routes == [("default", str(host_if.ip)), ("198.19.0.0/24", str(host_if.ip))]
    assert ops.index(("create_veth", "host", hname)) < ops.index(("link_up", "host", hname))
    assert drift(steps) == {"link": 4, "address": 2, "route": 2, "sysctl": 1}


def _complete(m: Model, name: str, host_ip: str, ns_ip: str) -> None:
    hname = render_host_name("nsw-{id}", name)
    m.apply(
        LinkNew(
            HOST,
            Link(
                index=50,
                name=hname,
                kind="veth",
                mtu=1500,
                admin_up=True,
                peer_index=2,
                peer_netnsid=0,
            ),
        )
    )
    m.apply(
        LinkNew(
            NS,
            Link(
                index=2,
                name="eth0",
                kind="veth",
                mtu=1500,
                admin_up=True,
                peer_index=50,
                peer_netnsid=0,
            ),
        )
    )
    m.apply(LinkNew(NS, Link(index=1, name="lo", kind="loopback", admin_up=True)))
    m.apply(NsidLearned(HOST, 0, NS))
    m.apply(AddressNew(HOST, Address(50, "inet", host_ip, 30)))
    m.apply(AddressNew(NS, Address(2, "inet", ns_ip, 30)))
    m.apply(RouteNew(NS, Route(254, "inet", "unicast", "default", gateway=host_ip, dev=2)))
    m.apply(RouteNew(NS, Route(254, "inet", "unicast", "198.19.0.0/24", gateway=host_ip, dev=2)))


def test_matching_namespace_needs_only_sysctls() -> None:
    """A namespace that already matches plans nothing but the (unseen) sysctls, and its subnet is found again."""
    config = parse_config(SEED)
    profile = config.profile_for("nstest1")
    assert profile is not None
    m = model_with("nstest1")
    _complete(m, "nstest1", "198.18.3.1", "198.18.3.2")
    assert allocate_subnet(profile, "nstest1", m, "host") == ipaddress.ip_network("198.18.3.0/30")
    steps = plan(profile, "nstest1", m)
    assert [s.op for s in steps] == ["set_sysctl"]
    assert drift(steps) == {"link": 0, "address": 0, "route": 0, "sysctl": 1}


def test_lost_route_is_drift() -> None:
    """Deleting the default route shows up as one route of drift and one add_route step."""
    config = parse_config(SEED)
    profile = config.profile_for("nstest1")
    assert profile is not None
    m = model_with("nstest1")
    _complete(m, "nstest1", "198.18.3.1", "198.18.3.2")
    ns = m.namespaces[NS]
    del ns.routes[next(k for k, r in ns.routes.items() if r.dst == "default")]
    steps = plan(profile, "nstest1", m)
    assert [str(s) for s in steps if s.op == "add_route"] == [
        "nstest1: ip route add default via 198.18.3.1 dev eth0"
    ]


def test_subnets_never_collide() -> None:
    """Subnets in use anywhere, or reserved by allocations in flight, are never handed out again."""
    config = parse_config(SEED)
    profile = config.profile_for("nstest1")
    assert profile is not None
    m = model_with("nstest1")
    taken: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for i in range(50):
        net = allocate_subnet(profile, f"nstest{i}", m, "host", reserved=taken)
        assert net not in taken
        assert net.subnet_of(ipaddress.ip_network("198.18.0.0/17"))  # type: ignore[arg-type]
        taken.append(net)


def test_bridge_topology() -> None:
    """Bridge profiles create the bridge, enslave the host end and route via the bridge address."""
    config = parse_config(SEED)
    profile = config.profile_for("ctr-7")
    assert profile is not None
    m = model_with("ctr-7")
    addr = addressing(profile, "ctr-7", m, "host")
    assert addr.host is None and addr.gateway == "198.18.128.1"
    assert addr.netns is not None and addr.netns.network == ipaddress.ip_network("198.18.128.0/24")
    steps = plan(profile, "ctr-7", m, addr=addr)
    text = [str(s) for s in steps]
    assert text[0] == "host: ip link add nswbr0 type bridge"
    assert "host: ip addr add 198.18.128.1/24 dev nswbr0" in text
    assert any(t.endswith("master nswbr0") for t in text)
    assert text[-1] == "ctr-7: ip route add default via 198.18.128.1 dev eth0"
