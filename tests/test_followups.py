"""followups(): the kernel's quirks turned into re-dumps, resyncs and nsid questions (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from nswatch.followups import (
    ROUTE_FOLLOWUP_DELAYS,
    Action,
    AskNsid,
    LookInProc,
    RedumpRoutes,
    Resync,
    followups,
)
from nswatch.model import (
    Address,
    AddressDel,
    AddressNew,
    Dump,
    Event,
    Link,
    LinkDel,
    LinkNew,
    Model,
    NamespaceSeen,
    NsidLearned,
    Route,
    RouteDel,
    RouteNew,
    apply_all,
)

HOST, A, B = 1, 2, 3


def model() -> Model:
    m = Model()
    m.apply(NamespaceSeen(HOST, ("host",), is_host=True))
    m.apply(NamespaceSeen(A, ("a",)))
    m.apply(NamespaceSeen(B, ("b",)))
    return m


def dev(index: int, up: bool = True, oper: str = "UP") -> Link:
    return Link(index=index, name=f"d{index}", kind="device", admin_up=up, oper_state=oper)


def veth(index: int, peer: int | None, nsid: int | None, up: bool = True) -> Link:
    return Link(
        index=index,
        name=f"v{index}",
        kind="veth",
        admin_up=up,
        peer_index=peer,
        peer_netnsid=nsid,
    )


def run(m: Model, inode: int, events: Sequence[Event], *, synced: bool = True) -> list[Action]:
    """Apply ``events`` like the daemon does and return the follow-ups of that batch."""
    changes = apply_all(m, events)
    return followups(inode, events, changes, m, synced=synced)


def test_admin_down_redumps_that_links_ipv4_routes_at_both_delays() -> None:
    """A link going admin-down re-dumps IPv4 routes through it, once per follow-up delay."""
    m = model()
    run(m, A, [LinkNew(A, dev(3)), LinkNew(A, dev(4))])
    # Admin-down without an operstate change (it was already down): the IPv4 flush alone.
    run(m, A, [LinkNew(A, dev(3, up=True, oper="DOWN"))])
    out = run(m, A, [LinkNew(A, dev(3, up=False, oper="DOWN"))])
    assert out == [RedumpRoutes(A, "inet", d, 3) for d in ROUTE_FOLLOWUP_DELAYS]
    assert len(ROUTE_FOLLOWUP_DELAYS) == 2 and ROUTE_FOLLOWUP_DELAYS[0] < ROUTE_FOLLOWUP_DELAYS[1]


def test_carrier_changes_redump_both_families_for_linkdown() -> None:
    """Losing or regaining carrier flips the routes' linkdown flag silently: both families are re-dumped."""
    m = model()
    run(m, A, [LinkNew(A, dev(3))])
    both = [
        RedumpRoutes(A, family, d, 3) for family in ("inet", "inet6") for d in ROUTE_FOLLOWUP_DELAYS
    ]
    assert run(m, A, [LinkNew(A, dev(3, up=True, oper="LOWERLAYERDOWN"))]) == both
    assert run(m, A, [LinkNew(A, dev(3, up=True))]) == both


def test_admin_up_with_no_state_change_needs_nothing() -> None:
    """Coming admin-up while the operational state stays DOWN adds routes with their own notifications."""
    m = model()
    run(m, A, [LinkNew(A, dev(3, up=False, oper="DOWN"))])
    assert run(m, A, [LinkNew(A, dev(3, up=True, oper="DOWN"))]) == []


def test_ipv4_address_removal_redumps_that_links_ipv4_routes() -> None:
    """Deleting an IPv4 address re-dumps IPv4 routes through its link; an IPv6 one does not."""
    m = model()
    v4 = Address(3, "inet", "198.18.0.1", 24)
    v6 = Address(4, "inet6", "2001:db8::1", 64)
    run(m, A, [LinkNew(A, dev(3)), LinkNew(A, dev(4)), AddressNew(A, v4), AddressNew(A, v6)])
    assert run(m, A, [AddressDel(A, v6)]) == []
    assert run(m, A, [AddressDel(A, v4)]) == [
        RedumpRoutes(A, "inet", d, 3) for d in ROUTE_FOLLOWUP_DELAYS
    ]


