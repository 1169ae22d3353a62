"""The pure model: events in, changes out, with no kernel involved."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from nswatch.model import (
    Address,
    AddressNew,
    Change,
    Dump,
    Link,
    LinkDel,
    LinkNew,
    LinkRemoved,
    Model,
    NamespaceGone,
    NamespaceSeen,
    NsidLearned,
    Route,
    RouteDel,
    RouteNew,
    RouteRemoved,
    Synced,
    VethLost,
)

HOST, A, B = 1, 2, 3


def veth(index: int, peer: int, nsid: int | None, name: str | None = None) -> Link:
    return Link(
        index=index,
        name=name or f"v{index}",
        kind="veth",
        peer_index=peer,
        peer_netnsid=nsid,
        admin_up=True,
        oper_state="UP",
    )


def base() -> Model:
    m = Model()
    m.apply(NamespaceSeen(HOST, ("host",), is_host=True))
    m.apply(NamespaceSeen(A, ("a",)))
    m.apply(NamespaceSeen(B, ("b",)))
    return m


def kinds(changes: list[Change]) -> list[tuple[str, str]]:
    return [(c.kind, c.action) for c in changes]


def test_namespace_added_and_removed() -> None:
    """A namespace appears once, and its removal removes its links with reason namespace_deleted."""
    m = base()
    m.apply(LinkNew(A, Link(index=1, name="lo", kind="loopback")))
    out = m.apply(NamespaceGone(A))
    assert ("link", "removed") in kinds(out)
    assert next(c for c in out if isinstance(c, LinkRemoved)).reason == "namespace_deleted"
    assert m.get("a") is None and A not in m.namespaces


def test_same_namespace_pair_resolves_without_nsid() -> None:
    """Both ends in one namespace carry no netnsid and pair up by ifindex."""
    m = base()
    m.apply(LinkNew(A, veth(5, 6, None)))
    out = m.apply(LinkNew(A, veth(6, 5, None)))
    assert ("veth_peer", "resolved") in kinds(out)
    assert m.peers[(A, 5)] == (A, 6) and m.peers[(A, 6)] == (A, 5)


def test_cross_namespace_pair_needs_the_nsid() -> None:
    """A host<->ns pair resolves only once the nsid is known, then symmetrically."""
    m = base()
    m.apply(LinkNew(HOST, veth(10, 2, 0)))
    m.apply(LinkNew(A, veth(2, 10, 0)))
    assert m.peers == {}
    assert m.veths.candidates(HOST, m.namespaces[HOST].links[10]) == [A]
    out = m.apply(NsidLearned(HOST, 0, A))
    assert ("veth_peer", "resolved") in kinds(out)
    assert m.peers[(A, 2)] == (HOST, 10)
    peer = m.peer_of(A, 2)
    assert peer is not None and (peer.netns, peer.name) == ("host", "v10")


def test_equal_ifindex_in_two_namespaces_resolves_by_nsid() -> None:
    """Two namespaces with a veth at the same ifindex: the nsid decides which is the peer."""
    m = base()
    m.apply(LinkNew(HOST, veth(10, 2, 0)))
    m.apply(LinkNew(HOST, veth(11, 2, 1)))
    m.apply(LinkNew(A, veth(2, 11, 7)))
    m.apply(LinkNew(B, veth(2, 10, 7)))
    m.apply(NsidLearned(HOST, 0, B))
    m.apply(NsidLearned(HOST, 1, A))
    assert m.peers[(HOST, 10)] == (B, 2)
    assert m.peers[(HOST, 11)] == (A, 2)


def test_namespace_deletion_dooms_the_host_end() -> None:
    """The host end that dies with its peer's namespace counts as namespace_deleted, not deleted."""
    m = base()
    m.apply(LinkNew(HOST, veth(10, 2, 0)))
    m.apply(LinkNew(A, veth(2, 10, 0)))
    m.apply(NsidLearned(HOST, 0, A))
    m.apply(NamespaceGone(A))
    out = m.apply(LinkDel(HOST, 10))
    removed = next(c for c in out if isinstance(c, LinkRemoved))
    assert removed.reason == "namespace_deleted"
    assert m.namespaces[HOST].nsids == {}


