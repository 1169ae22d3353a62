"""Collectors of the kernel's objects: namespaces, links, veth pairs, addresses, routes, removals.

Series are made at scrape time from the view's model copy, so whatever left
the kernel is gone from the next scrape. Labels follow node_exporter:
``device`` is the link name, ``netns`` the namespace's label (``host``).
"""

from __future__ import annotations

from collections.abc import Iterator

from nswatch.metrics.family import Family, FamilySpec, sanitize
from nswatch.metrics.view import ScrapeView
from nswatch.model import REMOVAL_REASONS
from nswatch.state import table_name

FAMILIES = ("inet", "inet6")
MAIN_TABLE = 254

# (metric name, Link.stats attribute), in node_exporter's naming.
STAT_COUNTERS = (
    ("nswatch_network_receive_bytes_total", "rx_bytes"),
    ("nswatch_network_transmit_bytes_total", "tx_bytes"),
    ("nswatch_network_receive_packets_total", "rx_packets"),
    ("nswatch_network_transmit_packets_total", "tx_packets"),
    ("nswatch_network_receive_errs_total", "rx_errors"),
    ("nswatch_network_transmit_errs_total", "tx_errors"),
    ("nswatch_network_receive_drop_total", "rx_dropped"),
    ("nswatch_network_transmit_drop_total", "tx_dropped"),
)


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


class LinkCollector:
    """node_exporter's network device series: info, state, MTU and IFLA_STATS64 counters."""

    INFO = FamilySpec(
        "nswatch_network_info",
        "Non-numeric data about a network device.",
        "gauge",
        ("netns", "device", "kind", "address", "operstate", "master"),
    )
    UP = FamilySpec(
        "nswatch_network_up",
        "1 when the device's operational state is up.",
        "gauge",
        ("netns", "device", "kind"),
    )
    ADMIN_UP = FamilySpec(
        "nswatch_network_admin_up",
        "1 when the device is administratively up (IFF_UP).",
        "gauge",
        ("netns", "device"),
    )
    MTU = FamilySpec("nswatch_network_mtu_bytes", "The device's MTU.", "gauge", ("netns", "device"))
    STATS = tuple(
        (
            FamilySpec(
                name,
                f"Network device statistic {attr} (IFLA_STATS64).",
                "counter",
                ("netns", "device"),
            ),
            attr,
        )
        for name, attr in STAT_COUNTERS
    )
    specs = (INFO, UP, ADMIN_UP, MTU, *(spec for spec, _ in STATS))

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        info, up, admin_up, mtu = (
            s.family() for s in (self.INFO, self.UP, self.ADMIN_UP, self.MTU)
        )
        stats = [(spec.family(), attr) for spec, attr in self.STATS]
        # The hot loop of a scrape (~12 rows per link): bound appends.
        stat_rows = [(fam.keys.append, fam.values.append, attr) for fam, attr in stats]
        info_k, info_v = info.keys.append, info.values.append
        up_k, up_v = up.keys.append, up.values.append
        admin_k, admin_v = admin_up.keys.append, admin_up.values.append
        mtu_k, mtu_v = mtu.keys.append, mtu.values.append
        for nv in view.namespaces:
            netns = nv.netns
            links = nv.ns.links
            for _, link in nv.links:
                device = link.name
                kind = link.kind
                key = (netns, device)
                master = links.get(link.master) if link.master is not None else None
                oper = link.oper_state.lower()
                info_k((netns, device, kind, link.mac or "", oper, master.name if master else ""))
                info_v(1)
                up_k((netns, device, kind))
                up_v(1 if oper == "up" else 0)
                admin_k(key)
                admin_v(1 if link.admin_up else 0)
                mtu_k(key)
                mtu_v(link.mtu)
                st = link.stats
                if st is not None:
                    for add_k, add_v, attr in stat_rows:
                        add_k(key)
                        add_v(getattr(st, attr))
        yield from (info, up, admin_up, mtu)
        yield from (fam for fam, _ in stats)


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


class AddressCollector:
    """Addresses per device and family (0 included: a device that lost its address shows)."""

    COUNT = FamilySpec(
        "nswatch_network_addresses",
        "Addresses on a device, by family.",
        "gauge",
        ("netns", "device", "family"),
    )
    specs = (COUNT,)

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        count = self.COUNT.family()
        add_k, add_v = count.keys.append, count.values.append
        for nv in view.namespaces:
            by_link: dict[tuple[int, str], int] = {}
            for a in nv.ns.addresses.values():
                k = (a.link, a.family)
                by_link[k] = by_link.get(k, 0) + 1
            for index, link in nv.links:
                for fam_name in FAMILIES:
                    add_k((nv.netns, link.name, fam_name))
                    add_v(by_link.get((index, fam_name), 0))
        yield count


class RouteCollector:
    """Routes by table and family, and each path of a default route."""

    COUNT = FamilySpec(
        "nswatch_routes", "Routes by table and family.", "gauge", ("netns", "table", "family")
    )
    DEFAULT = FamilySpec(
        "nswatch_default_route_info",
        "A default route (one series per path).",
        "gauge",
        ("netns", "family", "table", "gateway", "device"),
    )
    specs = (COUNT, DEFAULT)

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        routes, default = self.COUNT.family(), self.DEFAULT.family()
        for nv in view.namespaces:
            links = nv.ns.links
            # The main table of both families always shows.
            count: dict[tuple[int, str], int] = {(MAIN_TABLE, f): 0 for f in FAMILIES}
            defaults: set[tuple[str, str, str, str]] = set()
            for r in nv.ns.routes.values():
                rk = (r.table, r.family)
                count[rk] = count.get(rk, 0) + 1
                if r.dst == "default" and r.type == "unicast":
                    table = table_name(r.table)
                    if r.nexthops:
                        for nh in r.nexthops:
                            dev = links.get(nh.dev) if nh.dev is not None else None
                            defaults.add(
                                (r.family, table, nh.gateway or "", dev.name if dev else "")
                            )
                    else:
                        dev = links.get(r.dev) if r.dev is not None else None
                        defaults.add((r.family, table, r.gateway or "", dev.name if dev else ""))
            for (table_no, fam_name), n in sorted(count.items()):
                routes.add((nv.netns, table_name(table_no), fam_name), n)
            for d in sorted(defaults):
                default.add((nv.netns, *d), 1)
        yield routes
        yield default


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
