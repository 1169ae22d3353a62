"""The in-memory model of every watched network namespace.

Pure data and pure functions: events go in (already decoded from netlink or
from the namespace directories), and :meth:`Model.apply` returns the list of
changes it made. Nothing here does I/O, so every rule can be unit-tested with
plain data; sources and sinks import this module, never the reverse.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import ClassVar, Literal, TypeAlias

from nswatch.peers import LinkRef, VethPeers

Family = Literal["inet", "inet6"]

#: Removal reasons for links, as exported in ``nswatch_network_removed_total``.
REMOVAL_REASONS = ("deleted", "namespace_deleted", "moved")
#: The links of a namespace nswatch stopped watching though it still exists
#: (its file went while a process lives in it, or a filter now excludes it)
#: leave the model for this reason: they were not deleted.
UNWATCHED = "unwatched"

#: Why a namespace is no longer watched.
GoneReason = Literal["deleted", "unwatched"]


@dataclass(frozen=True, slots=True)
class LinkStats:
    """Counters from IFLA_STATS64 of the latest link message."""

    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    rx_errors: int = 0
    tx_errors: int = 0
    rx_dropped: int = 0
    tx_dropped: int = 0
    # The rest of struct rtnl_link_stats64, in its order (0 where an older
    # kernel's message is shorter).
    multicast: int = 0
    collisions: int = 0
    rx_length_errors: int = 0
    rx_over_errors: int = 0
    rx_crc_errors: int = 0
    rx_frame_errors: int = 0
    rx_fifo_errors: int = 0
    rx_missed_errors: int = 0
    tx_aborted_errors: int = 0
    tx_carrier_errors: int = 0
    tx_fifo_errors: int = 0
    tx_heartbeat_errors: int = 0
    tx_window_errors: int = 0
    rx_compressed: int = 0
    tx_compressed: int = 0
    rx_nohandler: int = 0


@dataclass(frozen=True, slots=True)
class Link:
    """One network interface as the kernel last described it."""

    index: int
    name: str
    kind: str
    mac: str | None = None
    mtu: int = 0
    # IFF_UP is the administrative state ("ip link set up"); the operational
    # state (IFLA_OPERSTATE) is whether the link can pass traffic. A veth that
    # is admin up with its peer down is UP admin-wise and LOWERLAYERDOWN.
    admin_up: bool = False
    oper_state: str = "UNKNOWN"
    master: int | None = None
    # For veth: IFLA_LINK is the peer's ifindex *in the peer's namespace*, and
    # IFLA_LINK_NETNSID is the peer namespace's id *as seen from this one*
    # (absent when both ends share a namespace).
    peer_index: int | None = None
    peer_netnsid: int | None = None
    stats: LinkStats | None = field(default=None, compare=False)
    # IFLA_CARRIER: whether the lower layer is up (None: the driver does not say).
    carrier: bool | None = None
    # IFLA_CARRIER_CHANGES and its up/down split: counters the kernel only
    # reports along with a link message, which every carrier change sends.
    carrier_changes: int = field(default=0, compare=False)
    carrier_up_count: int = field(default=0, compare=False)
    carrier_down_count: int = field(default=0, compare=False)
    txqlen: int = 0
    # ifi_flags (IFF_UP, IFF_BROADCAST, IFF_PROMISC, IFF_RUNNING, ...), as
    # node_exporter's flags series shows them.
    flags: int = 0
    promiscuity: int = 0
    ifalias: str | None = None
    broadcast: str | None = None
    # For a macvlan, vlan, ipvlan or vxlan: IFLA_LINK is its lower device's
    # ifindex, and IFLA_LINK_NETNSID where that device lives, as for a veth
    # peer; often another namespace (a pod's macvlan on a host link).
    parent_index: int | None = None
    parent_netnsid: int | None = None
    # ifi_type (ARPHRD_*: 1 ether, 772 loopback, ...), IFLA_LINKMODE and
    # IFLA_GROUP, as node_exporter's protocol_type, iface_link_mode and
    # net_dev_group show them. A device's type never changes: not state.
    ifi_type: int = field(default=0, compare=False)
    link_mode: int = 0
    group: int = 0
    # IFLA_ALLMULTI (Linux 6.6; None before): like promiscuity, a count of
    # holders (a bridge holds its ports) that ifi_flags does not show. The
    # kernel only says when it crosses zero, so a reconcile may find it
    # moved: not a change.
    allmulti: int | None = field(default=None, compare=False)


AddressKey: TypeAlias = tuple[int, str, str, int]


@dataclass(frozen=True, slots=True)
class Address:
    """An address on a link (IPv4 or IPv6)."""

    link: int
    family: Family
    address: str
    prefixlen: int
    scope: str = "global"
    # IFA_F_* names as `ip` prints them: tentative, dadfailed, deprecated,
    # permanent (IPv6: not from autoconf), nodad, optimistic, ...
    flags: tuple[str, ...] = ()
    # Seconds left as of the message (None: forever). They count down in the
    # kernel without any message, so they never make an address "changed".
    preferred_lft: int | None = field(default=None, compare=False)
    valid_lft: int | None = field(default=None, compare=False)

    @property
    def key(self) -> AddressKey:
        return (self.link, self.family, self.address, self.prefixlen)


@dataclass(frozen=True, slots=True)
class Nexthop:
    """One path of a multipath route."""

    gateway: str | None
    dev: int | None
    weight: int = 1
    # RTNH_F_* names: dead, onlink, linkdown, ...
    flags: tuple[str, ...] = ()


RouteKey: TypeAlias = tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Route:
    """A route in any table of either family."""

    table: int
    family: Family
    type: str
    dst: str
    gateway: str | None = None
    dev: int | None = None
    protocol: str = "boot"
    scope: str = "universe"
    priority: int | None = None
    prefsrc: str | None = None
    tos: int = 0
    nexthops: tuple[Nexthop, ...] = ()
    # RTNH_F_* of a single-path route: "linkdown" (IPv4 keeps routes through a
    # link without carrier but does not use them), "dead", "onlink".
    flags: tuple[str, ...] = ()

    @property
    def base_key(self) -> tuple[object, ...]:
        """What a replace overwrites: the kernel's (table, dst, tos, metric)."""
        return (self.table, self.family, self.dst, self.tos, self.priority)

    @property
    def key(self) -> RouteKey:
        # The path is part of the identity: IPv4 keeps routes that differ only
        # in their path apart ("ip route append"), and IPv6 keeps one route per
        # device for the same prefix (fe80::/64 on every link). IPv6 gateway
        # routes with equal dst and metric merge into one multipath route;
        # the netlink source re-dumps when that may have happened.
        # Flags are state, not identity: a route turning linkdown is changed.
        paths = tuple((nh.gateway, nh.dev, nh.weight) for nh in self.nexthops)
        return (*self.base_key, self.type, self.gateway, self.dev, paths)

    def uses_link(self, index: int) -> bool:
        """True when the route leaves through link ``index``."""
        return self.dev == index or any(nh.dev == index for nh in self.nexthops)


