"""The rtnetlink requests that apply sends, encoded with struct like decode.py's dumps.

pyroute2's request path cost 0.3-1 ms of Python per request plus a new
``IPRoute`` per socket; wiring 1000 namespaces (8-10 requests each) on the
engine's thread that was the largest CPU cost, and every millisecond of it
was taken from the event loop under the GIL. These few fixed messages
need no general encoder. :class:`Channel` sends one request and reads its
answer on a plain socket made inside the right namespace.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from nswatch.decode import (
    IFADDRMSG,
    IFINFOMSG,
    NLATTR,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HDR,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTMSG,
    U32,
    error_code,
    messages,
)

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
IFF_UP = 0x1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_TABLE = 15
RTN_UNICAST = 1
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_TABLE_MAIN = 254
CREATE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
CHANGE = NLM_F_REQUEST | NLM_F_ACK


def _attr(atype: int, payload: bytes) -> bytes:
    raw = NLATTR.pack(4 + len(payload), atype) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _name(atype: int, name: str) -> bytes:
    return _attr(atype, name.encode() + b"\0")


def _u32(atype: int, value: int) -> bytes:
    return _attr(atype, U32.pack(value))


def _message(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    return NLMSG_HDR.pack(16 + len(body), mtype, flags, seq, 0) + body


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


def create_veth(seq: int, name: str, peer: str, peer_fd: int, mtu: int | None) -> bytes:
    """``ip link add NAME [mtu M] type veth peer name PEER [mtu M] netns FD``."""
    mtu_attr = _u32(IFLA_MTU, mtu) if mtu is not None else b""
    peer_info = _ifinfo() + _name(IFLA_IFNAME, peer) + _u32(IFLA_NET_NS_FD, peer_fd) + mtu_attr
    info = _name(IFLA_INFO_KIND, "veth") + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_info))
    body = _ifinfo() + _name(IFLA_IFNAME, name) + mtu_attr + _attr(IFLA_LINKINFO, info)
    return _message(RTM_NEWLINK, CREATE, seq, body)


def create_bridge(seq: int, name: str) -> bytes:
    """``ip link add NAME type bridge``."""
    info = _name(IFLA_INFO_KIND, "bridge")
    body = _ifinfo() + _name(IFLA_IFNAME, name) + _attr(IFLA_LINKINFO, info)
    return _message(RTM_NEWLINK, CREATE, seq, body)


def set_link(
    seq: int, index: int, *, up: bool = False, mtu: int | None = None, master: int | None = None
) -> bytes:
    """``ip link set INDEX [up] [mtu M] [master I]``."""
    body = _ifinfo(index, IFF_UP if up else 0, IFF_UP if up else 0)
    if mtu is not None:
        body += _u32(IFLA_MTU, mtu)
    if master is not None:
        body += _u32(IFLA_MASTER, master)
    return _message(RTM_NEWLINK, CHANGE, seq, body)


def get_link(seq: int, name: str) -> bytes:
    """RTM_GETLINK of one link by name (no dump)."""
    return _message(RTM_GETLINK, CHANGE, seq, _ifinfo() + _name(IFLA_IFNAME, name))


def add_address(seq: int, index: int, address: str) -> bytes:
    """``ip addr add ADDRESS/PREFIX dev INDEX``."""
    iface = ipaddress.ip_interface(address)
    family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
    raw = iface.ip.packed
    body = IFADDRMSG.pack(family, iface.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    body += _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
    return _message(RTM_NEWADDR, CREATE, seq, body)


def add_route(
    seq: int,
    dst: str,
    *,
    gateway: str | None = None,
    oif: int | None = None,
    metric: int | None = None,
    table: int | None = None,
) -> bytes:
    """``ip route add DST [via GW] [dev OIF] [metric M] [table T]``; DST ``default`` or a CIDR."""
    if dst == "default":
        version = ipaddress.ip_address(gateway).version if gateway else 4
        net: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    else:
        net = ipaddress.ip_network(dst, strict=False)
        version = net.version
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    table = RT_TABLE_MAIN if table is None else table
    scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
    body = RTMSG.pack(
        family,
        net.prefixlen if net is not None else 0,
        0,
        0,
        table if table < 256 else 0,
        RTPROT_BOOT,
        scope,
        RTN_UNICAST,
        0,
    )
    if net is not None:
        body += _attr(RTA_DST, net.network_address.packed)
    if gateway:
        body += _attr(RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
    if oif is not None:
        body += _u32(RTA_OIF, oif)
    if metric is not None:
        body += _u32(RTA_PRIORITY, metric)
    body += _u32(RTA_TABLE, table)
    return _message(RTM_NEWROUTE, CREATE, seq, body)


class Channel:
    """One rtnetlink socket (made in the namespace it acts on): a request, then its answer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10.0)
        self.sock.bind((0, 0))
        self._seq = 0

    @staticmethod
    def new_socket() -> socket.socket:
        """A fresh rtnetlink socket in the calling thread's namespace."""
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)

    def next_seq(self) -> int:
        """The sequence number for the next request."""
        self._seq += 1
        return self._seq

    def call(self, request: bytes) -> list[bytes]:
        """Send ``request`` (built with :meth:`next_seq`); the replies' bodies, or OSError."""
        seq = struct.unpack_from("=I", request, 8)[0]
        self.sock.send(request)
        out: list[bytes] = []
        while True:
            for msg in messages(self.sock.recv(1 << 16)):
                if msg.seq != seq:
                    continue
                if msg.type == NLMSG_ERROR:
                    code = -error_code(msg)
                    if code:
                        raise OSError(code, os.strerror(code))
                    return out
                if msg.type == NLMSG_DONE:
                    return out
                out.append(msg.body)

    def link_index(self, name: str) -> int | None:
        """The ifindex of link ``name`` here, or None."""
        try:
            replies = self.call(get_link(self.next_seq(), name))
        except OSError:
            return None
        for body in replies:
            return int(IFINFOMSG.unpack_from(body, 0)[2])
        return None
