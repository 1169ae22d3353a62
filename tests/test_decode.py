"""The fast decoder against pyroute2's: same constants, same answers on live kernel messages."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from nswatch import decode
from nswatch.model import DumpKind
from nswatch.netns import NetnsEnterer
from tests.kernel import Lab, ip


def _index(nla_map: Any) -> dict[str, int]:
    return {entry[0]: i for i, entry in enumerate(nla_map)}


def test_attribute_numbers_match_pyroute2() -> None:
    """Every attribute number the decoder reads is the one pyroute2 (and the kernel) uses."""
    ifla = _index(ifinfmsg.nla_map)
    assert ifla["IFLA_ADDRESS"] == decode.IFLA_ADDRESS
    assert ifla["IFLA_IFNAME"] == decode.IFLA_IFNAME
    assert ifla["IFLA_MTU"] == decode.IFLA_MTU
    assert ifla["IFLA_LINK"] == decode.IFLA_LINK
    assert ifla["IFLA_MASTER"] == decode.IFLA_MASTER
    assert ifla["IFLA_OPERSTATE"] == decode.IFLA_OPERSTATE
    assert ifla["IFLA_LINKINFO"] == decode.IFLA_LINKINFO
    assert ifla["IFLA_STATS64"] == decode.IFLA_STATS64
    assert ifla["IFLA_LINK_NETNSID"] == decode.IFLA_LINK_NETNSID
    assert ifla["IFLA_NEW_NETNSID"] == decode.IFLA_NEW_NETNSID
    ifa = _index(ifaddrmsg.nla_map)
    assert (ifa["IFA_ADDRESS"], ifa["IFA_LOCAL"]) == (decode.IFA_ADDRESS, decode.IFA_LOCAL)
    rta = _index(rtmsg.nla_map)
    for name in ("RTA_DST", "RTA_OIF", "RTA_GATEWAY", "RTA_PRIORITY", "RTA_PREFSRC"):
        assert getattr(decode, name) == rta[name], name
    assert rta["RTA_MULTIPATH"] == decode.RTA_MULTIPATH
    assert rta["RTA_TABLE"] == decode.RTA_TABLE


def test_truncated_datagram_yields_whole_messages_only() -> None:
    """A datagram cut short yields the complete messages before the cut and nothing else."""
    one = decode.dump_request("link", 0, 1)
    two = decode.dump_request("route", 0, 2)
    msgs = list(decode.messages(one + two[:-3]))
    assert [m.seq for m in msgs] == [1]
    assert list(decode.messages(b"\x00" * 7)) == []


def _dump(sock: socket.socket, what: DumpKind) -> Iterator[bytes]:
    sock.send(decode.dump_request(what, 0, 7))
    while True:
        data = sock.recv(1 << 20)
        yield data
        if any(m.type in (decode.NLMSG_DONE, decode.NLMSG_ERROR) for m in decode.messages(data)):
            return


def _pyroute2_link(msg: Any) -> tuple[Any, ...]:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    if kind is None:
        kind = "loopback" if msg["ifi_type"] == decode.ARPHRD_LOOPBACK else "device"
    peer = msg.get_attr("IFLA_LINK") if kind == "veth" else None
    stats = msg.get_attr("IFLA_STATS64")
    return (
        msg["index"],
        msg.get_attr("IFLA_IFNAME"),
        kind,
        msg.get_attr("IFLA_ADDRESS"),
        msg.get_attr("IFLA_MTU"),
        bool(msg["flags"] & 1),
        msg.get_attr("IFLA_OPERSTATE"),
        msg.get_attr("IFLA_MASTER") or None,
        peer or None,
        msg.get_attr("IFLA_LINK_NETNSID") if peer else None,
        stats["rx_bytes"] if stats else None,
        stats["tx_packets"] if stats else None,
    )


@pytest.mark.kernel
def test_decoder_agrees_with_pyroute2_on_live_dumps(lab: Lab) -> None:
    """Links, addresses and routes (multipath, v4/v6, tables, bridges) decode as pyroute2 decodes them."""
    ns = lab.netns("dec")
    for cmd in (
        "link add br0 type bridge",
        "link add v0 type veth peer name v1",
        "link set v0 master br0",
        "link set br0 up",
        "link set v0 up",
        "link set v1 up",
        "link set lo up",
        "addr add 198.18.7.1/24 dev v1",
        "addr add 198.18.8.1 peer 198.18.8.2/32 dev v1",
        "addr add 2001:db8:7::1/64 dev v1 nodad",
        "route add 198.18.20.0/24 via 198.18.7.2 metric 20",
        "route add 198.18.21.0/24 nexthop via 198.18.7.2 weight 2 nexthop via 198.18.7.3",
        "route add 198.18.22.0/24 dev v1 table 1234 proto static",
        "route add blackhole 198.18.23.0/24",
        "route add 2001:db8:99::/64 via 2001:db8:7::2 metric 7",
        "route append 2001:db8:99::/64 via 2001:db8:7::3 metric 7",
    ):
        ip("-n", ns, *cmd.split())
    enterer = NetnsEnterer()
    fd = enterer.open_ns(f"/run/netns/{ns}")
    try:
        sock = enterer.run_in(fd, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
    finally:
        import os

        os.close(fd)
        enterer.close()
    marshal = MarshalRtnl()
    seen = {"link": 0, "address": 0, "route": 0}
    with sock:
        whats: tuple[DumpKind, ...] = ("link", "address", "route")
        for what in whats:
            for data in _dump(sock, what):
                ours = [m for m in decode.messages(data) if m.type > decode.NLMSG_DONE]
                theirs = [m for m in marshal.parse(data) if m["header"]["type"] > 3]
                assert len(ours) == len(theirs)
                for mine, ref in zip(ours, theirs, strict=True):
                    seen[what] += 1
                    if what == "link":
                        link = decode.decode_link(mine)
                        got = (
                            link.index,
                            link.name,
                            link.kind,
                            link.mac,
                            link.mtu,
                            link.admin_up,
                            link.oper_state,
                            link.master,
                            link.peer_index,
                            link.peer_netnsid,
                            link.stats.rx_bytes if link.stats else None,
                            link.stats.tx_packets if link.stats else None,
                        )
                        assert got == _pyroute2_link(ref)
                    elif what == "address":
                        addr = decode.decode_address(mine)
                        assert addr is not None
                        want = ref.get_attr("IFA_LOCAL") or ref.get_attr("IFA_ADDRESS")
                        assert (addr.link, addr.address, addr.prefixlen) == (
                            ref["index"],
                            want,
                            ref["prefixlen"],
                        )
                    else:
                        route = decode.decode_route(mine)
                        if route is None:
                            continue
                        assert route.table == (ref.get_attr("RTA_TABLE") or ref["table"])
                        assert route.gateway == ref.get_attr("RTA_GATEWAY")
                        assert route.dev == ref.get_attr("RTA_OIF")
                        assert route.priority == ref.get_attr("RTA_PRIORITY")
                        assert route.prefsrc == ref.get_attr("RTA_PREFSRC")
                        mp = ref.get_attr("RTA_MULTIPATH") or []
                        assert [(nh.gateway, nh.dev, nh.weight) for nh in route.nexthops] == [
                            (h.get_attr("RTA_GATEWAY"), h["oif"] or None, h["hops"] + 1) for h in mp
                        ]
                        dst = ref.get_attr("RTA_DST")
                        want_dst = "default" if dst is None else f"{dst}/{ref['dst_len']}"
                        assert route.dst == want_dst
    assert seen["link"] >= 4 and seen["address"] >= 4 and seen["route"] >= 10
