"""Collectors of the kernel's objects: namespaces, links, veth pairs, addresses, routes, removals.

Series are made at scrape time from the view's model copy, so whatever left
the kernel is gone from the next scrape. Labels follow node_exporter:
``device`` is the link name, ``netns`` the namespace's label (``host``).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterator
from operator import attrgetter

from nswatch.metrics.family import Family, FamilySpec, sanitize
from nswatch.metrics.view import ScrapeView
from nswatch.model import REMOVAL_REASONS, Link, LinkStats
from nswatch.state import table_name

FAMILIES = ("inet", "inet6")
MAIN_TABLE = 254

IFF_PROMISC = 0x100
IFF_ALLMULTI = 0x200
# ifi_flags bits the kernel computes for a message (dev_get_flags) that the
# device's own flags, as sysfs and node_exporter show them, never hold.
IFF_COMPUTED = 0x40 | 0x10000 | 0x20000  # RUNNING, LOWER_UP, DORMANT


def _rx_drop(st: LinkStats) -> int:
    return st.rx_dropped + st.rx_missed_errors


def _rx_frame(st: LinkStats) -> int:
    return st.rx_length_errors + st.rx_over_errors + st.rx_crc_errors + st.rx_frame_errors


def _tx_carrier(st: LinkStats) -> int:
    return (
        st.tx_aborted_errors + st.tx_carrier_errors + st.tx_heartbeat_errors + st.tx_window_errors
    )


# (metric name, what it counts, value from IFLA_STATS64), in node_exporter's
# naming and with /proc/net/dev's sums (what node_exporter's netdev exports).
STAT_COUNTERS: tuple[tuple[str, str, Callable[[LinkStats], int]], ...] = (
    ("nswatch_network_receive_bytes_total", "rx_bytes", attrgetter("rx_bytes")),
    ("nswatch_network_transmit_bytes_total", "tx_bytes", attrgetter("tx_bytes")),
    ("nswatch_network_receive_packets_total", "rx_packets", attrgetter("rx_packets")),
    ("nswatch_network_transmit_packets_total", "tx_packets", attrgetter("tx_packets")),
    ("nswatch_network_receive_errs_total", "rx_errors", attrgetter("rx_errors")),
    ("nswatch_network_transmit_errs_total", "tx_errors", attrgetter("tx_errors")),
    ("nswatch_network_receive_drop_total", "rx_dropped + rx_missed_errors", _rx_drop),
    ("nswatch_network_transmit_drop_total", "tx_dropped", attrgetter("tx_dropped")),
    ("nswatch_network_receive_fifo_total", "rx_fifo_errors", attrgetter("rx_fifo_errors")),
    (
        "nswatch_network_receive_frame_total",
        "rx_length_errors + rx_over_errors + rx_crc_errors + rx_frame_errors",
        _rx_frame,
    ),
    ("nswatch_network_receive_compressed_total", "rx_compressed", attrgetter("rx_compressed")),
    ("nswatch_network_receive_multicast_total", "multicast", attrgetter("multicast")),
    ("nswatch_network_receive_nohandler_total", "rx_nohandler", attrgetter("rx_nohandler")),
    ("nswatch_network_transmit_fifo_total", "tx_fifo_errors", attrgetter("tx_fifo_errors")),
    ("nswatch_network_transmit_colls_total", "collisions", attrgetter("collisions")),
    (
        "nswatch_network_transmit_carrier_total",
        "tx_aborted_errors + tx_carrier_errors + tx_heartbeat_errors + tx_window_errors",
        _tx_carrier,
    ),
    ("nswatch_network_transmit_compressed_total", "tx_compressed", attrgetter("tx_compressed")),
)


def device_flags(link: Link) -> int:
    """The device's own flags (``/sys/class/net/*/flags``) from a message's ifi_flags.

    ifi_flags adds RUNNING, LOWER_UP and DORMANT from the device's state and
    shows PROMISC and ALLMULTI only when a user asked for them; the device's
    flags have them whenever anything (a bridge, a capture) holds them.
    Kernels before 6.6 do not send the ALLMULTI count: the user's bit only.
    """
    flags = link.flags & ~IFF_COMPUTED
    if link.promiscuity:
        flags |= IFF_PROMISC
    if link.allmulti:
        flags |= IFF_ALLMULTI
    return flags


class NamespaceCollector:
    """How many namespaces are watched, and one info series each."""

    COUNT = FamilySpec("nswatch_namespaces", "Network namespaces watched.", "gauge")
    INFO = FamilySpec(
        "nswatch_namespace_info",
        "A watched network namespace: its inode (its identity), and who holds it (a process"
        " inside, and the unit, container or pod its cgroup names) where known.",
        "gauge",
        ("netns", "inode", "pid", "comm", "unit", "container_id", "pod_uid"),
    )
    SYNCED = FamilySpec(
        "nswatch_namespace_synced",
        "1 once nswatch holds a complete read of the namespace (its first full dump is done).",
        "gauge",
        ("netns",),
    )
    specs = (COUNT, INFO, SYNCED)

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        count, info, synced = self.COUNT.family(), self.INFO.family(), self.SYNCED.family()
        count.add((), len(view.namespaces))
        for nv in view.namespaces:
            o = nv.ns.owner
            owner = (
                (str(o.pid), sanitize(o.comm), o.unit or "", o.container_id or "", o.pod_uid or "")
                if o is not None
                else ("", "", "", "", "")
            )
            info.add((nv.netns, str(nv.ns.inode), *owner), 1)
            synced.add((nv.netns,), 1 if nv.ns.synced else 0)
        yield count
        yield info
        yield synced


def _dev_gauge(name: str, doc: str) -> FamilySpec:
    return FamilySpec(name, doc, "gauge", ("netns", "device"))


def _dev_counter(name: str, doc: str) -> FamilySpec:
    return FamilySpec(name, doc, "counter", ("netns", "device"))


class LinkCollector:
    """node_exporter's netdev and netclass series (what rtnetlink gives) for every device."""

    INFO = FamilySpec(
        "nswatch_network_info",
        "Non-numeric data about a network device.",
        "gauge",
        ("netns", "device", "kind", "address", "operstate", "master", "broadcast", "ifalias"),
    )
    UP = FamilySpec(
        "nswatch_network_up",
        "1 when the device's operational state is up.",
        "gauge",
        ("netns", "device", "kind"),
    )
    ADMIN_UP = _dev_gauge(
        "nswatch_network_admin_up", "1 when the device is administratively up (IFF_UP)."
    )
    MTU = _dev_gauge("nswatch_network_mtu_bytes", "The device's MTU.")
    CARRIER = _dev_gauge(
        "nswatch_network_carrier",
        "1 when the device has carrier (IFLA_CARRIER); only for devices that are up, as in sysfs.",
    )
    CARRIER_CHANGES = _dev_counter(
        "nswatch_network_carrier_changes_total", "Carrier changes (IFLA_CARRIER_CHANGES)."
    )
    CARRIER_UP = _dev_counter(
        "nswatch_network_carrier_up_changes_total", "Carrier up changes (IFLA_CARRIER_UP_COUNT)."
    )
    CARRIER_DOWN = _dev_counter(
        "nswatch_network_carrier_down_changes_total",
        "Carrier down changes (IFLA_CARRIER_DOWN_COUNT).",
    )
    TXQLEN = _dev_gauge("nswatch_network_transmit_queue_length", "The device's txqueuelen.")
    FLAGS = _dev_gauge(
        "nswatch_network_flags",
        "The device's flags (IFF_*) as /sys/class/net/*/flags holds them.",
    )
    PROTOCOL = _dev_gauge(
        "nswatch_network_protocol_type", "The device's hardware type (ARPHRD_*, ifi_type)."
    )
    IFACE_ID = _dev_gauge("nswatch_network_iface_id", "The device's ifindex.")
    IFACE_LINK = _dev_gauge(
        "nswatch_network_iface_link",
        "The ifindex of the device's peer or lower device (IFLA_LINK; its own ifindex if none).",
    )
    LINK_MODE = _dev_gauge("nswatch_network_iface_link_mode", "IFLA_LINKMODE.")
    GROUP = _dev_gauge("nswatch_network_net_dev_group", "The device's group (IFLA_GROUP).")
    STATS = tuple(
        (
            FamilySpec(
                name,
                f"Network device statistic {what} (IFLA_STATS64).",
                "counter",
                ("netns", "device"),
            ),
            fn,
        )
        for name, what, fn in STAT_COUNTERS
    )
    specs = (
        INFO,
        UP,
        ADMIN_UP,
        MTU,
        CARRIER,
        CARRIER_CHANGES,
        CARRIER_UP,
        CARRIER_DOWN,
        TXQLEN,
        FLAGS,
        PROTOCOL,
        IFACE_ID,
        IFACE_LINK,
        LINK_MODE,
        GROUP,
        *(spec for spec, _ in STATS),
    )

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        info, up = self.INFO.family(), self.UP.family()
        carrier = self.CARRIER.family()
        # Families keyed (netns, device) with one value per link, in spec order.
        per_link: tuple[tuple[FamilySpec, Callable[[Link], int]], ...] = (
            (self.ADMIN_UP, lambda link: 1 if link.admin_up else 0),
            (self.MTU, attrgetter("mtu")),
            (self.CARRIER_CHANGES, attrgetter("carrier_changes")),
            (self.CARRIER_UP, attrgetter("carrier_up_count")),
            (self.CARRIER_DOWN, attrgetter("carrier_down_count")),
            (self.TXQLEN, attrgetter("txqlen")),
            (self.FLAGS, device_flags),
            (self.PROTOCOL, attrgetter("ifi_type")),
            (self.IFACE_ID, attrgetter("index")),
            (
                self.IFACE_LINK,
                lambda link: link.peer_index or link.parent_index or link.index,
            ),
            (self.LINK_MODE, attrgetter("link_mode")),
            (self.GROUP, attrgetter("group")),
        )
        link_fams = [(spec.family(), fn) for spec, fn in per_link]
        stats = [(spec.family(), fn) for spec, fn in self.STATS]
        # The hot loop of a scrape (~30 rows per link): bound appends.
        link_rows = [(fam.keys.append, fam.values.append, fn) for fam, fn in link_fams]
        stat_rows = [(fam.keys.append, fam.values.append, fn) for fam, fn in stats]
        info_k, info_v = info.keys.append, info.values.append
        up_k, up_v = up.keys.append, up.values.append
        car_k, car_v = carrier.keys.append, carrier.values.append
        for nv in view.namespaces:
            netns = nv.netns
            links = nv.ns.links
            for _, link in nv.links:
                device = link.name
                kind = link.kind
                key = (netns, device)
                master = links.get(link.master) if link.master is not None else None
                oper = link.oper_state.lower()
                info_k(
                    (
                        netns,
                        device,
                        kind,
                        link.mac or "",
                        oper,
                        master.name if master else "",
                        link.broadcast or "",
                        sanitize(link.ifalias) if link.ifalias else "",
                    )
                )
                info_v(1)
                up_k((netns, device, kind))
                up_v(1 if oper == "up" else 0)
                # sysfs refuses to read carrier of a device that is down.
                if link.admin_up and link.carrier is not None:
                    car_k(key)
                    car_v(1 if link.carrier else 0)
                for add_k, add_v, fn in link_rows:
                    add_k(key)
                    add_v(fn(link))
                st = link.stats
                if st is not None:
                    for add_k, add_v, sfn in stat_rows:
                        add_k(key)
                        add_v(sfn(st))
        yield info
        yield up
        yield link_fams[0][0]
        yield link_fams[1][0]
        yield carrier
        yield from (fam for fam, _ in link_fams[2:])
        yield from (fam for fam, _ in stats)