def test_plain_delete_and_move_reasons() -> None:
    """RTM_DELLINK is `deleted`, or `moved` when the kernel named a new namespace."""
    m = base()
    m.apply(LinkNew(A, veth(5, 6, None)))
    m.apply(LinkNew(A, veth(6, 5, None)))
    out = m.apply(LinkDel(A, 5, moved=True))
    assert next(c for c in out if isinstance(c, LinkRemoved)).reason == "moved"
    lost = next(c for c in out if isinstance(c, VethLost))
    assert lost.reason == "moved"
    out = m.apply(LinkDel(A, 6))
    assert next(c for c in out if isinstance(c, LinkRemoved)).reason == "deleted"


def test_peer_attributes_changing_unpair_and_repair() -> None:
    """A veth end whose IFLA_LINK now names another ifindex loses its old pair and pairs with the new peer."""
    m = base()
    m.apply(LinkNew(A, veth(5, 6, None)))
    m.apply(LinkNew(A, veth(6, 5, None)))
    m.apply(LinkNew(A, veth(7, 5, None)))
    out = m.apply(LinkNew(A, veth(5, 7, None)))
    lost = next(c for c in out if isinstance(c, VethLost))
    assert (lost.pair.a, lost.pair.b) == ((A, 5), (A, 6))
    assert m.peers == {(A, 5): (A, 7), (A, 7): (A, 5)}


def test_rename_keeps_the_pair() -> None:
    """A rename is a change on the same ifindex; the pair stays and is reported again."""
    m = base()
    m.apply(LinkNew(A, veth(5, 6, None)))
    m.apply(LinkNew(A, veth(6, 5, None)))
    out = m.apply(LinkNew(A, veth(6, 5, None, name="eth0")))
    assert ("link", "changed") in kinds(out)
    assert m.peers[(A, 5)] == (A, 6)
    peer = m.peer_of(A, 5)
    assert peer is not None and peer.name == "eth0"


def test_link_removal_drops_its_addresses_and_routes() -> None:
    """The kernel drops a link's addresses and routes with it; so does the model."""
    m = base()
    m.apply(LinkNew(A, Link(index=3, name="e", kind="device")))
    m.apply(AddressNew(A, Address(3, "inet", "198.18.0.1", 24)))
    m.apply(RouteNew(A, Route(254, "inet", "unicast", "198.18.0.0/24", dev=3)))
    m.apply(LinkDel(A, 3))
    assert m.namespaces[A].addresses == {} and m.namespaces[A].routes == {}


def test_route_replace_overwrites_same_dst_and_metric() -> None:
    """NLM_F_REPLACE swaps the route with the same table, dst, tos and metric."""
    m = base()
    m.apply(RouteNew(A, Route(254, "inet", "unicast", "198.18.1.0/24", gateway="198.18.0.2")))
    m.apply(
        RouteNew(
            A, Route(254, "inet", "unicast", "198.18.1.0/24", gateway="198.18.0.2", priority=5)
        )
    )
    m.apply(
        RouteNew(
            A, Route(254, "inet", "unicast", "198.18.1.0/24", gateway="198.18.0.3"), replace=True
        )
    )
    gws = sorted((r.gateway, r.priority) for r in m.namespaces[A].routes.values())
    assert gws == [("198.18.0.2", 5), ("198.18.0.3", None)]
    out = m.apply(RouteDel(A, Route(254, "inet", "unicast", "198.18.1.0/24", gateway="198.18.0.3")))
    assert kinds(out) == [("route", "removed")]


def test_ipv6_routes_on_different_links_are_distinct() -> None:
    """fe80::/64 exists once per link in IPv6: same dst and metric, different device."""
    m = base()
    m.apply(RouteNew(A, Route(254, "inet6", "unicast", "fe80::/64", dev=2, priority=256)))
    m.apply(RouteNew(A, Route(254, "inet6", "unicast", "fe80::/64", dev=3, priority=256)))
    assert len(m.namespaces[A].routes) == 2


