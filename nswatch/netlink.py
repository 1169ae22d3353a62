"""rtnetlink: one socket per namespace, dump + subscribe, decoding, resync.

Fetch is kept apart from parse: :class:`Session` reads bytes from a socket and
lets pyroute2's marshal split them into messages; the pure ``decode_*``
functions turn those into model events. Sockets are plain ``socket.socket``
objects created inside the namespace by :class:`nswatch.netns.NetnsEnterer`,
so no helper process is forked per namespace.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETNSID,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNSID,
    RTM_NEWROUTE,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.nsidmsg import nsidmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from nswatch.model import (
    Address,
    AddressDel,
    AddressNew,
    Change,
    Dump,
    DumpKind,
    Event,
    Family,
    Link,
    LinkDel,
    LinkNew,
    LinkStats,
    Nexthop,
    NsidLearned,
    Route,
    RouteDel,
    RouteNew,
    Synced,
)

GROUPS = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
)
NETLINK_GET_STRICT_CHK = 12
NLM_F_DUMP_INTR = 0x10
NLM_F_REPLACE = 0x100
RTM_F_CLONED = 0x200
IFF_UP = 0x1
ARPHRD_LOOPBACK = 772
AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6
AF_BRIDGE = socket.AF_BRIDGE

FAMILIES: dict[int, Family] = {AF_INET: "inet", AF_INET6: "inet6"}
FAMILY_NUMBERS: dict[str, int] = {"inet": AF_INET, "inet6": AF_INET6}
ROUTE_TYPES = {
    0: "unspec",
    1: "unicast",
    2: "local",
    3: "broadcast",
    4: "anycast",
    5: "multicast",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
    9: "throw",
    10: "nat",
    11: "xresolve",
}
# iproute2's /etc/iproute2/rt_protos names; others stay numbers, as `ip` shows them.
PROTOCOLS = {
    0: "unspec",
    1: "redirect",
    2: "kernel",
    3: "boot",
    4: "static",
    8: "gated",
    9: "ra",
    10: "mrt",
    11: "zebra",
    12: "bird",
    13: "dnrouted",
    14: "xorp",
    15: "ntk",
    16: "dhcp",
    17: "mrouted",
    18: "keepalived",
    42: "babel",
    99: "openr",
    186: "bgp",
    187: "isis",
    188: "ospf",
    189: "rip",
    192: "eigrp",
}
# iproute2 calls scope 0 "global" for both addresses and routes.
SCOPES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}


# --- decoding (pure) ----------------------------------------------------------


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def decode_link(msg: Any) -> Link:
    """An RTM_NEWLINK/RTM_DELLINK message as a model Link."""
    info = _attr(msg, "IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    if kind is None:
        kind = "loopback" if msg["ifi_type"] == ARPHRD_LOOPBACK else "device"
    stats = _attr(msg, "IFLA_STATS64")
    peer_index = _attr(msg, "IFLA_LINK") if kind == "veth" else None
    return Link(
        index=msg["index"],
        name=_attr(msg, "IFLA_IFNAME") or f"if{msg['index']}",
        kind=kind,
        mac=_attr(msg, "IFLA_ADDRESS"),
        mtu=_attr(msg, "IFLA_MTU") or 0,
        admin_up=bool(msg["flags"] & IFF_UP),
        oper_state=_attr(msg, "IFLA_OPERSTATE") or "UNKNOWN",
        master=_attr(msg, "IFLA_MASTER") or None,
        peer_index=peer_index or None,
        peer_netnsid=_attr(msg, "IFLA_LINK_NETNSID") if peer_index else None,
        stats=(
            LinkStats(
                rx_bytes=stats["rx_bytes"],
                tx_bytes=stats["tx_bytes"],
                rx_packets=stats["rx_packets"],
                tx_packets=stats["tx_packets"],
                rx_errors=stats["rx_errors"],
                tx_errors=stats["tx_errors"],
                rx_dropped=stats["rx_dropped"],
                tx_dropped=stats["tx_dropped"],
            )
            if stats is not None
            else None
        ),
    )


def decode_address(msg: Any) -> Address | None:
    """An RTM_NEWADDR/RTM_DELADDR message as a model Address (None: other family)."""
    family = FAMILIES.get(msg["family"])
    if family is None:
        return None
    # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on
    # point-to-point links (and equals IFA_LOCAL elsewhere). IPv6 has no LOCAL.
    addr = _attr(msg, "IFA_LOCAL") or _attr(msg, "IFA_ADDRESS")
    if addr is None:
        return None
    return Address(
        link=msg["index"],
        family=family,
        address=addr,
        prefixlen=msg["prefixlen"],
        scope=SCOPES.get(msg["scope"], str(msg["scope"])),
    )


def decode_route(msg: Any) -> Route | None:
    """An RTM_NEWROUTE/RTM_DELROUTE message as a model Route (None: ignored kind)."""
    family = FAMILIES.get(msg["family"])
    if family is None or msg["flags"] & RTM_F_CLONED:
        return None
    dst_len = msg["dst_len"]
    dst = _attr(msg, "RTA_DST")
    if dst is None:
        dst = "default" if dst_len == 0 else ("0.0.0.0" if family == "inet" else "::")
    if dst != "default":
        dst = f"{dst}/{dst_len}"
    nexthops: tuple[Nexthop, ...] = ()
    mp = _attr(msg, "RTA_MULTIPATH")
    if mp:
        nexthops = tuple(
            Nexthop(
                gateway=nh.get_attr("RTA_GATEWAY"), dev=nh["oif"] or None, weight=nh["hops"] + 1
            )
            for nh in mp
        )
    return Route(
        table=_attr(msg, "RTA_TABLE") or msg["table"],
        family=family,
        type=ROUTE_TYPES.get(msg["type"], str(msg["type"])),
        dst=dst,
        gateway=_attr(msg, "RTA_GATEWAY"),
        dev=_attr(msg, "RTA_OIF"),
        protocol=PROTOCOLS.get(msg["proto"], str(msg["proto"])),
        scope=SCOPES.get(msg["scope"], str(msg["scope"])),
        priority=_attr(msg, "RTA_PRIORITY"),
        prefsrc=_attr(msg, "RTA_PREFSRC"),
        tos=msg["tos"],
        nexthops=nexthops,
    )


EventType = Literal["link", "address", "route"]


@dataclass(frozen=True, slots=True)
class Decoded:
    """One notification: the model event plus what it was, for counting."""

    event: Event
    type: EventType
    action: Literal["new", "del"]


def decode(msg: Any, inode: int) -> Decoded | None:
    """A notification message as a model event, or None when it is not one we model."""
    t = msg["header"]["type"]
    if t in (RTM_NEWLINK, RTM_DELLINK) and msg["family"] == AF_BRIDGE:
        # The bridge's own view of a port (PF_BRIDGE: STP state, VLANs). An
        # RTM_DELLINK of this family means "left the bridge", not "deleted".
        return None
    if t == RTM_NEWLINK:
        return Decoded(LinkNew(inode, decode_link(msg)), "link", "new")
    if t == RTM_DELLINK:
        # Since 4.15 a link leaving for another namespace says where it went.
        moved = _attr(msg, "IFLA_NEW_NETNSID") is not None
        return Decoded(LinkDel(inode, msg["index"], moved=moved), "link", "del")
    if t in (RTM_NEWADDR, RTM_DELADDR):
        addr = decode_address(msg)
        if addr is None:
            return None
        if t == RTM_NEWADDR:
            return Decoded(AddressNew(inode, addr), "address", "new")
        return Decoded(AddressDel(inode, addr), "address", "del")
    if t in (RTM_NEWROUTE, RTM_DELROUTE):
        route = decode_route(msg)
        if route is None:
            return None
        if t == RTM_NEWROUTE:
            replace = bool(msg["header"]["flags"] & NLM_F_REPLACE)
            return Decoded(RouteNew(inode, route, replace=replace), "route", "new")
        return Decoded(RouteDel(inode, route), "route", "del")
    return None


def decode_dump_item(msg: Any, kind: DumpKind) -> Link | Address | Route | None:
    """One message of a dump reply as a model record."""
    if kind == "link":
        return decode_link(msg)
    if kind == "address":
        return decode_address(msg)
    return decode_route(msg)


def ipv4_routes_stale(changes: Iterable[Change]) -> bool:
    """True when the kernel may have dropped IPv4 routes without telling.

    IPv4 drops every route through a link that goes admin-down or away, and
    gateway routes that depended on a deleted address, with no RTM_DELROUTE.
    IPv6 notifies, so only IPv4 needs a re-dump.
    """
    return any(
        (ch.kind == "link" and _link_went_down(ch))
        or (
            ch.kind == "address"
            and ch.action == "removed"
            and isinstance(ch.old, Address)
            and ch.old.family == "inet"
        )
        for ch in changes
    )


def _link_went_down(ch: Change) -> bool:
    if ch.action == "removed":
        # A namespace's own teardown needs no re-dump: the namespace is gone.
        return ch.reason != "namespace_deleted"
    # Only admin-down flushes IPv4 routes; losing carrier keeps them (marked
    # "linkdown"), so an operstate change needs nothing.
    return (
        ch.action == "changed"
        and isinstance(ch.old, Link)
        and isinstance(ch.new, Link)
        and ch.old.admin_up
        and not ch.new.admin_up
    )


# --- sockets and sessions -------------------------------------------------------


class Overrun(Exception):
    """The kernel dropped notifications for this socket (ENOBUFS)."""


def make_socket(rcvbuf: int) -> socket.socket:
    """A non-blocking rtnetlink socket subscribed to links, addresses and routes.

    Call it inside the target namespace: the socket stays bound to the
    namespace it was created in.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        # SO_RCVBUFFORCE goes past net.core.rmem_max; needs CAP_NET_ADMIN.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
        # Subscribe before any dump, so no change can fall between dump and stream.
        sock.bind((0, GROUPS))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(slots=True)