RuleKey: TypeAlias = tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Rule:
    """A policy routing rule (`ip rule`), of either family."""

    family: Family
    priority: int
    # "lookup" (to a table), "goto", "nop", "blackhole", "unreachable", "prohibit".
    action: str
    table: int = 0
    src: str | None = None
    dst: str | None = None
    iif: str | None = None
    oif: str | None = None
    fwmark: int | None = None
    fwmask: int | None = None
    tos: int = 0
    invert: bool = False
    goto: int | None = None
    suppress_prefixlen: int | None = None
    protocol: str | None = None

    @property
    def key(self) -> RuleKey:
        # The kernel lets two rules differ in any selector, even at one priority.
        return (
            self.family,
            self.priority,
            self.action,
            self.table,
            self.src,
            self.dst,
            self.iif,
            self.oif,
            self.fwmark,
            self.fwmask,
            self.tos,
            self.invert,
            self.goto,
            self.suppress_prefixlen,
        )


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds a namespace: one process living in it, and what its cgroup says it belongs to."""

    pid: int
    comm: str
    unit: str | None = None
    container_id: str | None = None
    pod_uid: str | None = None


@dataclass(slots=True)
class Namespace:
    """One network namespace: its names, inode, links, addresses and routes.

    ``names`` are the files it is mounted on (escaped, see
    :func:`nswatch.naming.escape`) or, for a namespace no file holds, the
    name made from its holder (see :mod:`nswatch.naming`). ``label`` is the
    name it goes by everywhere (the ``netns`` label, the JSON key): unique
    among the watched namespaces, given by the model (see :meth:`Model.apply`).
    """

    inode: int
    names: tuple[str, ...]
    is_host: bool = False
    label: str = ""
    owner: Owner | None = None
    links: dict[int, Link] = field(default_factory=dict)
    addresses: dict[AddressKey, Address] = field(default_factory=dict)
    routes: dict[RouteKey, Route] = field(default_factory=dict)
    rules: dict[RuleKey, Rule] = field(default_factory=dict)
    # ifindex -> keys of the routes through it, so that a link's routes cost
    # their own number, not the table's: a host with 1,000 veths has 3,000
    # routes, and every link going down re-dumps the routes through it.
    # Kept by put_route/drop_route; a key it holds may be gone (checked).
    routes_via: dict[int, set[RouteKey]] = field(default_factory=dict, repr=False)
    # netnsid (as seen from this namespace) -> inode of the namespace it names.
    nsids: dict[int, int] = field(default_factory=dict)
    synced: bool = False

    @property
    def name(self) -> str:
        """The namespace's unique label."""
        return self.label or self.names[0]

    def link_name(self, index: int | None) -> str | None:
        """The name of link ``index`` here, or None."""
        if index is None:
            return None
        link = self.links.get(index)
        return link.name if link is not None else None

    def put_route(self, route: Route) -> None:
        """Add or replace a route, keeping :attr:`routes_via` current."""
        key = route.key
        self.routes[key] = route
        for dev in _route_devs(route):
            self.routes_via.setdefault(dev, set()).add(key)

    def drop_route(self, key: RouteKey) -> Route | None:
        """Remove a route (None if there was none)."""
        route = self.routes.pop(key, None)
        if route is not None:
            for dev in _route_devs(route):
                keys = self.routes_via.get(dev)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self.routes_via[dev]
        return route

    def route_keys_via(self, index: int) -> list[RouteKey]:
        """Keys of the routes that leave through link ``index``."""
        return [k for k in self.routes_via.get(index, ()) if k in self.routes]

    def link_by_name(self, name: str) -> Link | None:
        """The link called ``name`` here, or None."""
        for link in self.links.values():
            if link.name == name:
                return link
        return None