class ParentCollector:
    """The lower device of a macvlan, vxlan, vlan, ... wherever it lives."""

    PARENT = FamilySpec(
        "nswatch_network_parent_info",
        "The lower device of a device (IFLA_LINK of a macvlan, vlan, ipvlan, vxlan, ...),"
        " possibly in another namespace.",
        "gauge",
        ("netns", "device", "parent_netns", "parent_device"),
    )
    specs = (PARENT,)

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        parent = self.PARENT.family()
        model = view.model
        for nv in view.namespaces:
            inode = nv.ns.inode
            for index, link in nv.links:
                if link.parent_index is None:
                    continue
                ref = model.parent_of(inode, index)
                if ref is not None:
                    parent.add((nv.netns, link.name, sanitize(ref.netns), ref.name), 1)
        yield parent


class VethCollector:
    """Which veth end pairs with which, and the ends whose peer is unknown."""

    PEER = FamilySpec(
        "nswatch_veth_peer_info",
        "Which veth end pairs with which (one series for each end); the ifindexes tell a"
        " pair renamed between two scrapes from a new one.",
        "gauge",
        ("netns", "device", "peer_netns", "peer_device", "ifindex", "peer_ifindex"),
    )
    UNPAIRED = FamilySpec(
        "nswatch_veth_unpaired", "Veth ends whose peer is not resolved.", "gauge", ("netns",)
    )
    specs = (PEER, UNPAIRED)

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        peer_info, unpaired = self.PEER.family(), self.UNPAIRED.family()
        peers = view.model.peers
        all_ns = view.model.namespaces
        for nv in view.namespaces:
            inode = nv.ns.inode
            n_unpaired = 0
            for index, link in nv.links:
                if link.kind != "veth":
                    continue
                ref = peers.get((inode, index))
                peer_ns = all_ns.get(ref[0]) if ref is not None else None
                peer = peer_ns.links.get(ref[1]) if (peer_ns is not None and ref) else None
                if peer_ns is None or peer is None:
                    n_unpaired += 1
                else:
                    peer_info.add(
                        (
                            nv.netns,
                            link.name,
                            sanitize(peer_ns.name),
                            peer.name,
                            str(index),
                            str(peer.index),
                        ),
                        1,
                    )
            unpaired.add((nv.netns,), n_unpaired)
        yield peer_info
        yield unpaired


