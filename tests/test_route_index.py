"""The model's index of routes by link: a link's routes without walking the table."""

from __future__ import annotations

from nswatch.model import (
    Dump,
    Link,
    LinkDel,
    LinkNew,
    Model,
    NamespaceSeen,
    Nexthop,
    Route,
    RouteDel,
    RouteNew,
)

A = 2


def model_with_routes() -> Model:
    m = Model()
    m.apply(NamespaceSeen(A, ("a",)))
    for i in (3, 4, 5):
        m.apply(LinkNew(A, Link(index=i, name=f"e{i}", kind="device")))
    m.apply(RouteNew(A, Route(254, "inet", "unicast", "198.18.1.0/24", dev=3)))
    m.apply(RouteNew(A, Route(254, "inet", "unicast", "198.18.2.0/24", dev=4)))
    m.apply(
        RouteNew(
            A,
            Route(
                254,
                "inet",
                "unicast",
                "198.18.9.0/24",
                nexthops=(Nexthop("198.18.1.1", 3), Nexthop("198.18.2.1", 4)),
            ),
        )
    )
    return m


def consistent(m: Model) -> bool:
    ns = m.namespaces[A]
    want: dict[int, set[object]] = {}
    for key, r in ns.routes.items():
        for dev in {r.dev, *(nh.dev for nh in r.nexthops)} - {None}:
            assert dev is not None
            want.setdefault(dev, set()).add(key)
    return {d: set(ns.route_keys_via(d)) for d in want} == want


def test_index_follows_adds_deletes_and_link_removal() -> None:
    """The index lists exactly the routes through each link, multipath paths included, as routes come and go."""
    m = model_with_routes()
    ns = m.namespaces[A]
    assert sorted(ns.routes[k].dst for k in ns.route_keys_via(3)) == [
        "198.18.1.0/24",
        "198.18.9.0/24",
    ]
    assert consistent(m)
    m.apply(RouteDel(A, Route(254, "inet", "unicast", "198.18.2.0/24", dev=4)))
    assert consistent(m)
    m.apply(LinkDel(A, 3))
    assert sorted(r.dst for r in ns.routes.values()) == []
    assert consistent(m) and 3 not in ns.routes_via


def test_dump_limited_to_a_link_touches_only_its_routes() -> None:
    """A route re-dump through one link removes what that link lost and nothing else, through the index."""
    m = model_with_routes()
    m.apply(Dump(A, "route", (), family="inet", reason="route_followup", dev=5))
    assert len(m.namespaces[A].routes) == 3
    m.apply(Dump(A, "route", (), family="inet", reason="route_followup", dev=4))
    assert sorted(r.dst for r in m.namespaces[A].routes.values()) == ["198.18.1.0/24"]
    assert consistent(m)


def test_a_copy_can_be_applied_to_and_a_snapshot_carries_no_index() -> None:
    """Model.copy keeps the index (events can be applied to it); readers' snapshots do not need one."""
    m = model_with_routes()
    c = m.copy()
    c.apply(LinkDel(A, 4))
    assert sorted(r.dst for r in c.namespaces[A].routes.values()) == ["198.18.1.0/24"]
    assert len(m.namespaces[A].routes) == 3
    assert m.snapshot().namespaces[A].routes_via == {}
