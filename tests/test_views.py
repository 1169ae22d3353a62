"""Readers' views of the model: one shared snapshot per version, copying only what changed."""

from __future__ import annotations

from nswatch.model import (
    Address,
    AddressNew,
    Link,
    LinkNew,
    Model,
    NamespaceGone,
    NamespaceSeen,
    NsidLearned,
)
from nswatch.state import state_json

HOST, A, B = 1, 2, 3


def model() -> Model:
    m = Model()
    m.apply(NamespaceSeen(HOST, ("host",), is_host=True))
    for inode, name in ((A, "a"), (B, "b")):
        m.apply(NamespaceSeen(inode, (name,)))
        m.apply(LinkNew(inode, Link(index=1, name="lo", kind="loopback")))
    return m


def test_snapshot_shares_unchanged_namespaces_and_copies_changed_ones() -> None:
    """A snapshot reuses the previous snapshot's namespace objects except where an event landed."""
    m = model()
    first = m.snapshot()
    m.apply(AddressNew(A, Address(1, "inet", "198.18.0.1", 24)))
    second = m.snapshot(first)
    assert second.namespaces[B] is first.namespaces[B]
    assert second.namespaces[HOST] is first.namespaces[HOST]
    assert second.namespaces[A] is not first.namespaces[A]
    assert len(first.namespaces[A].addresses) == 0, "an old view never changes"
    assert state_json(second) == state_json(m.copy())


def test_snapshot_is_detached_from_the_live_model() -> None:
    """Events applied after a snapshot do not show in it, even in namespaces it shares."""
    m = model()
    snap = m.snapshot()
    m.apply(LinkNew(B, Link(index=2, name="e", kind="device")))
    assert 2 not in snap.namespaces[B].links
    assert state_json(m.snapshot(snap)) == state_json(m.copy())


def test_namespace_deletion_dirties_the_namespaces_that_named_it() -> None:
    """Deleting a namespace frees its nsid in the others: their next snapshot must show that."""
    m = model()
    m.apply(NsidLearned(A, 5, B))
    snap = m.snapshot()
    assert snap.namespaces[A].nsids == {5: B}
    m.apply(NamespaceGone(B))
    after = m.snapshot(snap)
    assert after.namespaces[A].nsids == {}
    assert B not in after.namespaces
    assert after.version == m.version > snap.version


def test_changes_made_counts_every_change_in_order() -> None:
    """The model counts its changes so a view can say which stream event id it is consistent with."""
    m = Model()
    out = m.apply(NamespaceSeen(HOST, ("host",), is_host=True))
    out += m.apply(LinkNew(HOST, Link(index=1, name="lo", kind="loopback")))
    out += m.apply(LinkNew(HOST, Link(index=1, name="lo", kind="loopback")))
    assert m.changes_made == len(out) == 2
    assert m.snapshot().changes_made == 2
    assert state_json(m.snapshot())["event_id"] == 2
