"""The kernel's quirks: what to ask or re-dump after a batch of changes.

Some kernel state changes without a notification that says so precisely.
:func:`followups` is pure: it looks at one namespace's batch of events, the
changes the model made from them and the model itself, and returns the
actions that bring the model back to the truth. The loop carries them out
(see :mod:`nswatch.sessions`). Every rule below was seen on a real kernel and
has a test.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nswatch.model import (
    AddressRemoved,
    Change,
    DumpKind,
    Event,
    Family,
    Link,
    LinkAdded,
    LinkChanged,
    Model,
    RouteDel,
    RouteNew,
    VethLost,
)

# The notification can reach us while the kernel is still inside the same
# operation, before it flushes the dependent routes; a dump now could still
# see them. Dump a little later, and once more later still in case this
# machine is slow.
ROUTE_FOLLOWUP_DELAYS = (0.02, 0.3)


@dataclass(frozen=True, slots=True)
class RedumpRoutes:
    """Re-dump one family's routes of a namespace after ``delay`` (only through ``dev`` if set)."""

    inode: int
    family: Family
    delay: float
    dev: int | None = None


@dataclass(frozen=True, slots=True)
class Resync:
    """Re-dump these kinds of a namespace now."""

    inode: int
    reason: str
    kinds: tuple[DumpKind, ...]


@dataclass(frozen=True, slots=True)
class AskNsid:
    """Ask namespace ``inode`` which netnsid names namespace ``target`` (RTM_GETNSID)."""

    inode: int
    target: int


@dataclass(frozen=True, slots=True)
class LookInProc:
    """A veth's peer lives in a namespace nobody watched knows: scan /proc for process-held ones."""


Action = RedumpRoutes | Resync | AskNsid | LookInProc


def ipv4_stale_links(changes: Iterable[Change]) -> set[int]:
    """Links whose IPv4 routes the kernel may have dropped without telling.

    IPv4 flushes every route through a link that goes admin-down, and the
    gateway routes that depended on a deleted address, with no RTM_DELROUTE.
    (Routes through a deleted link go with it in the model too; IPv6
    notifies.) Only routes through these links need a re-dump.
    """
    out: set[int] = set()
    for ch in changes:
        match ch:
            # Only admin-down flushes; losing carrier keeps the routes
            # (marked "linkdown"), so an operstate change needs nothing.
            case LinkChanged(old=old, link=new) if old.admin_up and not new.admin_up:
                out.add(new.index)
            case AddressRemoved(address=addr) if addr.family == "inet":
                out.add(addr.link)
    return out


def carrier_changed_links(changes: Iterable[Change]) -> set[int]:
    """Links whose carrier (or operational state) changed.

    The kernel marks every route through such a link "linkdown" (or clears
    the flag), in both families, without a route notification.
    """
    return {
        ch.link.index
        for ch in changes
        if isinstance(ch, LinkChanged)
        and (ch.old.carrier, ch.old.oper_state) != (ch.link.carrier, ch.link.oper_state)
    }


def nsid_questions(changes: Iterable[Change], model: Model) -> list[AskNsid]:
    """The netnsids to ask for so that new veth ends' peers can be placed.

    Only the namespaces that hold a matching end are asked about (see
    :meth:`nswatch.peers.VethPeers.candidates`), never every namespace.
    """
    out: list[AskNsid] = []
    for ch in changes:
        if not isinstance(ch, LinkAdded | LinkChanged):
            continue
        ns = model.namespaces.get(ch.inode)
        if ns is None:
            continue
        link = ch.link
        if model.veths.needs_nsid(ns, link):
            out.extend(AskNsid(ch.inode, t) for t in model.veths.candidates(ch.inode, link))
        elif link.parent_netnsid is not None and link.parent_netnsid not in ns.nsids:
            out.extend(AskNsid(ch.inode, t) for t in parent_candidates(model, ch.inode, link))
    return out


# A lower device's namespace is found by asking its nsid of the namespaces that
# hold a link at its ifindex; more than this many is a sign of a mass of
# equal ifindexes, where the host (the usual case) and a few others must do.
MAX_PARENT_CANDIDATES = 16


def parent_candidates(model: Model, inode: int, link: Link) -> list[int]:
    """Namespaces that may hold ``link``'s lower device: the host first (a pod's
    macvlan on a host link), then any other with a link at that ifindex.

    Nothing points back from a lower device, so unlike a veth peer the
    candidates cannot be narrowed further; macvlans and vxlans are few.
    """
    host = model.host_inode
    found = [host] if host is not None and host != inode else []
    for other, ns in model.namespaces.items():
        if len(found) >= MAX_PARENT_CANDIDATES:
            break
        if other not in (inode, host) and link.parent_index in ns.links:
            found.append(other)
    return found


def _peer_nowhere(ch: Change, model: Model) -> bool:
    """A veth whose peer's netnsid is unknown and no watched namespace could hold the peer.

    Then the peer is in a namespace no file holds (a container, `unshare -n`):
    only /proc can find it.
    """
    if not isinstance(ch, LinkAdded | LinkChanged) or ch.link.kind != "veth":
        return False
    ns = model.namespaces.get(ch.inode)
    return (
        ns is not None
        and model.veths.needs_nsid(ns, ch.link)
        and not model.veths.candidates(ch.inode, ch.link)
    )


def followups(
    inode: int,
    events: Sequence[Event],
    changes: Sequence[Change],
    model: Model,
    *,
    synced: bool,
) -> list[Action]:
    """What to do after namespace ``inode``'s batch: ``events`` read, ``changes`` made.

    ``synced`` is False during the namespace's first dump, which needs no
    follow-up re-dumps (it is the truth of the moment) but does need its
    veth peers placed.
    """
    out: list[Action] = []
    if synced:
        for index in sorted(ipv4_stale_links(changes)):
            out.extend(RedumpRoutes(inode, "inet", d, index) for d in ROUTE_FOLLOWUP_DELAYS)
        for index in sorted(carrier_changed_links(changes)):
            for family in ("inet", "inet6"):
                out.extend(RedumpRoutes(inode, family, d, index) for d in ROUTE_FOLLOWUP_DELAYS)
        # A veth created with its peer in another namespace is announced
        # before the peer is attached (IFLA_LINK 0), and no message follows
        # once it is: only a fresh dump shows the peer.
        if any(
            isinstance(ch, LinkAdded | LinkChanged)
            and not ch.from_dump
            and ch.link.kind == "veth"
            and ch.link.peer_index is None
            for ch in changes
        ):
            out.append(Resync(inode, "veth_incomplete", ("link",)))
        # When a veth end moves to another namespace, the kernel tells nobody
        # about the other end, whose IFLA_LINK_NETNSID (and IFLA_LINK, if the
        # ifindex changed) are now stale: re-dump the other end's links.
        for ch in changes:
            if isinstance(ch, VethLost) and ch.reason == "moved":
                out.append(Resync(ch.pair.b[0], "peer_moved", ("link",)))
        # IPv6 merges gateway routes with equal dst and metric into one
        # multipath route (and splits them on delete) with notifications that
        # do not say so: re-dump IPv6 routes when that may have happened.
        if any(
            isinstance(ev, RouteNew | RouteDel) and model.multipath_candidates(inode, ev.route)
            for ev in events
        ):
            out.append(RedumpRoutes(inode, "inet6", ROUTE_FOLLOWUP_DELAYS[0]))
    out.extend(nsid_questions(changes, model))
    if any(_peer_nowhere(ch, model) for ch in changes):
        out.append(LookInProc())
    # Two rules may ask for the same re-dump; the order stays the kernel's.
    return list(dict.fromkeys(out))
