"""peers.VethPeers on its own: the index of veth ends, candidates, agreement and removal reasons."""

from __future__ import annotations

from nswatch.model import Link, Namespace
from nswatch.peers import VethPeers

HOST, A, B = 1, 2, 3


def veth(index: int, peer: int | None, nsid: int | None) -> Link:
    return Link(index=index, name=f"v{index}", kind="veth", peer_index=peer, peer_netnsid=nsid)


def ns(inode: int, *links: Link, nsids: dict[int, int] | None = None) -> Namespace:
    return Namespace(
        inode=inode,
        names=(f"n{inode}",),
        links={link.index: link for link in links},
        nsids=dict(nsids or {}),
    )


def indexed(*where: tuple[int, Link]) -> VethPeers:
    p = VethPeers()
    for inode, link in where:
        p.index(inode, link)
    return p


def test_candidates_are_namespaces_with_an_end_pointing_back() -> None:
    """Only namespaces holding a veth at the peer's ifindex whose own peer is this ifindex are candidates."""
    p = indexed(
        (A, veth(2, 10, 0)),
        (B, veth(2, 10, 0)),
        (B, veth(3, 10, 0)),  # wrong ifindex
        (HOST, veth(2, 11, 0)),  # points at another ifindex
    )
    assert p.candidates(HOST, veth(10, 2, 5)) == [A, B]
    # Its own namespace is never a candidate (that needs no nsid).
    assert p.candidates(A, veth(10, 2, 5)) == [B]
    # No netnsid (same namespace) or no peer index: nothing to ask.
    assert p.candidates(HOST, veth(10, 2, None)) == []
    assert p.candidates(HOST, veth(10, None, None)) == []


def test_unindex_forgets_an_end_and_only_veths_are_indexed() -> None:
    """A removed or replaced end is no longer a candidate; non-veth links never are."""
    p = indexed((A, veth(2, 10, 0)), (B, veth(2, 10, 0)))
    p.unindex(A, veth(2, 10, 0))
    assert p.candidates(HOST, veth(10, 2, 5)) == [B]
    p.unindex(B, veth(2, 10, 0))
    p.unindex(B, veth(2, 10, 0))  # twice is harmless
    assert p.candidates(HOST, veth(10, 2, 5)) == []
    p.index(A, Link(index=2, name="d", kind="device", peer_index=10))
    assert p.candidates(HOST, veth(10, 2, 5)) == []


def test_target_reads_the_netnsid_in_the_reporting_namespace() -> None:
    """No netnsid means the same namespace; a netnsid means only what this namespace maps it to."""
    host = ns(HOST, nsids={5: A})
    assert VethPeers.target(host, veth(10, 2, None)) == HOST
    assert VethPeers.target(host, veth(10, 2, 5)) == A
    assert VethPeers.target(host, veth(10, 2, 6)) is None


def test_find_pairs_ends_that_agree() -> None:
    """An end pairs with the link at its peer ifindex in its target namespace when that link points back."""
    host = ns(HOST, veth(10, 2, 5), nsids={5: A})
    a = ns(A, veth(2, 10, 0), nsids={0: HOST})
    spaces = {HOST: host, A: a}
    p = VethPeers()
    assert p.find(spaces, host, host.links[10]) == (A, 2)
    assert p.find(spaces, a, a.links[2]) == (HOST, 10)


def test_find_trusts_the_side_that_knows() -> None:
    """When the candidate's netnsid is still unknown, this side's knowledge suffices."""
    host = ns(HOST, veth(10, 2, 5), nsids={5: A})
    a = ns(A, veth(2, 10, 0))
    assert VethPeers().find({HOST: host, A: a}, host, host.links[10]) == (A, 2)
    # ... but not the other way round: A cannot say where netnsid 0 points.
    assert VethPeers().find({HOST: host, A: a}, a, a.links[2]) is None