# --- events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NamespaceSeen:
    """A namespace is present under these names (the full set; host included), held by ``owner``."""

    inode: int
    names: tuple[str, ...]
    is_host: bool = False
    owner: Owner | None = None


@dataclass(frozen=True, slots=True)
class NamespaceGone:
    """A namespace is no longer watched: ``deleted``, or still alive but ``unwatched``."""

    inode: int
    reason: GoneReason = "deleted"


@dataclass(frozen=True, slots=True)
class LinkNew:
    """RTM_NEWLINK: a link appeared or changed."""

    inode: int
    link: Link


@dataclass(frozen=True, slots=True)
class LinkDel:
    """RTM_DELLINK. ``moved`` when the kernel said where it went (IFLA_NEW_NETNSID)."""

    inode: int
    index: int
    moved: bool = False


@dataclass(frozen=True, slots=True)
class AddressNew:
    """RTM_NEWADDR."""

    inode: int
    address: Address


@dataclass(frozen=True, slots=True)
class AddressDel:
    """RTM_DELADDR."""

    inode: int
    address: Address


@dataclass(frozen=True, slots=True)
class RouteNew:
    """RTM_NEWROUTE; ``replace`` when NLM_F_REPLACE was set."""

    inode: int
    route: Route
    replace: bool = False


@dataclass(frozen=True, slots=True)
class RouteDel:
    """RTM_DELROUTE."""

    inode: int
    route: Route


@dataclass(frozen=True, slots=True)
class RuleNew:
    """RTM_NEWRULE."""

    inode: int
    rule: Rule


@dataclass(frozen=True, slots=True)
class RuleDel:
    """RTM_DELRULE."""

    inode: int
    rule: Rule


@dataclass(frozen=True, slots=True)
class NsidLearned:
    """The kernel said: in namespace ``inode``, ``nsid`` names namespace ``target``."""

    inode: int
    nsid: int
    target: int


DumpKind = Literal["link", "address", "rule", "route"]


@dataclass(frozen=True, slots=True)
class Dump:
    """A complete dump of one kind (optionally one family) in one namespace.

    Replaces that part of the model; differences are reported as changes with
    ``source="dump"`` so a resync or reconcile can count what was wrong.
    """

    inode: int
    kind: DumpKind
    items: tuple[Link, ...] | tuple[Address, ...] | tuple[Route, ...] | tuple[Rule, ...]
    family: Family | None = None
    # "initial" for a namespace's first sync; otherwise why it was re-dumped
    # ("overrun", "reconcile", "route_followup", ...).
    reason: str = "initial"
    # A route dump limited to the routes through this link.
    dev: int | None = None


@dataclass(frozen=True, slots=True)
class StatsUpdate:
    """Fresh counters for links of one namespace (from a link dump that changes nothing else)."""

    inode: int
    stats: tuple[tuple[int, LinkStats], ...]


@dataclass(frozen=True, slots=True)
class Synced:
    """The namespace's first full dump (links, addresses, routes) is complete."""

    inode: int


Event = (
    NamespaceSeen
    | NamespaceGone
    | LinkNew
    | LinkDel
    | AddressNew
    | AddressDel
    | RouteNew
    | RouteDel
    | RuleNew
    | RuleDel
    | NsidLearned
    | Dump
    | StatsUpdate
    | Synced
)


# --- changes ----------------------------------------------------------------

ChangeKind = Literal["namespace", "link", "address", "route", "rule", "veth_peer"]
ChangeAction = Literal["added", "changed", "removed", "resolved", "lost", "renamed"]


# Each change is its own type so consumers ``match`` on it and get typed
# fields; ``kind`` and ``action`` are class-level tags that name the log event
# (``f"{kind}_{action}"``) for the sinks that treat every change alike.


@dataclass(frozen=True, slots=True)
class NamespaceAdded:
    """A namespace is watched from now on."""

    kind: ClassVar[ChangeKind] = "namespace"
    action: ClassVar[ChangeAction] = "added"
    netns: str
    inode: int
    names: tuple[str, ...]
    from_dump: bool = False


@dataclass(frozen=True, slots=True)
class NamespaceRenamed:
    """A watched namespace's set of names, or its label (``old_netns`` → ``netns``), changed."""

    kind: ClassVar[ChangeKind] = "namespace"
    action: ClassVar[ChangeAction] = "renamed"
    netns: str
    inode: int
    old: tuple[str, ...]
    names: tuple[str, ...]
    from_dump: bool = False
    old_netns: str | None = None


@dataclass(frozen=True, slots=True)
class NamespaceRemoved:
    """A namespace is no longer watched: ``deleted``, or ``unwatched`` (it still exists)."""

    kind: ClassVar[ChangeKind] = "namespace"
    action: ClassVar[ChangeAction] = "removed"
    netns: str
    inode: int
    names: tuple[str, ...]
    from_dump: bool = False
    reason: GoneReason = "deleted"


@dataclass(frozen=True, slots=True)
class LinkAdded:
    """A link appeared."""

    kind: ClassVar[ChangeKind] = "link"
    action: ClassVar[ChangeAction] = "added"
    netns: str
    inode: int
    link: Link
    from_dump: bool = False


@dataclass(frozen=True, slots=True)
class LinkChanged:
    """A link's attributes changed (``old`` → ``link``)."""

    kind: ClassVar[ChangeKind] = "link"
    action: ClassVar[ChangeAction] = "changed"
    netns: str
    inode: int
    old: Link
    link: Link
    from_dump: bool = False