#: Address and route info series per namespace, by default: a host with
#: 100,000 routes must not make a scrape of millions of lines.
MAX_OBJECTS_PER_NAMESPACE = 10_000
# Address flags shown first when a namespace holds more addresses than the cap.
_ALERTING_FLAGS = frozenset(("dadfailed", "tentative", "deprecated"))


@functools.lru_cache(maxsize=1 << 16)
def address_scope(address: str) -> str:
    """The scope node_exporter's address_info shows (Go's net.IP classes, not the kernel's)."""
    ip = ipaddress.ip_address(address)
    if ip.is_loopback or ip.is_link_local:
        return "link-local"
    if ip.is_multicast or ip.is_unspecified:
        return ""
    return "global"


class AddressCollector:
    """Addresses per device and family (0 included), and one info series per address (capped)."""

    COUNT = FamilySpec(
        "nswatch_network_addresses",
        "Addresses on a device, by family.",
        "gauge",
        ("netns", "device", "family"),
    )
    INFO = FamilySpec(
        "nswatch_network_address_info",
        "An address on a device: netmask is its prefix length, scope as node_exporter names it,"
        " flags the kernel's IFA_F_* (tentative, dadfailed, deprecated, permanent, ...).",
        "gauge",
        ("netns", "device", "address", "netmask", "scope", "flags"),
    )
    CAPPED = FamilySpec(
        "nswatch_network_addresses_not_exported",
        "Addresses left out of nswatch_network_address_info: the namespace holds more than"
        " the cap.",
        "gauge",
        ("netns",),
    )
    specs = (COUNT, INFO, CAPPED)

    def __init__(self, max_per_namespace: int = MAX_OBJECTS_PER_NAMESPACE) -> None:
        self.max_per_namespace = max_per_namespace

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        count, info, capped = self.COUNT.family(), self.INFO.family(), self.CAPPED.family()
        add_k, add_v = count.keys.append, count.values.append
        info_k, info_v = info.keys.append, info.values.append
        cap = self.max_per_namespace
        for nv in view.namespaces:
            by_link: dict[tuple[int, str], int] = {}
            addresses = list(nv.ns.addresses.values())
            for a in addresses:
                k = (a.link, a.family)
                by_link[k] = by_link.get(k, 0) + 1
            for index, link in nv.links:
                for fam_name in FAMILIES:
                    add_k((nv.netns, link.name, fam_name))
                    add_v(by_link.get((index, fam_name), 0))
            if len(addresses) > cap:
                # The addresses an alert is about are kept.
                addresses.sort(key=lambda a: _ALERTING_FLAGS.isdisjoint(a.flags))
            links = nv.ns.links
            for a in addresses[:cap]:
                on = links.get(a.link)
                if on is None:
                    continue
                info_k(
                    (
                        nv.netns,
                        on.name,
                        a.address,
                        str(a.prefixlen),
                        address_scope(a.address),
                        ",".join(a.flags),
                    )
                )
                info_v(1)
            capped.add((nv.netns,), max(0, len(addresses) - cap))
        yield count
        yield info
        yield capped