def test_find_refuses_ends_that_disagree() -> None:
    """A candidate pointing at another ifindex, or back at another namespace, is not the peer."""
    host = ns(HOST, veth(10, 2, 5), nsids={5: A})
    other_index = ns(A, veth(2, 11, 0), nsids={0: HOST})
    assert VethPeers().find({HOST: host, A: other_index}, host, host.links[10]) is None
    other_ns = ns(A, veth(2, 10, 0), nsids={0: B})
    assert VethPeers().find({HOST: host, A: other_ns, B: ns(B)}, host, host.links[10]) is None
    not_veth = ns(A, Link(index=2, name="d", kind="device"), nsids={0: HOST})
    assert VethPeers().find({HOST: host, A: not_veth}, host, host.links[10]) is None
    missing = ns(A, nsids={0: HOST})
    assert VethPeers().find({HOST: host, A: missing}, host, host.links[10]) is None
    # The target namespace is not watched.
    assert VethPeers().find({HOST: host}, host, host.links[10]) is None


def test_find_skips_ends_already_paired() -> None:
    """An end, or a candidate, that is already paired is never paired twice."""
    a = ns(A, veth(5, 6, None), veth(6, 5, None))
    p = VethPeers()
    assert p.find({A: a}, a, a.links[5]) == (A, 6)
    p.pair((A, 5), (A, 6))
    assert p.find({A: a}, a, a.links[5]) is None
    assert p.find({A: a}, a, a.links[6]) is None


def test_pair_and_unpair_stay_symmetric() -> None:
    """pair() records both directions; unpair() from either end forgets both and names the partner."""
    p = VethPeers()
    p.pair((HOST, 10), (A, 2))
    assert p.pairs == {(HOST, 10): (A, 2), (A, 2): (HOST, 10)}
    assert list(p.each_pair()) == [((HOST, 10), (A, 2))]
    assert p.unpair((A, 2)) == (HOST, 10)
    assert p.pairs == {}
    assert p.unpair((A, 2)) is None


def test_needs_nsid_only_for_unpaired_veths_with_an_unknown_netnsid() -> None:
    """A veth needs an nsid question only while unpaired and its netnsid is unmapped here."""
    host = ns(HOST, nsids={5: A})
    p = VethPeers()
    assert p.needs_nsid(host, veth(10, 2, 6))
    assert not p.needs_nsid(host, veth(10, 2, 5))  # known
    assert not p.needs_nsid(host, veth(10, 2, None))  # same namespace
    assert not p.needs_nsid(host, Link(index=3, name="d", kind="device", peer_netnsid=6))
    p.pair((HOST, 10), (B, 2))
    assert not p.needs_nsid(host, veth(10, 2, 6))


def test_doomed_end_counts_as_namespace_deleted_once() -> None:
    """An end whose peer's namespace went is removed as namespace_deleted, once; a move stays a move."""
    p = VethPeers()
    p.doom((HOST, 10))
    p.doom((HOST, 11))
    assert p.removal_reason((HOST, 10), "deleted") == "namespace_deleted"
    assert p.removal_reason((HOST, 10), "deleted") == "deleted"
    assert p.removal_reason((HOST, 11), "moved") == "moved"
    assert p.doomed == set()


def test_namespace_gone_forgets_what_was_doomed_inside_it() -> None:
    """Ends doomed inside a namespace that is gone itself are forgotten, others kept."""
    p = VethPeers()
    p.doom((A, 2))
    p.doom((HOST, 10))
    p.namespace_gone(A)
    assert p.doomed == {(HOST, 10)}


def test_unpaired_lists_veths_without_a_resolved_peer() -> None:
    """unpaired() yields the namespace's veths that have no pair, and nothing else."""
    a = ns(A, veth(5, 6, None), veth(6, 5, None), veth(7, 9, 0), Link(1, "lo", "loopback"))
    p = VethPeers()
    p.pair((A, 5), (A, 6))
    assert [link.index for link in p.unpaired(a)] == [7]


def test_copy_shares_nothing_mutable() -> None:
    """A copy's pairs, doomed set and end index change independently of the original."""
    p = indexed((A, veth(2, 10, 0)))
    p.pair((HOST, 10), (A, 2))
    p.doom((HOST, 11))
    c = p.copy()
    p.unpair((HOST, 10))
    p.unindex(A, veth(2, 10, 0))
    p.removal_reason((HOST, 11), "deleted")
    assert c.pairs == {(HOST, 10): (A, 2), (A, 2): (HOST, 10)}
    assert c.doomed == {(HOST, 11)}
    assert c.candidates(HOST, veth(10, 2, 5)) == [A]
    c.index(B, veth(2, 10, 0))
    assert p.candidates(HOST, veth(10, 2, 5)) == []