class _Request:
    kind: Literal["dump", "nsid"]
    what: DumpKind | None = None
    family: Family | None = None
    reason: str = "initial"
    target: int = 0
    seq: int = 0
    items: list[Any] = field(default_factory=list)
    interrupted: bool = False


NsidOpener = Callable[[int], int]
"""Given a namespace inode, return a new fd for it (the caller closes it)."""


class Session:
    """One namespace's netlink socket: dumps, notifications, nsid queries.

    Dumps on one socket run one at a time. Notifications that arrive while a
    dump is running are held and replayed after the dump is applied: the dump
    then gives the base state and the notifications, in kernel order, bring it
    up to date.
    """

    def __init__(self, inode: int, name: str, sock: socket.socket) -> None:
        self.inode = inode
        self.name = name
        self.sock = sock
        self.marshal = MarshalRtnl()
        self._seq = 0
        self._queue: deque[_Request] = deque()
        self._dump: _Request | None = None
        self._nsid: dict[int, _Request] = {}
        self._held: list[Decoded] = []
        self.synced = False
        self.pending_resync: str | None = None
        self.dumps_done = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket: this releases our hold on the namespace."""
        self.sock.close()

    @property
    def busy(self) -> bool:
        """True while a dump runs or waits."""
        return self._dump is not None or bool(self._queue)

    def start(self) -> None:
        """Queue the first full dump."""
        self.resync("initial")

    def resync(self, reason: str, kinds: Iterable[DumpKind] = ("link", "address", "route")) -> None:
        """Queue fresh dumps (skipping any already queued but not started)."""
        for what in kinds:
            if not any(
                r.kind == "dump" and r.what == what and r.family is None for r in self._queue
            ):
                self._queue.append(_Request("dump", what=what, reason=reason))
        self._next()

    def redump_routes(self, family: Family, reason: str) -> None:
        """Queue a dump of one family's routes, unless one is already queued."""
        for r in self._queue:
            if r.kind == "dump" and r.what == "route" and r.family in (None, family):
                return
        self._queue.append(_Request("dump", what="route", family=family, reason=reason))
        self._next()

    def ask_nsid(self, target: int, fd: int) -> None:
        """Ask which nsid this namespace uses for the namespace open at ``fd``."""
        msg = nsidmsg()
        msg["header"]["type"] = RTM_GETNSID
        msg["header"]["flags"] = NLM_F_REQUEST
        msg["attrs"] = [("NETNSA_FD", fd)]
        seq = self._send(msg)
        self._nsid[seq] = _Request("nsid", target=target, seq=seq)

    def _send(self, msg: Any) -> int:
        self._seq += 1
        msg["header"]["sequence_number"] = self._seq
        msg.encode()
        self.sock.send(msg.data)
        return self._seq

    def _next(self) -> None:
        if self._dump is not None or not self._queue:
            return
        req = self._queue.popleft()
        msg: Any
        if req.what == "link":
            msg = ifinfmsg()
            msg["family"] = 0
            mtype = RTM_GETLINK
        elif req.what == "address":
            msg = ifaddrmsg()
            msg["family"] = FAMILY_NUMBERS[req.family] if req.family else 0
            mtype = RTM_GETADDR
        else:
            msg = rtmsg()
            msg["family"] = FAMILY_NUMBERS[req.family] if req.family else 0
            mtype = RTM_GETROUTE
        msg["header"]["type"] = mtype
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
        req.seq = self._send(msg)
        self._dump = req

    def read(self) -> tuple[list[Event], list[Decoded], str | None]:
        """Read what the socket has.

        Returns (events to apply in order, the notifications among them for
        counting, a resync reason if the namespace went stale).
        """
        events: list[Event] = []
        notes: list[Decoded] = []
        stale: str | None = None
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    # Notifications were dropped: the model of this namespace
                    # is stale from here on until a fresh dump.
                    stale = "overrun"
                    continue
                raise
            if not data:
                break
            for msg in self.marshal.parse(data):
                self._handle(msg, events, notes)
        if stale is not None:
            self.resync(stale)
        return events, notes, stale

    def _handle(self, msg: Any, events: list[Event], notes: list[Decoded]) -> None:
        hdr = msg["header"]
        seq = hdr["sequence_number"]
        dump = self._dump
        if dump is not None and seq == dump.seq and hdr["pid"] != 0:
            if hdr["flags"] & NLM_F_DUMP_INTR:
                dump.interrupted = True
            if hdr["type"] == NLMSG_DONE or hdr["type"] == NLMSG_ERROR:
                self._dump_done(dump, events, error=hdr["type"] == NLMSG_ERROR)
                return
            assert dump.what is not None
            item = decode_dump_item(msg, dump.what)
            if item is not None:
                dump.items.append(item)
            return
        if seq in self._nsid and hdr["pid"] != 0:
            req = self._nsid.pop(seq)
            if hdr["type"] == RTM_NEWNSID:
                nsid = msg.get_attr("NETNSA_NSID")
                # -1 (as u32) means "no id assigned": nothing to learn.
                if nsid is not None and nsid != 0xFFFFFFFF:
                    events.append(_nsid_event(self.inode, nsid, req.target))
            return
        decoded = decode(msg, self.inode)
        if decoded is None:
            return
        notes.append(decoded)
        if self._dump is not None:
            self._held.append(decoded)
        else:
            events.append(decoded.event)

    def _dump_done(self, dump: _Request, events: list[Event], *, error: bool) -> None:
        self._dump = None
        if dump.interrupted or error:
            # NLM_F_DUMP_INTR: the kernel's tables changed under the dump, so
            # it may be inconsistent. Run it again before trusting it.
            dump.items.clear()
            dump.interrupted = False
            self._queue.appendleft(dump)
        else:
            assert dump.what is not None
            events.append(
                Dump(
                    self.inode,
                    dump.what,
                    tuple(dump.items),
                    family=dump.family,
                    reason=dump.reason,
                )
            )
            self.dumps_done += 1
            events.extend(d.event for d in self._held)
            self._held.clear()
            if dump.reason == "initial" and dump.what == "route":
                self.synced = True
                events.append(Synced(self.inode))
        self._next()


def _nsid_event(inode: int, nsid: int, target: int) -> Event:
    # NETNSA_NSID is a signed s32 on the wire; pyroute2 reads it unsigned.
    if nsid >= 1 << 31:
        nsid -= 1 << 32
    return NsidLearned(inode, nsid, target)