class RouteCollector:
    """Routes by table and family, default routes' paths, and node_exporter's route series."""

    COUNT = FamilySpec(
        "nswatch_routes", "Routes by table and family.", "gauge", ("netns", "table", "family")
    )
    DEFAULT = FamilySpec(
        "nswatch_default_route_info",
        "A default route (one series per path).",
        "gauge",
        ("netns", "family", "table", "gateway", "device"),
    )
    LINKDOWN = FamilySpec(
        "nswatch_default_route_linkdown",
        "1 when a default route's path is linkdown (its device has no carrier: the kernel"
        " keeps the route but IPv4 does not use it).",
        "gauge",
        ("netns", "family", "table", "gateway", "device"),
    )
    INFO = FamilySpec(
        "nswatch_network_route_info",
        "A unicast route's path, as node_exporter's network_route shows it (capped per"
        " namespace), plus its table and RTNH_F_* flags (linkdown, dead, onlink).",
        "gauge",
        ("netns", "dest", "gw", "priority", "proto", "src", "weight", "device", "table", "flags"),
    )
    PER_DEVICE = FamilySpec(
        "nswatch_network_routes",
        "Unicast route paths through a device, as node_exporter's network_routes counts them.",
        "gauge",
        ("netns", "device"),
    )
    CAPPED = FamilySpec(
        "nswatch_network_routes_not_exported",
        "Route paths left out of nswatch_network_route_info: the namespace holds more than"
        " the cap.",
        "gauge",
        ("netns",),
    )
    specs = (COUNT, DEFAULT, LINKDOWN, INFO, PER_DEVICE, CAPPED)

    def __init__(self, max_per_namespace: int = MAX_OBJECTS_PER_NAMESPACE) -> None:
        self.max_per_namespace = max_per_namespace

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        routes, default = self.COUNT.family(), self.DEFAULT.family()
        linkdown, info = self.LINKDOWN.family(), self.INFO.family()
        per_device, capped = self.PER_DEVICE.family(), self.CAPPED.family()
        info_k, info_v = info.keys.append, info.values.append
        cap = self.max_per_namespace
        for nv in view.namespaces:
            links = nv.ns.links
            # The main table of both families always shows.
            count: dict[tuple[int, str], int] = {(MAIN_TABLE, f): 0 for f in FAMILIES}
            defaults: dict[tuple[str, str, str, str], bool] = {}
            devices: dict[str, int] = {}
            n_paths = 0
            for r in nv.ns.routes.values():
                rk = (r.table, r.family)
                count[rk] = count.get(rk, 0) + 1
                if r.type != "unicast":
                    continue
                table = table_name(r.table)
                paths = (
                    [(nh.gateway, nh.dev, str(nh.weight), nh.flags) for nh in r.nexthops]
                    if r.nexthops
                    else [(r.gateway, r.dev, "", r.flags)]
                )
                for gw, dev_index, weight, flags in paths:
                    dev = links.get(dev_index) if dev_index is not None else None
                    device = dev.name if dev else ""
                    devices[device] = devices.get(device, 0) + 1
                    if r.dst == "default":
                        k = (r.family, table, gw or "", device)
                        defaults[k] = defaults.get(k, False) or "linkdown" in flags
                    n_paths += 1
                    if n_paths > cap:
                        continue
                    info_k(
                        (
                            nv.netns,
                            r.dst,
                            gw or "",
                            str(r.priority or 0),
                            r.protocol,
                            r.prefsrc or "",
                            weight,
                            device,
                            table,
                            ",".join(flags),
                        )
                    )
                    info_v(1)
            for (table_no, fam_name), n in sorted(count.items()):
                routes.add((nv.netns, table_name(table_no), fam_name), n)
            for d, down in sorted(defaults.items()):
                default.add((nv.netns, *d), 1)
                linkdown.add((nv.netns, *d), 1 if down else 0)
            for device, n in sorted(devices.items()):
                per_device.add((nv.netns, device), n)
            capped.add((nv.netns,), max(0, n_paths - cap))
        yield routes
        yield default
        yield linkdown
        yield info
        yield per_device
        yield capped