def test_dump_replaces_and_reports_differences() -> None:
    """A non-initial dump removes what the kernel no longer has and marks the changes as found by a dump."""
    m = base()
    m.apply(LinkNew(A, Link(index=3, name="e", kind="device")))
    m.apply(LinkNew(A, Link(index=4, name="f", kind="device")))
    out = m.apply(Dump(A, "link", (Link(index=3, name="e", kind="device"),), reason="reconcile"))
    assert [(c.kind, c.action, c.from_dump) for c in out] == [("link", "removed", True)]
    m.apply(Synced(A))
    assert m.namespaces[A].synced and not m.synced


def test_two_names_are_one_namespace() -> None:
    """A second name for the same inode renames rather than duplicates."""
    m = base()
    out = m.apply(NamespaceSeen(A, ("a", "a2")))
    assert kinds(out) == [("namespace", "renamed")]
    assert m.get("a2") is m.get("a")
    m.apply(NamespaceSeen(A, ("a2",)))
    assert m.get("a") is None and m.get("a2") is not None


def test_copy_is_independent() -> None:
    """A copy shares no containers with the model, so readers never see it change."""
    m = base()
    m.apply(LinkNew(A, veth(5, 6, None)))
    c = m.copy()
    m.apply(LinkDel(A, 5))
    assert 5 in c.namespaces[A].links and 5 not in m.namespaces[A].links


# --- property: the model follows a small fake kernel ---------------------------------

NAMESPACES = (HOST, A, B)


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    ops = st.tuples(
        st.sampled_from(["pair", "delete", "move", "gone_and_back"]),
        st.sampled_from(NAMESPACES),
        st.sampled_from(NAMESPACES),
    )
    return draw(st.lists(ops, max_size=30))


class FakeKernel:
    """Just enough of the kernel: per-namespace ifindex counters, veth pairs, nsids."""

    def __init__(self) -> None:
        self.next_index = dict.fromkeys(NAMESPACES, 2)
        self.links: dict[int, dict[int, tuple[int, int]]] = {n: {} for n in NAMESPACES}
        self.nsids: dict[tuple[int, int], int] = {}

    def nsid(self, frm: int, to: int) -> int | None:
        if frm == to:
            return None
        if (frm, to) not in self.nsids:
            # Like the kernel's idr: the lowest free id, so a dead
            # namespace's id is handed to the next one.
            used = {v for (f, _), v in self.nsids.items() if f == frm}
            self.nsids[(frm, to)] = min(set(range(len(used) + 1)) - used)
        return self.nsids[(frm, to)]

    def link(self, ns: int, index: int) -> Link:
        pns, pidx = self.links[ns][index]
        return veth(index, pidx, self.nsid(ns, pns))

    def destroy(self, ns: int) -> list[tuple[int, int]]:
        """Delete namespace ``ns``: its veths die and take their peers elsewhere along.

        Returns the peer ends that die with it, outside ``ns``.
        """
        doomed = [peer for peer in self.links[ns].values() if peer[0] != ns]
        for pns, pidx in doomed:
            del self.links[pns][pidx]
        self.links[ns] = {}
        self.next_index[ns] = 2
        self.nsids = {k: v for k, v in self.nsids.items() if ns not in k}
        return doomed