def test_several_stale_links_are_each_redumped_once() -> None:
    """Two links down in one batch get their own re-dumps, sorted by ifindex, without duplicates."""
    m = model()
    a4 = Address(5, "inet", "198.18.0.1", 24)
    run(m, A, [LinkNew(A, dev(5)), LinkNew(A, dev(3)), AddressNew(A, a4)])
    out = run(m, A, [LinkNew(A, dev(5, up=False)), AddressDel(A, a4), LinkNew(A, dev(3, up=False))])
    assert out == [RedumpRoutes(A, "inet", d, i) for i in (3, 5) for d in ROUTE_FOLLOWUP_DELAYS]


def test_veth_announced_without_peer_index_resyncs_links() -> None:
    """A veth notified with IFLA_LINK 0 (peer not attached yet) asks for a link re-dump of its namespace."""
    m = model()
    out = run(m, A, [LinkNew(A, veth(7, None, None))])
    assert out == [Resync(A, "veth_incomplete", ("link",))]
    # Once a notification carries the peer, nothing more is needed.
    assert run(m, A, [LinkNew(A, veth(7, 8, None))]) == []


def test_veth_without_peer_index_in_a_dump_is_the_truth() -> None:
    """A dump showing a veth without peer needs no re-dump: that dump was the re-dump."""
    m = model()
    out = run(m, A, [Dump(A, "link", (veth(7, None, None),), reason="veth_incomplete")])
    assert out == []


def test_veth_lost_by_a_move_resyncs_the_partners_namespace() -> None:
    """When a veth end moves away, the namespace of the end that stayed re-dumps its links."""
    m = model()
    run(m, A, [LinkNew(A, veth(5, 9, 0))])
    run(m, B, [LinkNew(B, veth(9, 5, 4))])
    m.apply(NsidLearned(A, 0, B))
    m.apply(NsidLearned(B, 4, A))
    assert m.peers[(A, 5)] == (B, 9)
    out = run(m, A, [LinkDel(A, 5, moved=True)])
    assert out == [Resync(B, "peer_moved", ("link",))]


def test_veth_deleted_resyncs_nobody() -> None:
    """A deleted veth takes its peer along; the kernel notifies that, so nothing is re-dumped."""
    m = model()
    run(m, A, [LinkNew(A, veth(5, 6, None)), LinkNew(A, veth(6, 5, None))])
    assert run(m, A, [LinkDel(A, 5)]) == []


def _gw(gateway: str, dev: int) -> Route:
    return Route(254, "inet6", "unicast", "2001:db8:9::/64", gateway=gateway, dev=dev, priority=10)


def test_ipv6_route_that_may_merge_redumps_ipv6_routes() -> None:
    """A second IPv6 gateway route with the same dst and metric may have merged: re-dump inet6 once."""
    m = model()
    run(m, A, [LinkNew(A, dev(3)), LinkNew(A, dev(4))])
    assert run(m, A, [RouteNew(A, _gw("2001:db8:1::2", 3))]) == []
    out = run(m, A, [RouteNew(A, _gw("2001:db8:2::2", 4))])
    assert out == [RedumpRoutes(A, "inet6", ROUTE_FOLLOWUP_DELAYS[0])]
    out = run(m, A, [RouteDel(A, _gw("2001:db8:2::2", 4))])
    assert out == [RedumpRoutes(A, "inet6", ROUTE_FOLLOWUP_DELAYS[0])]


def test_ipv4_routes_and_device_routes_never_look_multipath() -> None:
    """IPv4 keeps appended routes apart and device routes never merge: no inet6 re-dump for them."""
    m = model()
    r4 = Route(254, "inet", "unicast", "198.18.9.0/24", gateway="198.18.0.2", priority=10)
    r4b = Route(254, "inet", "unicast", "198.18.9.0/24", gateway="198.18.0.3", priority=10)
    d6 = Route(254, "inet6", "unicast", "2001:db8:9::/64", dev=3, priority=10)
    d6b = Route(254, "inet6", "unicast", "2001:db8:9::/64", dev=4, priority=10)
    assert run(m, A, [RouteNew(A, r4), RouteNew(A, r4b), RouteNew(A, d6), RouteNew(A, d6b)]) == []


