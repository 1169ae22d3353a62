"""Where veth peers are resolved: which end pairs with which, across namespaces.

Pure data and rules, owned by the model (which calls these as links come and
go) and read by the follow-ups (which ask the kernel for the netnsids still
missing). The kernel's rules this encodes:

- A peer is identified by (namespace inode, ifindex), never by name or
  ifindex alone: ifindexes repeat across namespaces.
- IFLA_LINK is the peer's ifindex *in the peer's namespace*, and
  IFLA_LINK_NETNSID is the peer namespace's id *as seen from the namespace
  that reported the link* (absent when both ends share a namespace). A netnsid
  means nothing until RTM_GETNSID tells which namespace it names, there.
- A pair is only trusted when both ends agree: the candidate must point back
  at this end's ifindex, and (if it knows) at this end's namespace.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from nswatch.model import Link, Namespace

LinkRef: TypeAlias = tuple[int, int]
"""A link's identity: (namespace inode, ifindex). Never the name: names change."""


class VethPeers:
    """The resolved veth pairs, and the index that finds where a peer may live."""

    def __init__(self) -> None:
        # Always symmetric: pairs[a] == b <=> pairs[b] == a.
        self.pairs: dict[LinkRef, LinkRef] = {}
        # Links whose peer lived in a namespace that has since been deleted:
        # the kernel destroys them shortly after, and that removal is a
        # consequence of the namespace deletion, not an outage of its own.
        self.doomed: set[LinkRef] = set()
        # (ifindex, peer ifindex) of every veth end -> namespaces holding one,
        # so finding where a peer may live costs a lookup, not a scan.
        self._ends: dict[tuple[int, int], set[int]] = {}

    def copy(self, for_readers: bool = False) -> VethPeers:
        """A copy sharing nothing mutable; ``for_readers``: without the index of veth ends.

        Readers look pairs up, never for candidates (only applying events
        does): copying the index, a set per veth end, took 7 % of the GIL's
        time under 16 state readers at 1,000 namespaces (py-spy --gil).
        """
        c = VethPeers()
        c.pairs = dict(self.pairs)
        c.doomed = set(self.doomed)
        if not for_readers:
            c._ends = {k: set(v) for k, v in self._ends.items()}
        return c

    # -- the index of veth ends --

    def index(self, inode: int, link: Link) -> None:
        """Remember a veth end so its peer can find it."""
        if link.kind == "veth" and link.peer_index is not None:
            self._ends.setdefault((link.index, link.peer_index), set()).add(inode)

    def unindex(self, inode: int, link: Link) -> None:
        """Forget a veth end (removed, or about to be replaced by a newer message)."""
        if link.kind == "veth" and link.peer_index is not None:
            key = (link.index, link.peer_index)
            holders = self._ends.get(key)
            if holders is not None:
                holders.discard(inode)
                if not holders:
                    del self._ends[key]

    def candidates(self, inode: int, link: Link) -> list[int]:
        """Namespaces that could hold the peer of ``link`` while its netnsid is unknown.

        A candidate holds a veth at the peer's ifindex that points back at
        ``link``'s ifindex. Only these need asking the kernel for their nsid,
        which keeps resolution O(pairs) rather than O(namespaces²).
        """
        if link.peer_index is None or link.peer_netnsid is None:
            return []
        return sorted(i for i in self._ends.get((link.peer_index, link.index), ()) if i != inode)

    # -- resolution --

    @staticmethod
    def target(ns: Namespace, link: Link) -> int | None:
        """The inode of the namespace ``link``'s peer lives in, if known from ``ns``."""
        if link.peer_netnsid is None:
            return ns.inode
        return ns.nsids.get(link.peer_netnsid)

    def find(
        self, namespaces: Mapping[int, Namespace], ns: Namespace, link: Link
    ) -> LinkRef | None:
        """The unpaired end that pairs with ``link`` in ``ns``, when both ends agree."""
        ref = (ns.inode, link.index)
        if link.kind != "veth" or link.peer_index is None or ref in self.pairs:
            return None
        target = self.target(ns, link)
        other = namespaces.get(target) if target is not None else None
        if other is None:
            return None
        cand = other.links.get(link.peer_index)
        if cand is None or cand.kind != "veth" or cand.peer_index != link.index:
            return None
        back = self.target(other, cand)
        if back is not None and back != ns.inode:
            return None
        cref = (other.inode, cand.index)
        return None if cref in self.pairs else cref

    def pair(self, a: LinkRef, b: LinkRef) -> None:
        """Record a and b as each other's peer."""
        self.pairs[a] = b
        self.pairs[b] = a

    def unpair(self, ref: LinkRef) -> LinkRef | None:
        """Forget ``ref``'s pair; return the end it was paired with."""
        partner = self.pairs.pop(ref, None)
        if partner is not None:
            self.pairs.pop(partner, None)
        return partner

    def needs_nsid(self, ns: Namespace, link: Link) -> bool:
        """True when ``link`` is an unpaired veth whose peer's netnsid is not known in ``ns``."""
        return (
            link.kind == "veth"
            and (ns.inode, link.index) not in self.pairs
            and link.peer_netnsid is not None
            and link.peer_netnsid not in ns.nsids
        )

    # -- why a link went --

    def removal_reason(self, ref: LinkRef, reason: str) -> str:
        """The reason a removal counts under: a doomed end died with its peer's namespace."""
        if ref in self.doomed:
            self.doomed.discard(ref)
            if reason == "deleted":
                return "namespace_deleted"
        return reason

    def doom(self, partner: LinkRef) -> None:
        """``partner``'s peer went with its namespace: the kernel is about to destroy it too."""
        self.doomed.add(partner)

    def namespace_gone(self, inode: int) -> None:
        """Forget what was doomed inside a namespace that is gone itself."""
        self.doomed = {ref for ref in self.doomed if ref[0] != inode}

    # -- parents (macvlan, vlan, ipvlan, vxlan on a lower device) --

    @staticmethod
    def parent(namespaces: Mapping[int, Namespace], ns: Namespace, link: Link) -> LinkRef | None:
        """Where ``link``'s lower device is, when the namespace it names is known.

        Unlike a veth pair this is one-way: the lower device does not point
        back, so the ifindex in the target namespace is all there is.
        """
        if link.parent_index is None:
            return None
        target = ns.inode if link.parent_netnsid is None else ns.nsids.get(link.parent_netnsid)
        other = namespaces.get(target) if target is not None else None
        if other is None or link.parent_index not in other.links:
            return None
        return (other.inode, link.parent_index)

    # -- queries --

    def unpaired(self, ns: Namespace) -> Iterator[Link]:
        """Veth ends in ``ns`` whose peer is not resolved."""
        for link in ns.links.values():
            if link.kind == "veth" and (ns.inode, link.index) not in self.pairs:
                yield link

    def each_pair(self) -> Iterator[tuple[LinkRef, LinkRef]]:
        """Each resolved pair once, ordered (a, b) with a < b."""
        for a, b in self.pairs.items():
            if a < b:
                yield a, b