@settings(max_examples=150, deadline=None)
@given(operations())
@example([("pair", HOST, A), ("pair", A, B), ("gone_and_back", A, A), ("pair", HOST, A)])
def test_model_follows_fake_kernel(ops: list[tuple[str, int, int]]) -> None:
    """Whatever the order of pair/delete/move/namespace-deletion events, the model's pairs and links are exactly the kernel's."""
    k = FakeKernel()
    m = Model()
    for n in NAMESPACES:
        m.apply(NamespaceSeen(n, (str(n),)))
    for op, x, y in ops:
        if op == "pair":
            i, j = k.next_index[x], k.next_index[y] + (1 if x == y else 0)
            k.next_index[x] = i + 1
            k.next_index[y] = max(k.next_index[y], j + 1)
            k.links[x][i] = (y, j)
            k.links[y][j] = (x, i)
            m.apply(LinkNew(x, k.link(x, i)))
            m.apply(LinkNew(y, k.link(y, j)))
        elif op == "delete" and k.links[x]:
            i = min(k.links[x])
            pns, pidx = k.links[x].pop(i)
            del k.links[pns][pidx]
            m.apply(LinkDel(x, i))
            m.apply(LinkDel(pns, pidx))
        elif op == "move" and k.links[x] and x != y:
            i = min(k.links[x])
            pns, pidx = k.links[x].pop(i)
            j = k.next_index[y]
            k.next_index[y] = j + 1
            k.links[y][j] = (pns, pidx)
            k.links[pns][pidx] = (y, j)
            m.apply(LinkDel(x, i, moved=True))
            m.apply(LinkNew(y, k.link(y, j)))
            # The kernel does not announce the other end's new attributes;
            # the daemon re-dumps that namespace's links.
            m.apply(
                Dump(pns, "link", tuple(k.link(pns, p) for p in k.links[pns]), reason="peer_moved")
            )
        elif op == "gone_and_back" and x != HOST:
            # The namespace is deleted (the daemon drops it at once), the
            # kernel then destroys the peers of its veths, and a new
            # namespace appears under the same name (and, here, inode).
            doomed = k.destroy(x)
            out = m.apply(NamespaceGone(x))
            assert x not in m.namespaces
            assert not any(
                isinstance(c, LinkRemoved) and c.reason != "namespace_deleted" for c in out
            )
            for pns, pidx in doomed:
                removed = [c for c in m.apply(LinkDel(pns, pidx)) if isinstance(c, LinkRemoved)]
                assert [c.reason for c in removed] == ["namespace_deleted"]
            assert all(target != x for ns in m.namespaces.values() for target in ns.nsids.values())
            m.apply(NamespaceSeen(x, (str(x),)))
            m.apply(Dump(x, "link", ()))
        # Resolve every nsid the model asks about, as the daemon does.
        for ns in NAMESPACES:
            for (frm, to), nsid in k.nsids.items():
                if frm == ns:
                    m.apply(NsidLearned(frm, nsid, to))
    want = {((x, i), peer) for x in NAMESPACES for i, peer in k.links[x].items()}
    assert set(m.peers.items()) == want
    for a, b in m.peers.items():
        assert m.peers[b] == a
    for n in NAMESPACES:
        assert set(m.namespaces[n].links) == set(k.links[n])
    assert m.veths.doomed == set()


def test_route_dump_limited_to_a_link_leaves_the_others() -> None:
    """A route re-dump through one link replaces only that link's routes of that family."""
    from nswatch.model import Dump

    m = base()
    m.apply(RouteNew(A, Route(254, "inet", "unicast", "198.18.1.0/24", dev=3)))
    m.apply(RouteNew(A, Route(254, "inet", "unicast", "198.18.2.0/24", dev=4)))
    m.apply(RouteNew(A, Route(254, "inet6", "unicast", "2001:db8::/64", dev=3)))
    out = m.apply(Dump(A, "route", (), family="inet", reason="route_followup", dev=3))
    assert [c.route.dst for c in out if isinstance(c, RouteRemoved)] == ["198.18.1.0/24"]
    assert sorted(r.dst for r in m.namespaces[A].routes.values()) == [
        "198.18.2.0/24",
        "2001:db8::/64",
    ]


def test_stats_update_changes_counters_only() -> None:
    """A counter refresh replaces stats on known links and reports no change."""
    from nswatch.model import LinkStats, StatsUpdate

    m = base()
    m.apply(LinkNew(A, Link(index=3, name="e", kind="device")))
    out = m.apply(StatsUpdate(A, ((3, LinkStats(rx_bytes=7)), (9, LinkStats(rx_bytes=1)))))
    assert out == []
    stats = m.namespaces[A].links[3].stats
    assert stats is not None and stats.rx_bytes == 7
    assert 9 not in m.namespaces[A].links