def test_first_dump_has_no_followups_but_still_asks_nsids() -> None:
    """During the first dump nothing is re-dumped, yet the nsid of a veth's peer is asked for."""
    m = model()
    run(m, B, [LinkNew(B, veth(9, 5, 4))])
    v4 = Address(5, "inet", "198.18.0.1", 24)
    run(m, A, [LinkNew(A, veth(5, 9, 0)), AddressNew(A, v4)])
    events: list[Event] = [
        LinkNew(A, veth(5, 9, 0, up=False)),  # admin-down
        AddressDel(A, v4),  # IPv4 address removal
        LinkNew(A, veth(7, None, None)),  # veth without peer
        RouteNew(A, _gw("2001:db8:1::2", 5)),
        RouteNew(A, _gw("2001:db8:2::2", 6)),  # IPv6 multipath candidate
    ]
    out = run(m, A, events, synced=False)
    assert out == [AskNsid(A, B)]
    # The same batch once synced asks for every follow-up, the nsid question last.
    m2 = model()
    run(m2, B, [LinkNew(B, veth(9, 5, 4))])
    run(m2, A, [LinkNew(A, veth(5, 9, 0)), AddressNew(A, v4)])
    kinds = [type(a).__name__ for a in run(m2, A, events, synced=True)]
    assert kinds == ["RedumpRoutes", "RedumpRoutes", "Resync", "RedumpRoutes", "AskNsid"]


def test_nsid_is_asked_only_of_namespaces_holding_a_matching_end() -> None:
    """Only a namespace with a veth at the peer's ifindex pointing back is asked about, once it exists."""
    m = model()
    run(m, B, [LinkNew(B, veth(9, 77, 4))])  # points elsewhere: not a candidate
    # No watched namespace can hold its peer yet: only /proc might.
    assert run(m, A, [LinkNew(A, veth(5, 9, 0))]) == [LookInProc()]
    out = run(m, HOST, [LinkNew(HOST, veth(9, 5, 3))])
    assert out == [AskNsid(HOST, A)]
    # The first end asks about the host too, when its next message comes.
    assert run(m, A, [LinkNew(A, veth(5, 9, 0))]) == []  # no change, no question
    out = run(m, A, [LinkNew(A, replace(veth(5, 9, 0), mtu=1400))])
    assert out == [AskNsid(A, HOST)]


def test_no_nsid_question_once_known_or_paired() -> None:
    """A known netnsid, or a pair already resolved, needs no question."""
    m = model()
    m.apply(LinkNew(HOST, veth(9, 5, 3)))
    m.apply(NsidLearned(A, 0, HOST))
    assert run(m, A, [LinkNew(A, veth(5, 9, 0))]) == []
    # One side knowing is enough when the other end points back at it.
    assert m.peers[(HOST, 9)] == (A, 5)
    assert run(m, HOST, [LinkNew(HOST, replace(veth(9, 5, 3), mtu=1400))]) == []


def test_same_namespace_veth_asks_nothing() -> None:
    """Both ends in one namespace carry no netnsid: nothing to ask."""
    m = model()
    assert run(m, A, [LinkNew(A, veth(5, 6, None)), LinkNew(A, veth(6, 5, None))]) == []
    assert m.peers[(A, 5)] == (A, 6)


def test_a_veth_whose_peer_no_watched_namespace_can_hold_asks_to_look_in_proc() -> None:
    """A veth pointing at an unknown netnsid with no candidate namespace means a process-held one: look in /proc."""
    m = model()
    out = run(m, A, [LinkNew(A, veth(7, 9, 4))])
    assert LookInProc() in out
    # Once a watched namespace holds a matching end, asking its nsid is enough.
    m.apply(LinkNew(B, veth(9, 7, 2)))
    out = run(m, A, [LinkNew(A, veth(7, 9, 4, up=False))])
    assert LookInProc() not in out and AskNsid(A, B) in out
