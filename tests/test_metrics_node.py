"""node_exporter's series per namespace over hand-built models: meanings, caps, flags, lower devices."""

from __future__ import annotations

import struct

from nswatch import decode
from nswatch.metrics import MetricsSink
from nswatch.model import (
    Address,
    AddressNew,
    Event,
    Link,
    LinkNew,
    LinkStats,
    Model,
    NamespaceSeen,
    Nexthop,
    NsidLearned,
    Route,
    RouteNew,
)
from tests.test_metrics import HOST, NS_A, Key, lab, one, parse, pick

IFF_UP, IFF_BROADCAST, IFF_PROMISC, IFF_ALLMULTI = 0x1, 0x2, 0x100, 0x200
IFF_RUNNING, IFF_MULTICAST, IFF_LOWER_UP = 0x40, 0x1000, 0x10000


def scrape(events: list[Event], max_objects_per_namespace: int = 10_000) -> dict[Key, float]:
    """One text scrape of a model built from ``events``."""
    model = Model()
    for ev in events:
        model.apply(ev)
    sink = MetricsSink(
        view=model.copy, ready=lambda: True, max_objects_per_namespace=max_objects_per_namespace
    )
    return parse(sink.render(None)[0])


def host(*links: Link) -> list[Event]:
    return [NamespaceSeen(HOST, ("host",), is_host=True), *(LinkNew(HOST, ln) for ln in links)]


def test_stats_sum_as_proc_net_dev_does() -> None:
    """drop, frame and carrier add up the kernel's detailed counters as /proc/net/dev (and node_exporter) do."""
    st = LinkStats(*(2**i for i in range(24)))
    s = scrape(host(Link(2, "eth0", "device", stats=st)))

    def v(name: str) -> float:
        return one(s, f"nswatch_network_{name}_total", device="eth0")

    assert v("receive_drop") == st.rx_dropped + st.rx_missed_errors
    assert v("receive_frame") == (
        st.rx_length_errors + st.rx_over_errors + st.rx_crc_errors + st.rx_frame_errors
    )
    assert v("transmit_carrier") == (
        st.tx_aborted_errors + st.tx_carrier_errors + st.tx_heartbeat_errors + st.tx_window_errors
    )
    assert v("receive_fifo") == st.rx_fifo_errors
    assert v("transmit_fifo") == st.tx_fifo_errors
    assert v("receive_multicast") == st.multicast
    assert v("transmit_colls") == st.collisions
    assert v("receive_compressed") == st.rx_compressed
    assert v("transmit_compressed") == st.tx_compressed
    assert v("receive_nohandler") == st.rx_nohandler


def _link_message(stats: bytes, ifi_type: int = 1, flags: int = 0) -> decode.Message:
    """An RTM_NEWLINK for ifindex 5 "e0" carrying ``stats`` as IFLA_STATS64, plus LINKMODE and GROUP."""

    def attr(kind: int, payload: bytes) -> bytes:
        raw = struct.pack("=HH", 4 + len(payload), kind) + payload
        return raw + b"\0" * (-len(raw) % 4)

    body = decode.IFINFOMSG.pack(0, ifi_type, 5, flags, 0)
    body += attr(decode.IFLA_IFNAME, b"e0\0") + attr(decode.IFLA_STATS64, stats)
    body += attr(decode.IFLA_LINKMODE, b"\x01") + attr(decode.IFLA_GROUP, struct.pack("=I", 9))
    header = struct.pack("=IHHII", 16 + len(body), 16, 0, 1, 0)
    return next(decode.messages(header + body))


def test_decoder_reads_the_whole_rtnl_link_stats64() -> None:
    """Every rtnl_link_stats64 field up to rx_nohandler lands in its LinkStats field; a shorter struct leaves the rest 0."""
    values = list(range(1, 26))  # 25 fields: newer kernels append rx_otherhost_dropped
    link = decode.decode_link(_link_message(struct.pack("=25Q", *values), ifi_type=772))
    st = link.stats
    assert st is not None
    assert (st.rx_packets, st.tx_packets, st.rx_bytes, st.tx_bytes) == (1, 2, 3, 4)
    assert (st.multicast, st.collisions, st.rx_length_errors) == (9, 10, 11)
    assert (st.rx_missed_errors, st.tx_aborted_errors, st.tx_window_errors) == (16, 17, 21)
    assert (st.rx_compressed, st.tx_compressed, st.rx_nohandler) == (22, 23, 24)
    assert (link.ifi_type, link.link_mode, link.group) == (772, 1, 9)
    short = decode.decode_link(_link_message(struct.pack("=8Q", *values[:8]))).stats
    assert short is not None
    assert (short.rx_bytes, short.multicast, short.rx_nohandler) == (3, 0, 0)


