"""Profile + model -> the steps that would make a namespace match its profile.

Pure: no I/O. The same function answers "what would apply do" (``nswatch
apply --dry-run``), "what is missing" (drift, reported as metrics and logs)
and "what to repair" (``enforce: true``). The kernel is the only state:
a namespace's subnet is found again from the addresses already on its veth,
so restarts and second instances never hand out a subnet twice.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Literal

from nswatch.config import Profile, RouteSpec, render_host_name
from nswatch.model import Address, Link, Model, Namespace
from nswatch.settings import DEFAULTS

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

StepOp = Literal[
    "create_bridge",
    "create_veth",
    "set_mtu",
    "set_master",
    "link_up",
    "add_address",
    "add_route",
    "set_sysctl",
]
DriftKind = Literal["link", "address", "route", "sysctl"]

STEP_KIND: dict[str, DriftKind] = {
    "create_bridge": "link",
    "create_veth": "link",
    "set_mtu": "link",
    "set_master": "link",
    "link_up": "link",
    "add_address": "address",
    "add_route": "route",
    "set_sysctl": "sysctl",
}


@dataclass(frozen=True, slots=True)
class Step:
    """One change, in the namespace ``netns`` (the host's label for the host)."""

    op: StepOp
    netns: str
    link: str = ""
    value: str = ""
    peer: str = ""
    peer_netns: str = ""
    via: str | None = None
    metric: int | None = None
    table: int | None = None

    @property
    def kind(self) -> DriftKind:
        """What sort of object the step creates or fixes."""
        return STEP_KIND[self.op]

    def __str__(self) -> str:
        """The step as the equivalent `ip` / `sysctl` command."""
        if self.op == "create_bridge":
            return f"{self.netns}: ip link add {self.link} type bridge"
        if self.op == "create_veth":
            mtu = f" mtu {self.value}" if self.value else ""
            return (
                f"{self.netns}: ip link add {self.link}{mtu} type veth peer name {self.peer}"
                f"{mtu} netns {self.peer_netns}"
            )
        if self.op == "set_mtu":
            return f"{self.netns}: ip link set {self.link} mtu {self.value}"
        if self.op == "set_master":
            return f"{self.netns}: ip link set {self.link} master {self.value}"
        if self.op == "link_up":
            return f"{self.netns}: ip link set {self.link} up"
        if self.op == "add_address":
            return f"{self.netns}: ip addr add {self.value} dev {self.link}"
        if self.op == "add_route":
            parts = [f"{self.netns}: ip route add {self.value}"]
            if self.via:
                parts.append(f"via {self.via}")
            if self.link:
                parts.append(f"dev {self.link}")
            if self.metric is not None:
                parts.append(f"metric {self.metric}")
            if self.table is not None:
                parts.append(f"table {self.table}")
            return " ".join(parts)
        return f"{self.netns}: sysctl -w {self.link}={self.value}"


@dataclass(frozen=True, slots=True)
class Addressing:
    """The addresses chosen for one namespace's veth."""

    host: Interface | None
    netns: Interface | None
    gateway: str | None


class AllocationError(Exception):
    """The pool or bridge subnet has no free subnet/address left."""


class Blocked(Exception):
    """The veth's names are taken by something that is not (yet known to be) this pair.

    ``pending`` when the model only lags behind the kernel (an end whose
    peer is not resolved yet): wait for the next change, it is not a
    failure. Otherwise an object nswatch must not touch holds the name.
    """

    def __init__(self, reason: str, *, pending: bool) -> None:
        super().__init__(reason)
        self.pending = pending


AddressTriple = tuple[int, str, int]


@dataclass(frozen=True, slots=True)
class _NsIndex:
    links: dict[str, Link]
    addresses: frozenset[AddressTriple]
    by_link: dict[int, tuple[Address, ...]]


class Lookup:
    """Name and address lookups over one immutable model view.

    Made once per view and shared by every plan of a batch, so a plan costs
    its own namespace and the host's few links it names, not a walk over the
    whole model. A namespace's index is kept from ``previous`` when the view
    still holds the very same (unchanged, shared) namespace object: after a
    change only what changed is indexed again. Indexes hold plain tuples and
    the model's own records, so keeping them costs little memory and the
    garbage collector little time.
    """

    def __init__(self, model: Model, host_label: str, previous: Lookup | None = None) -> None:
        self.model = model
        self.host_label = host_label
        self.host = model.get(host_label)
        self._index: dict[int, tuple[Namespace, _NsIndex]] = {}
        self._pools: dict[tuple[int, Network, int], tuple[Namespace, frozenset[Network]]] = {}
        if previous is not None:
            for inode, (ns, index) in previous._index.items():
                if model.namespaces.get(inode) is ns:
                    self._index[inode] = (ns, index)
            for key, (ns, nets) in previous._pools.items():
                if model.namespaces.get(key[0]) is ns:
                    self._pools[key] = (ns, nets)

    def _of(self, ns: Namespace) -> _NsIndex:
        hit = self._index.get(ns.inode)
        if hit is not None and hit[0] is ns:
            return hit[1]
        by_link: dict[int, list[Address]] = {}
        for a in ns.addresses.values():
            by_link.setdefault(a.link, []).append(a)
        index = _NsIndex(
            {link.name: link for link in ns.links.values()},
            frozenset((a.link, a.address, a.prefixlen) for a in ns.addresses.values()),
            {i: tuple(found) for i, found in by_link.items()},
        )
        self._index[ns.inode] = (ns, index)
        return index

    def link(self, ns: Namespace | None, name: str) -> Link | None:
        """The link called ``name`` in ``ns``, or None."""
        return self._of(ns).links.get(name) if ns is not None else None

    def has_address(self, ns: Namespace | None, link: str, iface: Interface) -> bool:
        """Whether ``ns`` has ``iface`` on the link called ``link``."""
        target = self.link(ns, link)
        if ns is None or target is None:
            return False
        return (target.index, str(iface.ip), iface.network.prefixlen) in self._of(ns).addresses

    def addresses_on(self, ns: Namespace | None, link: str) -> list[Interface]:
        """The addresses on the link called ``link`` in ``ns``."""
        target = self.link(ns, link)
        if ns is None or target is None:
            return []
        return [
            ipaddress.ip_interface(f"{a.address}/{a.prefixlen}")
            for a in self._of(ns).by_link.get(target.index, ())
        ]

    def pool_used(self, pool: Network, prefix: int) -> set[Network]:
        """Every /``prefix`` of ``pool`` that an address of a namespace in the view lies in."""
        out: set[Network] = set()
        for ns in self.model.namespaces.values():
            key = (ns.inode, pool, prefix)
            hit = self._pools.get(key)
            if hit is None or hit[0] is not ns:
                nets = frozenset(
                    ipaddress.ip_network(f"{a.address}/{prefix}", strict=False)
                    for a in ns.addresses.values()
                    if (a.family == "inet") == (pool.version == 4)
                    and ipaddress.ip_address(a.address) in pool
                )
                hit = self._pools[key] = (ns, nets)
            out |= hit[1]
        return out

    def everywhere(self) -> Iterable[tuple[Namespace, str, Interface]]:
        """(namespace, link name, address) of every address of every namespace in the view."""
        for ns in self.model.namespaces.values():
            for a in ns.addresses.values():
                yield (
                    ns,
                    ns.link_name(a.link) or "",
                    ipaddress.ip_interface(f"{a.address}/{a.prefixlen}"),
                )


def _start(name: str, count: int) -> int:
    # Start the search at a stable, name-derived offset: two daemons (or a
    # restart) looking for different namespaces rarely probe the same slot.
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % max(count, 1)


def _lookup(model: Model, host_label: str, lookup: Lookup | None) -> Lookup:
    return lookup if lookup is not None and lookup.model is model else Lookup(model, host_label)


def existing_subnet(
    profile: Profile, netns: str, model: Model, host_label: str, lookup: Lookup | None = None
) -> Network | None:
    """The subnet this namespace already uses from the pool, found on its veth ends."""
    veth = profile.veth
    if veth is None or veth.pool is None:
        return None
    look = _lookup(model, host_label, lookup)
    host_name = render_host_name(veth.host_name, netns)
    ends = (
        (look.host, host_name),
        (model.get(netns), veth.netns_name),
    )
    for ns, name in ends:
        for iface in look.addresses_on(ns, name):
            if iface.version == veth.pool.version and iface.ip in veth.pool:
                return iface.network
    return None


def allocate_subnet(
    profile: Profile,
    netns: str,
    model: Model,
    host_label: str,
    reserved: Iterable[Network] = (),
    lookup: Lookup | None = None,
) -> Network:
    """The namespace's subnet: the one it has, else the first free one in the pool.

    Free means no address of any watched namespace lies in it and no other
    allocation in flight (``reserved``) holds it.
    """
    veth = profile.veth
    assert veth is not None and veth.pool is not None and veth.prefix is not None
    look = _lookup(model, host_label, lookup)
    have = existing_subnet(profile, netns, model, host_label, look)
    if have is not None:
        return have
    used = look.pool_used(veth.pool, veth.prefix) | set(reserved)
    return free_subnet(veth.pool, veth.prefix, netns, used)


def free_subnet(pool: Network, prefix: int, netns: str, used: Collection[Network]) -> Network:
    """The first /``prefix`` of ``pool`` not in ``used``, searching from a hash of ``netns``."""
    count = 1 << (prefix - pool.prefixlen)
    start = _start(netns, count)
    step = 1 << (pool.max_prefixlen - prefix)
    base = int(pool.network_address)
    for i in range(count):
        slot = (start + i) % count
        net = ipaddress.ip_network((base + slot * step, prefix))
        if net not in used:
            return net
    raise AllocationError(f"pool {pool} has no free /{prefix} for {netns}")


def allocate_bridge_address(
    profile: Profile,
    netns: str,
    model: Model,
    reserved: Iterable[str] = (),
    lookup: Lookup | None = None,
) -> Interface:
    """The namespace end's address in the bridge subnet: the one it has, else a free one."""
    veth = profile.veth
    assert veth is not None and veth.bridge is not None
    subnet = veth.bridge.address.network
    taken = {str(veth.bridge.address.ip), *reserved}
    look = lookup if lookup is not None and lookup.model is model else Lookup(model, "")
    # Its own address first: judging a set-up namespace costs that namespace only.
    for iface in look.addresses_on(model.get(netns), veth.netns_name):
        if iface.ip in subnet:
            return ipaddress.ip_interface(f"{iface.ip}/{subnet.prefixlen}")
    for ns, link, iface in look.everywhere():
        if iface.ip in subnet:
            if ns.name == netns and link == veth.netns_name:
                return ipaddress.ip_interface(f"{iface.ip}/{subnet.prefixlen}")
            taken.add(str(iface.ip))
    hosts = subnet.num_addresses - 2 if subnet.version == 4 else subnet.num_addresses - 1
    start = _start(netns, hosts)
    for i in range(hosts):
        ip = subnet.network_address + 1 + (start + i) % hosts
        if str(ip) not in taken:
            return ipaddress.ip_interface(f"{ip}/{subnet.prefixlen}")
    raise AllocationError(f"bridge subnet {subnet} is full")


def addressing(
    profile: Profile,
    netns: str,
    model: Model,
    host_label: str,
    reserved: Iterable[Network] = (),
    reserved_ips: Iterable[str] = (),
    lookup: Lookup | None = None,
) -> Addressing:
    """Where the veth ends' addresses and the default gateway come from."""
    veth = profile.veth
    if veth is None:
        return Addressing(None, None, None)
    if veth.bridge is not None:
        ns_if = allocate_bridge_address(profile, netns, model, reserved_ips, lookup)
        return Addressing(None, ns_if, str(veth.bridge.address.ip))
    if veth.pool is None:
        return Addressing(None, None, None)
    return p2p_addressing(allocate_subnet(profile, netns, model, host_label, reserved, lookup))


def p2p_addressing(net: Network) -> Addressing:
    """Point-to-point: the host end takes the subnet's first address, the namespace end the next."""
    first = net.network_address + (0 if net.prefixlen >= net.max_prefixlen - 1 else 1)
    host_if = ipaddress.ip_interface(f"{first}/{net.prefixlen}")
    ns_if = ipaddress.ip_interface(f"{first + 1}/{net.prefixlen}")
    return Addressing(host_if, ns_if, str(host_if.ip))


def _has_route(
    ns: Namespace | None, dst: str, via: str | None, dev: str | None, r: RouteSpec | None
) -> bool:
    if ns is None:
        return False
    table = r.table if r and r.table is not None else 254
    metric = r.metric if r else None
    for route in ns.routes.values():
        if route.table != table or route.dst != dst:
            continue
        if (
            via is not None
            and route.gateway != via
            and all(nh.gateway != via for nh in route.nexthops)
        ):
            continue
        if dev is not None and ns.link_name(route.dev) != dev:
            continue
        if metric is not None and (route.priority or 0) != metric:
            continue
        return True
    return False


def _normal_dst(dst: str) -> str:
    if dst == "default":
        return dst
    return str(ipaddress.ip_network(dst, strict=False))


def _paired(
    model: Model,
    host: Namespace | None,
    ns: Namespace | None,
    ends: tuple[tuple[Link | None, str], tuple[Link | None, str]],
) -> bool:
    """Whether the veth exists (False: neither end does); Blocked when its names are taken.

    Names held by something else are never taken over: nswatch does not
    delete or rewire what it did not make.
    """
    (hlink, hwhat), (nlink, nwhat) = ends
    if hlink is None and nlink is None:
        return False
    if (
        hlink is not None
        and nlink is not None
        and host is not None
        and ns is not None
        and model.peers.get((host.inode, hlink.index)) == (ns.inode, nlink.index)
    ):
        return True
    for owner, link, what in ((host, hlink, hwhat), (ns, nlink, nwhat)):
        if owner is None or link is None:
            continue
        if link.kind != "veth":
            raise Blocked(f"{what} exists and is not a veth", pending=False)
        if (owner.inode, link.index) in model.peers:
            raise Blocked(f"{what} exists and is paired with another link", pending=False)
    # Only veth ends whose peers the model has not placed yet: our own
    # pair (or another nswatch's) still on its way into the model.
    raise Blocked(f"{hwhat} / {nwhat}: veth peers not resolved yet", pending=True)


def plan(
    profile: Profile,
    netns: str,
    model: Model,
    host_label: str = DEFAULTS.host_label,
    addr: Addressing | None = None,
    lookup: Lookup | None = None,
) -> list[Step]:
    """The steps, in order, that bring ``netns`` to what ``profile`` says; [] when it matches.

    sysctls are always listed (the model cannot see them): the applier
    skips the ones already set. Every step is for ``netns`` itself or the
    host (the veth's host end, the bridge). Raises :class:`Blocked` when
    the veth's names are held by objects that are not its ends.
    """
    look = _lookup(model, host_label, lookup)
    ns = model.get(netns)
    host = look.host
    addr = addr or addressing(profile, netns, model, host_label, lookup=look)
    steps: list[Step] = []
    veth = profile.veth
    if veth is not None:
        hname = render_host_name(veth.host_name, netns)
        if veth.bridge is not None:
            br = veth.bridge
            blink = look.link(host, br.name)
            if blink is None:
                steps.append(Step("create_bridge", host_label, br.name))
            elif blink.kind != "bridge":
                raise Blocked(f"host link {br.name} exists and is not a bridge", pending=False)
            if not look.has_address(host, br.name, br.address):
                steps.append(Step("add_address", host_label, br.name, str(br.address)))
            if blink is None or not blink.admin_up:
                steps.append(Step("link_up", host_label, br.name))
        hlink = look.link(host, hname)
        nlink = look.link(ns, veth.netns_name)
        ends = ((hlink, f"host link {hname}"), (nlink, f"{netns} link {veth.netns_name}"))
        if not _paired(model, host, ns, ends):
            mtu = str(veth.mtu) if veth.mtu is not None else ""
            steps.append(
                Step("create_veth", host_label, hname, mtu, peer=veth.netns_name, peer_netns=netns)
            )
        elif veth.mtu is not None:
            if hlink is None or hlink.mtu != veth.mtu:
                steps.append(Step("set_mtu", host_label, hname, str(veth.mtu)))
            if nlink is None or nlink.mtu != veth.mtu:
                steps.append(Step("set_mtu", netns, veth.netns_name, str(veth.mtu)))
        if veth.bridge is not None and (
            hlink is None or host is None or host.link_name(hlink.master) != veth.bridge.name
        ):
            steps.append(Step("set_master", host_label, hname, veth.bridge.name))
        if addr.host is not None and not look.has_address(host, hname, addr.host):
            steps.append(Step("add_address", host_label, hname, str(addr.host)))
        if hlink is None or not hlink.admin_up:
            steps.append(Step("link_up", host_label, hname))
        if addr.netns is not None and not look.has_address(ns, veth.netns_name, addr.netns):
            steps.append(Step("add_address", netns, veth.netns_name, str(addr.netns)))
        if nlink is None or not nlink.admin_up:
            steps.append(Step("link_up", netns, veth.netns_name))
    if profile.loopback:
        lo = look.link(ns, "lo")
        if lo is None or not lo.admin_up:
            steps.append(Step("link_up", netns, "lo"))
    for key, value in profile.sysctls:
        steps.append(Step("set_sysctl", netns, key, str(value)))
    for aspec in profile.addresses:
        if not look.has_address(ns, aspec.dev, aspec.address):
            steps.append(Step("add_address", netns, aspec.dev, str(aspec.address)))
    if veth is not None and veth.default_route and addr.gateway is not None:
        dev = veth.netns_name
        if not _has_route(ns, "default", addr.gateway, dev, None):
            steps.append(Step("add_route", netns, dev, "default", via=addr.gateway))
    for spec in profile.routes:
        via = addr.gateway if spec.via == "host_end" else spec.via
        dst = _normal_dst(spec.dst)
        if not _has_route(ns, dst, via, spec.dev, spec):
            steps.append(
                Step(
                    "add_route",
                    netns,
                    spec.dev or "",
                    dst,
                    via=via,
                    metric=spec.metric,
                    table=spec.table,
                )
            )
    return steps


def drift(steps: Iterable[Step]) -> dict[DriftKind, int]:
    """Missing or wrong objects by kind, counting the steps that would fix them."""
    out: dict[DriftKind, int] = {"link": 0, "address": 0, "route": 0, "sysctl": 0}
    for s in steps:
        out[s.kind] += 1
    return out