@dataclass(frozen=True, slots=True)
class LinkRemoved:
    """A link is gone; ``reason`` is one of :data:`REMOVAL_REASONS`."""

    kind: ClassVar[ChangeKind] = "link"
    action: ClassVar[ChangeAction] = "removed"
    netns: str
    inode: int
    link: Link
    reason: str
    from_dump: bool = False


@dataclass(frozen=True, slots=True)
class AddressAdded:
    """An address appeared."""

    kind: ClassVar[ChangeKind] = "address"
    action: ClassVar[ChangeAction] = "added"
    netns: str
    inode: int
    address: Address
    from_dump: bool = False


@dataclass(frozen=True, slots=True)
class AddressChanged:
    """An address's attributes changed (``old`` → ``address``)."""

    kind: ClassVar[ChangeKind] = "address"
    action: ClassVar[ChangeAction] = "changed"
    netns: str
    inode: int
    old: Address
    address: Address
    from_dump: bool = False


@dataclass(frozen=True, slots=True)
class AddressRemoved:
    """An address is gone."""

    kind: ClassVar[ChangeKind] = "address"
    action: ClassVar[ChangeAction] = "removed"
    netns: str
    inode: int
    address: Address
    from_dump: bool = False


@dataclass(frozen=True, slots=True)
class RouteAdded:
    """A route appeared."""

    kind: ClassVar[ChangeKind] = "route"
    action: ClassVar[ChangeAction] = "added"
    netns: str
    inode: int
    route: Route
    from_dump: bool = False


@dataclass(frozen=True, slots=True)
class RouteChanged:
    """A route's attributes changed (``old`` → ``route``)."""

    kind: ClassVar[ChangeKind] = "route"
    action: ClassVar[ChangeAction] = "changed"
    netns: str
    inode: int
    old: Route
    route: Route
    from_dump: bool = False


@dataclass(frozen=True, slots=True)
class RouteRemoved:
    """A route is gone."""

    kind: ClassVar[ChangeKind] = "route"
    action: ClassVar[ChangeAction] = "removed"
    netns: str
    inode: int
    route: Route
    from_dump: bool = False


@dataclass(frozen=True, slots=True)
class RuleAdded:
    """A policy routing rule appeared."""

    kind: ClassVar[ChangeKind] = "rule"
    action: ClassVar[ChangeAction] = "added"
    netns: str
    inode: int
    rule: Rule
    from_dump: bool = False


@dataclass(frozen=True, slots=True)
class RuleRemoved:
    """A policy routing rule is gone."""

    kind: ClassVar[ChangeKind] = "rule"
    action: ClassVar[ChangeAction] = "removed"
    netns: str
    inode: int
    rule: Rule
    from_dump: bool = False


@dataclass(frozen=True, slots=True)
class VethResolved:
    """A veth end's peer is known (again, or under a new name)."""

    kind: ClassVar[ChangeKind] = "veth_peer"
    action: ClassVar[ChangeAction] = "resolved"
    netns: str
    inode: int
    pair: VethPair
    from_dump: bool = False


@dataclass(frozen=True, slots=True)
class VethLost:
    """A veth end lost its peer; ``reason`` says why when a link removal caused it."""

    kind: ClassVar[ChangeKind] = "veth_peer"
    action: ClassVar[ChangeAction] = "lost"
    netns: str
    inode: int
    pair: VethPair
    reason: str | None = None
    from_dump: bool = False


Change = (
    NamespaceAdded
    | NamespaceRenamed
    | NamespaceRemoved
    | LinkAdded
    | LinkChanged
    | LinkRemoved
    | AddressAdded
    | AddressChanged
    | AddressRemoved
    | RouteAdded
    | RouteChanged
    | RouteRemoved
    | RuleAdded
    | RuleRemoved
    | VethResolved
    | VethLost
)
"""One thing the model changed, for logs, metrics, the follow-ups and the apply engine."""


@dataclass(frozen=True, slots=True)
class PeerRef:
    """Where a veth end's peer lives."""

    inode: int
    netns: str
    index: int
    name: str


@dataclass(frozen=True, slots=True)
class VethPair:
    """A veth pair as a change reports it: both ends, with the names they had."""

    a: LinkRef
    b: LinkRef
    a_link: str
    b_netns: str
    b_link: str


def _refs_of(link: Link) -> tuple[object, ...]:
    """What of a link other links' JSON may show, or may be found by: name and pointers."""
    return (
        link.name,
        link.kind,
        link.peer_index,
        link.peer_netnsid,
        link.parent_index,
        link.parent_netnsid,
    )


_SYNCED = attrgetter("synced")


def _may_move_refs(event: Event) -> bool:
    """Whether ``event`` may change a link's peer or lower device, or their names.

    Addresses, routes, rules, counters and sync marks never do; a link
    notification is judged by what it changes (see :meth:`Model.apply`).
    """
    match event:
        case NamespaceSeen() | NamespaceGone() | LinkDel() | NsidLearned():
            return True
        case Dump(kind="link"):
            return True
    return False