def test_flags_are_the_devices_own_as_sysfs_shows_them() -> None:
    """nswatch_network_flags drops the bits ifi_flags computes (RUNNING, LOWER_UP) and shows PROMISC and ALLMULTI held by anyone."""
    msg = IFF_UP | IFF_BROADCAST | IFF_MULTICAST | IFF_RUNNING | IFF_LOWER_UP
    s = scrape(
        host(
            Link(2, "eth0", "device", flags=msg, allmulti=0),
            Link(3, "port", "veth", flags=msg, promiscuity=1, allmulti=1),
        )
    )
    assert one(s, "nswatch_network_flags", device="eth0") == IFF_UP | IFF_BROADCAST | IFF_MULTICAST
    assert one(s, "nswatch_network_flags", device="port") == (
        IFF_UP | IFF_BROADCAST | IFF_MULTICAST | IFF_PROMISC | IFF_ALLMULTI
    )


def test_carrier_only_for_devices_that_are_up() -> None:
    """nswatch_network_carrier exists only for an up device (sysfs refuses to read it otherwise); its changes always."""
    s = scrape(
        host(
            Link(2, "up0", "veth", admin_up=True, carrier=False, carrier_changes=4),
            Link(3, "down0", "veth", admin_up=False, carrier=False, carrier_down_count=2),
            Link(4, "up1", "veth", admin_up=True, carrier=True),
        )
    )
    assert one(s, "nswatch_network_carrier", device="up0") == 0
    assert one(s, "nswatch_network_carrier", device="up1") == 1
    assert pick(s, "nswatch_network_carrier", device="down0") == {}
    assert one(s, "nswatch_network_carrier_changes_total", device="up0") == 4
    assert one(s, "nswatch_network_carrier_down_changes_total", device="down0") == 2


def test_iface_link_is_the_peer_or_lower_device_else_itself() -> None:
    """iface_link is a veth's peer ifindex, a macvlan's lower ifindex, or the device's own ifindex."""
    s = scrape(
        host(
            Link(2, "eth0", "device"),
            Link(3, "mv", "macvlan", parent_index=2),
            Link(4, "va", "veth", peer_index=5),
            Link(5, "vb", "veth", peer_index=4),
        )
    )
    assert one(s, "nswatch_network_iface_link", device="eth0") == 2
    assert one(s, "nswatch_network_iface_link", device="mv") == 2
    assert one(s, "nswatch_network_iface_link", device="va") == 5
    assert one(s, "nswatch_network_iface_id", device="va") == 4


def test_parent_info_across_namespaces() -> None:
    """A macvlan in a namespace names its lower device on the host; an unresolved lower device has no series."""
    events = [
        *host(Link(2, "eth0", "device")),
        NamespaceSeen(NS_A, ("nswM-a",)),
        NsidLearned(NS_A, 0, HOST),
        LinkNew(NS_A, Link(3, "mv0", "macvlan", parent_index=2, parent_netnsid=0)),
        LinkNew(NS_A, Link(4, "mv1", "macvlan", parent_index=77, parent_netnsid=0)),
    ]
    s = scrape(events)
    assert pick(s, "nswatch_network_parent_info") == {
        (
            "nswatch_network_parent_info",
            lab(netns="nswM-a", device="mv0", parent_netns="host", parent_device="eth0"),
        ): 1
    }