class RuleCollector:
    """Policy routing rules (`ip rule`) per namespace and family."""

    COUNT = FamilySpec(
        "nswatch_rules", "Policy routing rules, by family.", "gauge", ("netns", "family")
    )
    specs = (COUNT,)

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        count = self.COUNT.family()
        for nv in view.namespaces:
            n = dict.fromkeys(FAMILIES, 0)
            for rule in nv.ns.rules.values():
                n[rule.family] += 1
            for fam_name in FAMILIES:
                count.add((nv.netns, fam_name), n[fam_name])
        yield count


class RemovalCollector:
    """Links removed, by kind and reason: counted by the sink, 0 for every kind present now."""

    REMOVED = FamilySpec(
        "nswatch_network_removed_total",
        "Network devices removed, by kind and reason (deleted, namespace_deleted, moved).",
        "counter",
        ("netns", "kind", "reason"),
    )
    specs = (REMOVED,)

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        removed = self.REMOVED.family()
        for nv in view.namespaces:
            counted = view.counters.removed.get(nv.ns.inode, {})
            kinds = {k for k, _ in counted} | {link.kind for _, link in nv.links}
            for kind in sorted(kinds):
                for reason in REMOVAL_REASONS:
                    removed.add((nv.netns, kind, reason), counted.get((kind, reason), 0))
        yield removed