class Model:
    """All watched namespaces and the veth pairs between them.

    Mutated only through :meth:`apply`; readers on other threads must hold the
    owner's lock or work on a :meth:`copy`.
    """

    def __init__(self) -> None:
        self.namespaces: dict[int, Namespace] = {}
        # Every label and every name of a live namespace -> its inode, and
        # nothing else. A name two namespaces share (one file name in two
        # directories) finds the one whose label it is, else the first seen.
        self.by_name: dict[str, int] = {}
        self.by_label: dict[str, int] = {}
        # name -> the live namespaces having it, in the order they came.
        self._holders: dict[str, list[int]] = {}
        self.veths = VethPeers()
        # Bumped by every event applied: readers' views are made per version.
        self.version = 0
        # Bumped by every event but a counter refresh: what the state and
        # namespace documents show (all but the counters) can have changed.
        # A refresh round brings a thousand StatsUpdates in a second or two
        # every stats_interval; keyed by version, readers of the state made
        # a new 6.7 MB document for each (bench_readers: 1,000 namespaces).
        self.shown_version = 0
        # Bumped by every event that may change what a link shows of links
        # elsewhere (its veth peer's or lower device's namespace and name):
        # a renderer can then reuse a namespace it has not seen change
        # without looking its peers up again.
        self.refs_version = 0
        # How many changes the model has made, ever: the event stream numbers
        # changes 1, 2, 3, ... in the same order, so a view with
        # ``changes_made == n`` is consistent with stream event id n.
        self.changes_made = 0
        # Namespaces mutated since the last :meth:`snapshot`.
        self._dirty: set[int] = set()

    @property
    def peers(self) -> dict[LinkRef, LinkRef]:
        """Resolved veth peers, symmetric: peers[a] == b <=> peers[b] == a (read only)."""
        return self.veths.pairs

    # -- queries --

    def get(self, name: str) -> Namespace | None:
        """The namespace with label or name ``name``, else with inode ``name`` (decimal)."""
        inode = self.by_name.get(name)
        if inode is None and name.isascii() and name.isdigit():
            inode = int(name)
        return self.namespaces.get(inode) if inode is not None else None

    @property
    def synced(self) -> bool:
        """True once every watched namespace had its first full sync."""
        return all(map(_SYNCED, self.namespaces.values()))

    def peer_of(self, inode: int, index: int) -> PeerRef | None:
        """The resolved peer of veth (inode, index), or None."""
        ref = self.peers.get((inode, index))
        if ref is None:
            return None
        ns = self.namespaces[ref[0]]
        return PeerRef(ref[0], ns.name, ref[1], ns.links[ref[1]].name)

    def parent_of(self, inode: int, index: int) -> PeerRef | None:
        """The resolved lower device of link (inode, index) (macvlan, vxlan, ...), or None."""
        ns = self.namespaces.get(inode)
        link = ns.links.get(index) if ns is not None else None
        ref = self.veths.parent(self.namespaces, ns, link) if ns and link else None
        if ref is None:
            return None
        other = self.namespaces[ref[0]]
        return PeerRef(ref[0], other.name, ref[1], other.links[ref[1]].name)

    @property
    def host_inode(self) -> int | None:
        """The host namespace's inode, once seen."""
        return next((i for i, ns in self.namespaces.items() if ns.is_host), None)

    def veth_pairs(self) -> Iterator[tuple[LinkRef, LinkRef]]:
        """Each resolved pair once, ordered (a, b) with a < b."""
        return self.veths.each_pair()

    def copy(self) -> Model:
        """A copy that shares the immutable records but none of the containers."""
        m = Model()
        m.namespaces = {inode: _copy_namespace(ns) for inode, ns in self.namespaces.items()}
        self._copy_indexes(m)
        return m

    def _copy_indexes(self, m: Model, for_readers: bool = False) -> None:
        m.by_name = dict(self.by_name)
        m.by_label = dict(self.by_label)
        # Who holds each name matters only to applying events (which of two
        # namespaces keeps a shared name when one goes): a reader's view,
        # made per model version, goes without.
        if not for_readers:
            m._holders = {k: list(v) for k, v in self._holders.items()}
        m.veths = self.veths.copy(for_readers)
        m.version = self.version
        m.shown_version = self.shown_version
        m.refs_version = self.refs_version
        m.changes_made = self.changes_made

    def snapshot(self, previous: Model | None = None) -> Model:
        """A copy for readers, sharing with ``previous`` every namespace unchanged since.

        Readers on other threads share one snapshot per :attr:`version` and
        must never mutate it; making one costs the namespaces that changed,
        not the whole model. Call it under the owner's lock, always with the
        snapshot it returned last time (the dirty set is relative to that).
        It holds what readers use, not the indexes only applying events needs.
        """
        reuse = previous.namespaces if previous is not None else {}
        m = Model()
        for inode, ns in self.namespaces.items():
            kept = reuse.get(inode)
            m.namespaces[inode] = (
                kept
                if kept is not None and inode not in self._dirty
                else _copy_namespace(ns, index=False)
            )
        self._dirty.clear()
        self._copy_indexes(m, for_readers=True)
        return m

    # -- applying events --

    def apply(self, event: Event) -> list[Change]:
        """Apply one decoded event and return what changed (possibly nothing)."""
        self.version += 1
        if not isinstance(event, StatsUpdate):
            self.shown_version += 1
        self._dirty.add(event.inode)
        out: list[Change] = []
        if _may_move_refs(event):
            self.refs_version += 1
        match event:
            case NamespaceSeen():
                self._namespace_seen(event, out)
            case NamespaceGone():
                self._namespace_gone(event.inode, event.reason, out)
            case LinkNew():
                ns = self.namespaces.get(event.inode)
                if ns is not None:
                    old_link = ns.links.get(event.link.index)
                    if old_link is None or _refs_of(old_link) != _refs_of(event.link):
                        self.refs_version += 1
                    self._link_upsert(ns, event.link, out, from_dump=False)
            case LinkDel():
                ns = self.namespaces.get(event.inode)
                if ns is not None:
                    reason = "moved" if event.moved else "deleted"
                    self._link_remove(ns, event.index, reason, out, from_dump=False)
            case AddressNew():
                ns = self.namespaces.get(event.inode)
                if ns is not None:
                    self._addr_upsert(ns, event.address, out, from_dump=False)
            case AddressDel():
                ns = self.namespaces.get(event.inode)
                if ns is not None:
                    self._addr_remove(ns, event.address.key, out, from_dump=False)
            case RouteNew():
                ns = self.namespaces.get(event.inode)
                if ns is not None:
                    self._route_new(ns, event.route, event.replace, out)
            case RouteDel():
                ns = self.namespaces.get(event.inode)
                if ns is not None:
                    self._route_del(ns, event.route, out)
            case RuleNew():
                ns = self.namespaces.get(event.inode)
                if ns is not None and event.rule.key not in ns.rules:
                    ns.rules[event.rule.key] = event.rule
                    out.append(RuleAdded(ns.name, ns.inode, event.rule))
            case RuleDel():
                ns = self.namespaces.get(event.inode)
                old_rule = ns.rules.pop(event.rule.key, None) if ns is not None else None
                if ns is not None and old_rule is not None:
                    out.append(RuleRemoved(ns.name, ns.inode, old_rule))
            case NsidLearned():
                self._nsid_learned(event, out)
            case Dump():
                ns = self.namespaces.get(event.inode)
                if ns is not None:
                    self._dump(ns, event, out)
            case StatsUpdate():
                ns = self.namespaces.get(event.inode)
                if ns is not None:
                    for index, stats in event.stats:
                        link = ns.links.get(index)
                        if link is not None:
                            ns.links[index] = replace(link, stats=stats)
            case Synced():
                ns = self.namespaces.get(event.inode)
                if ns is not None:
                    ns.synced = True
        self.changes_made += len(out)
        return out

    # -- namespaces --

    def _namespace_seen(self, ev: NamespaceSeen, out: list[Change]) -> None:
        names = tuple(ev.names)
        ns = self.namespaces.get(ev.inode)
        if ns is None:
            ns = Namespace(inode=ev.inode, names=names, is_host=ev.is_host, owner=ev.owner)
            self.namespaces[ev.inode] = ns
            self._label(ns)
            out.append(NamespaceAdded(ns.name, ns.inode, names))
            self._evict(ns, out)
            return
        ns.owner = ev.owner
        if names != ns.names or ev.is_host != ns.is_host:
            old, old_label = ns.names, ns.name
            self._unlabel(ns)
            ns.names, ns.is_host = names, ev.is_host
            self._label(ns)
            moved = old_label if old_label != ns.label else None
            out.append(NamespaceRenamed(ns.name, ns.inode, old, names, old_netns=moved))
            self._evict(ns, out)

    # -- labels: one namespace, one label --
    #
    # The host's label is its own, always. Any other namespace goes by its
    # first name; when another namespace already goes by that, by
    # ``<name>@<inode>`` (inodes are unique). A label, once given, is kept
    # while the name it came from stays among the namespace's names: series
    # and JSON keys do not move because some other namespace came or went.

    def _pick_label(self, ns: Namespace) -> str:
        def free(label: str) -> bool:
            return self.by_label.get(label, ns.inode) == ns.inode

        if ns.is_host:
            return ns.names[0]
        kept = ns.label
        if kept and free(kept) and any(kept in (n, f"{n}@{ns.inode}") for n in ns.names):
            return kept
        label = ns.names[0]
        while not free(label):
            label = f"{label}@{ns.inode}"
        return label

    def _label(self, ns: Namespace) -> None:
        """Give ``ns`` its label and index it under its label and names."""
        ns.label = self._pick_label(ns)
        self.by_label[ns.label] = ns.inode
        for name in ns.names:
            self._holders.setdefault(name, []).append(ns.inode)
        self._reindex((ns.label, *ns.names))

    def _unlabel(self, ns: Namespace) -> None:
        """Drop ``ns`` from the indexes (its ``label`` stays set, for the change it is in)."""
        if self.by_label.get(ns.label) == ns.inode:
            del self.by_label[ns.label]
        for name in ns.names:
            holders = self._holders.get(name)
            if holders is not None and ns.inode in holders:
                holders.remove(ns.inode)
                if not holders:
                    del self._holders[name]
        self._reindex((ns.label, *ns.names))

    def _reindex(self, keys: Iterable[str]) -> None:
        for key in keys:
            inode = self.by_label.get(key)
            if inode is None:
                holders = self._holders.get(key)
                inode = holders[0] if holders else None
            if inode is None:
                self.by_name.pop(key, None)
            else:
                self.by_name[key] = inode

    def _evict(self, host: Namespace, out: list[Change]) -> None:
        """The host took its label: any other namespace that went by it is relabelled."""
        if not host.is_host:
            return
        for ns in self.namespaces.values():
            if ns is not host and ns.label == host.label:
                self._unlabel(ns)
                self._label(ns)
                self._dirty.add(ns.inode)
                out.append(
                    NamespaceRenamed(ns.name, ns.inode, ns.names, ns.names, False, host.label)
                )

    def _namespace_gone(self, inode: int, reason: GoneReason, out: list[Change]) -> None:
        ns = self.namespaces.get(inode)
        if ns is None:
            return
        # A namespace let go of but still alive keeps its links: they are no
        # longer watched, not deleted, and their peers are not doomed.
        why = "namespace_deleted" if reason == "deleted" else UNWATCHED
        for index in list(ns.links):
            self._link_remove(ns, index, why, out, from_dump=False)
        ns.addresses.clear()
        ns.routes.clear()
        ns.routes_via.clear()
        ns.rules.clear()
        del self.namespaces[inode]
        self._unlabel(ns)
        # The dead namespace's nsid is free for reuse in every other namespace.
        for other in self.namespaces.values():
            for nsid in [k for k, v in other.nsids.items() if v == inode]:
                del other.nsids[nsid]
                self._dirty.add(other.inode)
        self.veths.namespace_gone(inode)
        out.append(NamespaceRemoved(ns.name, inode, ns.names, reason=reason))

    # -- links and veth peers --

    def _link_upsert(
        self, ns: Namespace, link: Link, out: list[Change], *, from_dump: bool
    ) -> None:
        old = ns.links.get(link.index)
        ns.links[link.index] = link
        if old is not None:
            self.veths.unindex(ns.inode, old)
        self.veths.index(ns.inode, link)
        if old is None:
            out.append(LinkAdded(ns.name, ns.inode, link, from_dump))
        elif old != link:
            out.append(LinkChanged(ns.name, ns.inode, old, link, from_dump))
        if old is not None and (old.kind, old.peer_index, old.peer_netnsid) != (
            link.kind,
            link.peer_index,
            link.peer_netnsid,
        ):
            self._unpeer(ns.inode, link.index, out, from_dump)
        self._resolve(ns, link, out, from_dump)
        # A rename changes how the peer's end names this one.
        if old is not None and old.name != link.name and (ns.inode, link.index) in self.veths.pairs:
            self._emit_resolved((ns.inode, link.index), out, from_dump)

    def _link_remove(
        self, ns: Namespace, index: int, reason: str, out: list[Change], *, from_dump: bool
    ) -> None:
        link = ns.links.pop(index, None)
        if link is None:
            return
        self.veths.unindex(ns.inode, link)
        ref = (ns.inode, index)
        reason = self.veths.removal_reason(ref, reason)
        partner = self._unpeer(ns.inode, index, out, from_dump, reason=reason, name=link.name)
        if reason == "namespace_deleted" and partner is not None and partner[0] != ns.inode:
            self.veths.doom(partner)
        # The kernel drops the link's addresses and every route through it;
        # IPv4 does not always say so, so the model does it here.
        for key in [k for k, a in ns.addresses.items() if a.link == index]:
            del ns.addresses[key]
        for rkey in ns.route_keys_via(index):
            ns.drop_route(rkey)
        out.append(LinkRemoved(ns.name, ns.inode, link, reason, from_dump))

    def _unpeer(
        self,
        inode: int,
        index: int,
        out: list[Change],
        from_dump: bool,
        reason: str | None = None,
        name: str | None = None,
    ) -> LinkRef | None:
        ref = (inode, index)
        partner = self.veths.unpair(ref)
        if partner is not None:
            ns = self.namespaces[inode]
            out.append(VethLost(ns.name, inode, self._pair(ref, partner, name), reason, from_dump))
        return partner

    def _pair(self, a: LinkRef, b: LinkRef, a_name: str | None = None) -> VethPair:
        ns_a, ns_b = self.namespaces.get(a[0]), self.namespaces.get(b[0])
        link_a = ns_a.links.get(a[1]) if ns_a else None
        link_b = ns_b.links.get(b[1]) if ns_b else None
        return VethPair(
            a,
            b,
            a_name or (link_a.name if link_a else f"if{a[1]}"),
            ns_b.name if ns_b else str(b[0]),
            link_b.name if link_b else f"if{b[1]}",
        )

    def _resolve(self, ns: Namespace, link: Link, out: list[Change], from_dump: bool) -> None:
        cref = self.veths.find(self.namespaces, ns, link)
        if cref is not None:
            self.veths.pair((ns.inode, link.index), cref)
            self._emit_resolved((ns.inode, link.index), out, from_dump)

    def _emit_resolved(self, ref: LinkRef, out: list[Change], from_dump: bool) -> None:
        pair = self._pair(ref, self.veths.pairs[ref])
        out.append(VethResolved(self.namespaces[ref[0]].name, ref[0], pair, from_dump))

    def _nsid_learned(self, ev: NsidLearned, out: list[Change]) -> None:
        ns = self.namespaces.get(ev.inode)
        if ns is None or ev.target not in self.namespaces:
            return
        if ns.nsids.get(ev.nsid) == ev.target:
            return
        stale = ns.nsids.get(ev.nsid)
        ns.nsids[ev.nsid] = ev.target
        for link in list(ns.links.values()):
            if link.peer_netnsid != ev.nsid:
                continue
            ref = (ns.inode, link.index)
            if stale is not None and ref in self.veths.pairs:
                self._unpeer(ns.inode, link.index, out, False)
            self._resolve(ns, link, out, False)

    # -- addresses --

    def _addr_upsert(
        self, ns: Namespace, addr: Address, out: list[Change], *, from_dump: bool
    ) -> None:
        old = ns.addresses.get(addr.key)
        if old == addr:
            return
        ns.addresses[addr.key] = addr
        if old is None:
            out.append(AddressAdded(ns.name, ns.inode, addr, from_dump))
        else:
            out.append(AddressChanged(ns.name, ns.inode, old, addr, from_dump))

    def _addr_remove(
        self, ns: Namespace, key: AddressKey, out: list[Change], *, from_dump: bool
    ) -> None:
        old = ns.addresses.pop(key, None)
        if old is not None:
            out.append(AddressRemoved(ns.name, ns.inode, old, from_dump))

    # -- routes --

    def _route_new(self, ns: Namespace, route: Route, replace: bool, out: list[Change]) -> None:
        if replace:
            for key, old in list(ns.routes.items()):
                if old.base_key == route.base_key and key != route.key:
                    ns.drop_route(key)
                    out.append(RouteRemoved(ns.name, ns.inode, old))
        self._route_upsert(ns, route, out, from_dump=False)

    def _route_upsert(
        self, ns: Namespace, route: Route, out: list[Change], *, from_dump: bool
    ) -> None:
        old = ns.routes.get(route.key)
        if old == route:
            return
        ns.put_route(route)
        if old is None:
            out.append(RouteAdded(ns.name, ns.inode, route, from_dump))
        else:
            out.append(RouteChanged(ns.name, ns.inode, old, route, from_dump))

    def _route_del(self, ns: Namespace, route: Route, out: list[Change]) -> None:
        old = ns.drop_route(route.key)
        if old is not None:
            out.append(RouteRemoved(ns.name, ns.inode, old))

    def multipath_candidates(self, inode: int, route: Route) -> bool:
        """True when ``route`` may have merged into (or split from) an IPv6 multipath route."""
        ns = self.namespaces.get(inode)
        if ns is None or route.family != "inet6" or not (route.gateway or route.nexthops):
            return False
        return any(
            r.base_key == route.base_key and r.key != route.key and (r.gateway or r.nexthops)
            for r in ns.routes.values()
        ) or bool(route.nexthops)

    # -- dumps --

    def _dump(self, ns: Namespace, ev: Dump, out: list[Change]) -> None:
        from_dump = ev.reason != "initial"
        if ev.kind == "link":
            links = {link.index: link for link in ev.items if isinstance(link, Link)}
            for index in [i for i in ns.links if i not in links]:
                self._link_remove(ns, index, "deleted", out, from_dump=from_dump)
            for link in links.values():
                self._link_upsert(ns, link, out, from_dump=from_dump)
        elif ev.kind == "address":
            addrs = {a.key: a for a in ev.items if isinstance(a, Address)}
            for key, old in list(ns.addresses.items()):
                if key not in addrs and (ev.family is None or old.family == ev.family):
                    self._addr_remove(ns, key, out, from_dump=from_dump)
            for addr in addrs.values():
                self._addr_upsert(ns, addr, out, from_dump=from_dump)
        elif ev.kind == "rule":
            rules = {r.key: r for r in ev.items if isinstance(r, Rule)}
            for rule_key, rule in list(ns.rules.items()):
                if rule_key not in rules and (ev.family is None or rule.family == ev.family):
                    del ns.rules[rule_key]
                    out.append(RuleRemoved(ns.name, ns.inode, rule, from_dump))
            for rule_key, rule in rules.items():
                if rule_key not in ns.rules:
                    ns.rules[rule_key] = rule
                    out.append(RuleAdded(ns.name, ns.inode, rule, from_dump))
        else:
            routes = {r.key: r for r in ev.items if isinstance(r, Route)}
            # A dump limited to one link replaces that link's routes only.
            keys = list(ns.routes) if ev.dev is None else ns.route_keys_via(ev.dev)
            for rkey in keys:
                rold = ns.routes[rkey]
                if rkey not in routes and (ev.family is None or rold.family == ev.family):
                    ns.drop_route(rkey)
                    out.append(RouteRemoved(ns.name, ns.inode, rold, from_dump))
            for route in routes.values():
                self._route_upsert(ns, route, out, from_dump=from_dump)


def _route_devs(route: Route) -> set[int]:
    """The links a route leaves through."""
    devs = {nh.dev for nh in route.nexthops if nh.dev is not None}
    if route.dev is not None:
        devs.add(route.dev)
    return devs


def _copy_namespace(ns: Namespace, *, index: bool = True) -> Namespace:
    """A copy sharing the immutable records but none of the containers.

    ``index=False`` leaves out the route index, which only the live model
    (the one events are applied to) needs: readers' snapshots never use it.
    """
    return Namespace(
        inode=ns.inode,
        names=ns.names,
        is_host=ns.is_host,
        label=ns.label,
        owner=ns.owner,
        links=dict(ns.links),
        addresses=dict(ns.addresses),
        routes=dict(ns.routes),
        rules=dict(ns.rules),
        routes_via={k: set(v) for k, v in ns.routes_via.items()} if index else {},
        nsids=dict(ns.nsids),
        synced=ns.synced,
    )


def apply_all(model: Model, events: Iterable[Event]) -> list[Change]:
    """Apply events in order; return every change."""
    out: list[Change] = []
    for ev in events:
        out.extend(model.apply(ev))
    return out