def test_address_info_flags_scope_and_cap() -> None:
    """address_info carries the kernel's flags and node_exporter's scope; over the cap, flagged addresses stay and the rest are counted."""
    events = [*host(Link(2, "eth0", "device"))]
    events += [AddressNew(HOST, Address(2, "inet", f"198.18.1.{i}", 24)) for i in range(1, 6)]
    events.append(AddressNew(HOST, Address(2, "inet6", "2001:db8::9", 64, flags=("dadfailed",))))
    events.append(AddressNew(HOST, Address(2, "inet6", "fe80::1", 64, "link")))
    full = scrape(events)
    assert one(full, "nswatch_network_address_info", address="fe80::1") == 1
    assert pick(full, "nswatch_network_address_info", address="fe80::1", scope="link-local")
    assert pick(full, "nswatch_network_address_info", address="198.18.1.1", scope="global")
    assert one(full, "nswatch_network_addresses_not_exported", netns="host") == 0
    capped = scrape(events, max_objects_per_namespace=3)
    info = pick(capped, "nswatch_network_address_info")
    assert len(info) == 3
    assert pick(capped, "nswatch_network_address_info", address="2001:db8::9", flags="dadfailed")
    assert one(capped, "nswatch_network_addresses_not_exported", netns="host") == 4
    # The counts per device are never capped.
    assert one(capped, "nswatch_network_addresses", device="eth0", family="inet") == 5


def test_route_info_as_node_exporter_and_cap() -> None:
    """route_info has node_exporter's labels (multipath weights, priority 0, default), unicast only; routes per device count every path, uncapped."""
    events = [*host(Link(2, "eth0", "device"), Link(3, "eth1", "device"))]
    events += [
        RouteNew(HOST, Route(254, "inet", "unicast", "default", gateway="198.18.0.1", dev=2)),
        RouteNew(
            HOST,
            Route(
                254,
                "inet",
                "unicast",
                "198.18.9.0/24",
                priority=5,
                protocol="static",
                nexthops=(Nexthop("198.18.0.1", 2, 2), Nexthop("198.18.1.1", 3, 1, ("linkdown",))),
            ),
        ),
        RouteNew(HOST, Route(254, "inet", "blackhole", "198.18.8.0/24")),
        RouteNew(HOST, Route(255, "inet", "local", "198.18.0.2", dev=2)),
    ]
    s = scrape(events)
    assert set(pick(s, "nswatch_network_route_info")) == {
        (
            "nswatch_network_route_info",
            lab(
                netns="host",
                dest="default",
                gw="198.18.0.1",
                priority="0",
                proto="boot",
                src="",
                weight="",
                device="eth0",
                table="main",
                flags="",
            ),
        ),
        (
            "nswatch_network_route_info",
            lab(
                netns="host",
                dest="198.18.9.0/24",
                gw="198.18.0.1",
                priority="5",
                proto="static",
                src="",
                weight="2",
                device="eth0",
                table="main",
                flags="",
            ),
        ),
        (
            "nswatch_network_route_info",
            lab(
                netns="host",
                dest="198.18.9.0/24",
                gw="198.18.1.1",
                priority="5",
                proto="static",
                src="",
                weight="1",
                device="eth1",
                table="main",
                flags="linkdown",
            ),
        ),
    }
    assert one(s, "nswatch_network_routes", device="eth0") == 2
    assert one(s, "nswatch_network_routes", device="eth1") == 1
    capped = scrape(events, max_objects_per_namespace=1)
    assert len(pick(capped, "nswatch_network_route_info")) == 1
    assert one(capped, "nswatch_network_routes_not_exported", netns="host") == 2
    assert one(capped, "nswatch_network_routes", device="eth0") == 2


def test_default_route_linkdown() -> None:
    """A default route's path that is linkdown is 1 in nswatch_default_route_linkdown, a healthy one 0, whatever the cap."""
    events = [*host(Link(2, "eth0", "device"), Link(3, "eth1", "device"))]
    events += [
        RouteNew(
            HOST,
            Route(
                254, "inet", "unicast", "default", gateway="198.18.0.1", dev=2, flags=("linkdown",)
            ),
        ),
        RouteNew(
            HOST,
            Route(254, "inet6", "unicast", "default", gateway="2001:db8::1", dev=3, priority=1),
        ),
    ]
    s = scrape(events, max_objects_per_namespace=0)
    assert one(s, "nswatch_default_route_linkdown", family="inet", device="eth0") == 1
    assert one(s, "nswatch_default_route_linkdown", family="inet6", device="eth1") == 0
    assert pick(s, "nswatch_network_route_info") == {}
