"""netlink.Session against crafted rtnetlink bytes on a socketpair (no kernel needed)."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from pyroute2.netlink import rtnl

from nswatch import netlink
from nswatch.decode import (
    IFA_LOCAL,
    IFADDRMSG,
    IFINFOMSG,
    IFLA_IFNAME,
    NETNSA_NSID,
    NLATTR,
    NLM_F_DUMP_INTR,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HDR,
    RTA_DST,
    RTA_OIF,
    RTM_DELLINK,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETNSID,
    RTM_GETROUTE,
    RTM_GETRULE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNSID,
    RTM_NEWROUTE,
    RTMSG,
    S32,
    U32,
)
from nswatch.model import (
    Address,
    AddressNew,
    Dump,
    Event,
    Link,
    LinkDel,
    LinkNew,
    Model,
    NamespaceSeen,
    NsidLearned,
    Route,
    RouteNew,
    Synced,
    apply_all,
)
from nswatch.netlink import (
    DECODE_ERROR,
    MAX_DUMP_ATTEMPTS,
    READ_BUDGET,
    Session,
    receiver,
    recv_nowait,
)

INODE = 4026531999
# The session's netlink port id: the kernel's replies to it carry it.
PORT = 4242
# Another socket's port: notifications caused by its requests carry it, with its seq.
OTHER = 777
NLM_F_MULTI = 0x2
ARPHRD_ETHER = 1


# --- crafting messages -----------------------------------------------------------------


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def attr(atype: int, payload: bytes) -> bytes:
    return _pad(NLATTR.pack(4 + len(payload), atype) + payload)


def msg(mtype: int, body: bytes, seq: int = 0, flags: int = 0, pid: int | None = None) -> bytes:
    # A message with a seq is a reply to the session unless another port is given.
    if pid is None:
        pid = PORT if seq else 0
    return _pad(NLMSG_HDR.pack(16 + len(body), mtype, flags, seq, pid) + body)


def link_msg(
    index: int,
    name: str,
    seq: int = 0,
    flags: int = 0,
    mtype: int = RTM_NEWLINK,
    pid: int | None = None,
) -> bytes:
    body = IFINFOMSG.pack(0, ARPHRD_ETHER, index, 0, 0) + attr(IFLA_IFNAME, name.encode() + b"\0")
    return msg(mtype, body, seq, flags, pid)


def addr_msg(index: int, ip: str, prefixlen: int, seq: int = 0, flags: int = 0) -> bytes:
    body = IFADDRMSG.pack(socket.AF_INET, prefixlen, 0, 0, index) + attr(
        IFA_LOCAL, socket.inet_pton(socket.AF_INET, ip)
    )
    return msg(RTM_NEWADDR, body, seq, flags)


def route_msg(
    dst: str, dst_len: int, dev: int, seq: int = 0, flags: int = 0, pid: int | None = None
) -> bytes:
    body = (
        RTMSG.pack(socket.AF_INET, dst_len, 0, 0, 254, 3, 0, 1, 0)
        + attr(RTA_DST, socket.inet_pton(socket.AF_INET, dst))
        + attr(RTA_OIF, U32.pack(dev))
    )
    return msg(RTM_NEWROUTE, body, seq, flags, pid)


def nsid_reply(seq: int, nsid: int) -> bytes:
    # RTM_NEWNSID: an rtgenmsg (padded to 4), then NETNSA_NSID.
    return msg(RTM_NEWNSID, b"\0\0\0\0" + attr(NETNSA_NSID, S32.pack(nsid)), seq)


def done(seq: int, flags: int = 0) -> bytes:
    return msg(NLMSG_DONE, S32.pack(0), seq, NLM_F_MULTI | flags)


def error(seq: int, err: int) -> bytes:
    # NLMSG_ERROR: the negative errno, then the header of the request it answers.
    return msg(NLMSG_ERROR, S32.pack(-err) + NLMSG_HDR.pack(16, 0, 0, seq, 0), seq)


def broken_addr(seq: int = 0) -> bytes:
    """An RTM_NEWADDR whose body is too short for its ifaddrmsg."""
    return msg(RTM_NEWADDR, b"\x02\x18\x00", seq)


def dev(index: int) -> Link:
    """The Link that link_msg(index, ...) decodes to."""
    return Link(index=index, name="lo" if index == 1 else f"e{index}", kind="device")


# --- the fake kernel end ---------------------------------------------------------------


class FlakySocket(socket.socket):
    """The session's end of the pair; can fail the next recv() like the kernel does."""

    fail_next: OSError | None = None

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.fail_next is not None:
            err, self.fail_next = self.fail_next, None
            raise err
        return super().recv(bufsize, flags)


class Kernel:
    """The other end of the socketpair: reads the session's requests and sends datagrams."""

    def __init__(self) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.peer = b
        self.sock = FlakySocket(a.family, a.type, fileno=a.detach())
        self.sock.setblocking(False)
        self.peer.setblocking(False)
        self.session = Session(INODE, "ns", self.sock, port=PORT)

    def requests(self) -> list[tuple[int, int]]:
        """(message type, seq) of every request the session sent since the last call."""
        out: list[tuple[int, int]] = []
        while True:
            try:
                data = self.peer.recv(65536)
            except BlockingIOError:
                return out
            _len, mtype, _flags, seq, _pid = NLMSG_HDR.unpack_from(data, 0)
            out.append((mtype, seq))

    def send(self, *messages: bytes) -> None:
        """One datagram holding these messages."""
        self.peer.send(b"".join(messages))

    def answer(self, expect: int) -> int:
        """Check the one pending request is of type ``expect``; return its seq."""
        reqs = self.requests()
        assert [t for t, _ in reqs] == [expect], reqs
        return reqs[0][1]

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    k = Kernel()
    try:
        yield k
    finally:
        k.close()


def sync(k: Kernel) -> list[Event]:
    """Answer the first link, address, rule and route dumps (no rules); return the events."""
    k.session.start()
    events: list[Event] = []
    items: list[tuple[int, Callable[[int], bytes] | None]] = [
        (RTM_GETLINK, lambda s: link_msg(1, "lo", s, NLM_F_MULTI)),
        (RTM_GETADDR, lambda s: addr_msg(1, "198.18.0.1", 24, s, NLM_F_MULTI)),
        (RTM_GETRULE, None),
        (RTM_GETROUTE, lambda s: route_msg("198.18.0.0", 24, 1, s, NLM_F_MULTI)),
    ]
    for mtype, item in items:
        seq = k.answer(mtype)
        if item is None:
            k.send(done(seq))
        else:
            k.send(item(seq), done(seq))
        got, _notes, stale = k.session.read()
        assert stale is None
        events += got
    assert k.requests() == []
    return events


# --- tests -----------------------------------------------------------------------------


def test_first_sync_dumps_each_kind_in_turn_then_says_synced(kernel: Kernel) -> None:
    """The first sync is a link, an address, a rule and a route dump, one at a time, then Synced."""
    events = sync(kernel)
    assert [type(e) for e in events] == [Dump, Dump, Dump, Dump, Synced]
    assert [e.kind for e in events if isinstance(e, Dump)] == ["link", "address", "rule", "route"]
    assert kernel.session.synced and kernel.session.idle


def test_notifications_during_a_dump_are_replayed_after_it_in_kernel_order(kernel: Kernel) -> None:
    """Notifications read while a dump runs are held, then replayed after the dump's items, in order."""
    kernel.session.start()
    seq = kernel.answer(RTM_GETLINK)
    kernel.send(link_msg(1, "lo", seq, NLM_F_MULTI))
    # The kernel creates then deletes link 2 while the dump is running.
    kernel.send(link_msg(2, "e2"), link_msg(2, "e2", mtype=RTM_DELLINK))
    events, notes, _ = kernel.session.read()
    assert events == [] and len(notes) == 2  # held, but counted
    kernel.send(link_msg(2, "e2", seq, NLM_F_MULTI), done(seq))
    events, notes, _ = kernel.session.read()
    assert notes == []
    assert events == [
        Dump(INODE, "link", (dev(1), dev(2))),
        LinkNew(INODE, dev(2)),
        LinkDel(INODE, 2),
    ]
    m = Model()
    m.apply(NamespaceSeen(INODE, ("ns",)))
    apply_all(m, events)
    assert list(m.namespaces[INODE].links) == [1]


def test_notifications_outside_dumps_pass_straight_through(kernel: Kernel) -> None:
    """Once synced, a notification comes out of the read it arrived in."""
    sync(kernel)
    kernel.send(addr_msg(1, "198.18.0.9", 32))
    events, notes, stale = kernel.session.read()
    assert events == [AddressNew(INODE, Address(1, "inet", "198.18.0.9", 32))]
    assert [(n.type, n.action) for n in notes] == [("address", "new")] and stale is None


def test_another_sockets_notification_with_our_seq_is_not_a_dump_item(kernel: Kernel) -> None:
    """A notification caused by another socket's request carries that socket's seq: equal to
    the running dump's seq, it is still a notification (held), never an item of the dump."""
    sync(kernel)
    kernel.session.resync("test", kinds=("link",))
    seq = kernel.answer(RTM_GETLINK)
    kernel.send(link_msg(2, "e2", seq, pid=OTHER))
    kernel.send(link_msg(1, "lo", seq, NLM_F_MULTI), done(seq))
    events, notes, _ = kernel.session.read()
    assert [(n.type, n.action) for n in notes] == [("link", "new")]
    assert events == [Dump(INODE, "link", (dev(1),), reason="test"), LinkNew(INODE, dev(2))]


def test_nsid_reply_is_matched_by_port_and_seq(kernel: Kernel) -> None:
    """A route notification caused by another socket with the seq of an outstanding nsid
    question is a notification; the kernel's reply that follows still answers the question
    (seen on a real kernel: `ip route add` in the namespace used the same seq)."""
    sync(kernel)
    with open("/dev/null") as f:
        kernel.session.ask_nsid(4026532000, f.fileno())
    seq = kernel.answer(RTM_GETNSID)
    kernel.send(route_msg("198.18.5.0", 24, 1, seq, pid=OTHER))
    events, _, _ = kernel.session.read()
    assert [type(e) for e in events] == [RouteNew]
    assert not kernel.session.idle  # still waiting for the answer
    kernel.send(nsid_reply(seq, 3))
    events, _, _ = kernel.session.read()
    assert events == [NsidLearned(INODE, 3, 4026532000)]
    assert kernel.session.idle


def test_interrupted_dump_is_retried_before_it_is_trusted(kernel: Kernel) -> None:
    """NLM_F_DUMP_INTR discards the reply and asks again; only the clean reply is applied."""
    kernel.session.start()
    seq = kernel.answer(RTM_GETLINK)
    kernel.send(
        link_msg(1, "lo", seq, NLM_F_MULTI | NLM_F_DUMP_INTR),
        link_msg(9, "e9", seq, NLM_F_MULTI | NLM_F_DUMP_INTR),
        done(seq, NLM_F_DUMP_INTR),
    )
    kernel.send(link_msg(3, "e3"))  # a notification between the two attempts
    events, _, _ = kernel.session.read()
    assert events == []
    again = kernel.answer(RTM_GETLINK)
    assert again != seq
    kernel.send(link_msg(1, "lo", again, NLM_F_MULTI), done(again))
    events, _, _ = kernel.session.read()
    assert events == [Dump(INODE, "link", (dev(1),)), LinkNew(INODE, dev(3))]
    assert kernel.answer(RTM_GETADDR)


def test_interrupted_dump_is_taken_after_max_attempts(kernel: Kernel) -> None:
    """A dump interrupted every time is asked MAX_DUMP_ATTEMPTS times, then taken as it is."""
    kernel.session.start()
    seqs = []
    for _ in range(MAX_DUMP_ATTEMPTS):
        seq = kernel.answer(RTM_GETLINK)
        seqs.append(seq)
        kernel.send(link_msg(1, "lo", seq, NLM_F_MULTI | NLM_F_DUMP_INTR), done(seq))
        events, _, _ = kernel.session.read()
    assert len(set(seqs)) == MAX_DUMP_ATTEMPTS
    assert events == [Dump(INODE, "link", (dev(1),))]
    assert kernel.answer(RTM_GETADDR)


def test_failed_dump_is_retried(kernel: Kernel) -> None:
    """A dump answered with an error (not ENOBUFS) is asked again."""
    kernel.session.start()
    seq = kernel.answer(RTM_GETLINK)
    kernel.send(error(seq, errno.EBUSY))
    assert kernel.session.read()[0] == []
    again = kernel.answer(RTM_GETLINK)
    kernel.send(link_msg(1, "lo", again, NLM_F_MULTI), done(again))
    assert kernel.session.read()[0] == [Dump(INODE, "link", (dev(1),))]


def test_enobufs_answer_to_a_dump_keeps_reading(kernel: Kernel) -> None:
    """An NLMSG_ERROR ENOBUFS to a dump request means the dump goes on: its items still count."""
    kernel.session.start()
    seq = kernel.answer(RTM_GETLINK)
    kernel.send(error(seq, errno.ENOBUFS))
    assert kernel.session.read()[0] == [] and kernel.session.busy
    kernel.send(link_msg(1, "lo", seq, NLM_F_MULTI), done(seq))
    assert kernel.session.read()[0] == [Dump(INODE, "link", (dev(1),))]
    assert kernel.answer(RTM_GETADDR)  # the next kind, not the link dump again


def test_enobufs_on_recv_marks_the_namespace_stale_and_resyncs(kernel: Kernel) -> None:
    """ENOBUFS from recv() is an overrun: the read says so and a full re-dump is queued."""
    sync(kernel)
    kernel.send(addr_msg(1, "198.18.0.7", 32))
    kernel.sock.fail_next = OSError(errno.ENOBUFS, "No buffer space available")
    events, _, stale = kernel.session.read()
    assert stale == "overrun"
    # What was readable after the error is still read.
    assert events == [AddressNew(INODE, Address(1, "inet", "198.18.0.7", 32))]
    seq = kernel.answer(RTM_GETLINK)
    kernel.send(link_msg(1, "lo", seq, NLM_F_MULTI), done(seq))
    events, _, _ = kernel.session.read()
    assert events == [Dump(INODE, "link", (dev(1),), reason="overrun")]


def test_other_recv_errors_propagate(kernel: Kernel) -> None:
    """A recv() error other than ENOBUFS is the caller's to handle (the socket is broken)."""
    kernel.sock.fail_next = OSError(errno.EBADF, "Bad file descriptor")
    with pytest.raises(OSError) as info:
        kernel.session.read()
    assert info.value.errno == errno.EBADF


def test_undecodable_notification_skips_only_itself_and_resyncs(kernel: Kernel) -> None:
    """A notification that fails to decode mid-datagram loses nothing else and re-dumps the namespace."""
    sync(kernel)
    kernel.send(
        link_msg(2, "e2"),
        broken_addr(),
        route_msg("198.19.0.0", 24, 2),
    )
    events, notes, stale = kernel.session.read()
    assert events == [
        LinkNew(INODE, dev(2)),
        RouteNew(INODE, Route(254, "inet", "unicast", "198.19.0.0/24", dev=2, scope="global")),
    ]
    assert len(notes) == 2
    assert stale == DECODE_ERROR
    seq = kernel.answer(RTM_GETLINK)
    kernel.send(link_msg(1, "lo", seq, NLM_F_MULTI), done(seq))
    assert kernel.session.read()[0] == [Dump(INODE, "link", (dev(1),), reason=DECODE_ERROR)]


def test_undecodable_dump_item_retries_the_dump(kernel: Kernel) -> None:
    """A dump with an item that fails to decode is not applied (it would drop that object) but asked again."""
    sync(kernel)
    kernel.session.resync("reconcile", kinds=("address",))
    seq = kernel.answer(RTM_GETADDR)
    kernel.send(addr_msg(1, "198.18.0.1", 24, seq, NLM_F_MULTI), broken_addr(seq), done(seq))
    events, _, stale = kernel.session.read()
    assert events == [] and stale is None
    again = kernel.answer(RTM_GETADDR)
    kernel.send(addr_msg(1, "198.18.0.1", 24, again, NLM_F_MULTI), done(again))
    events, _, _ = kernel.session.read()
    assert events == [
        Dump(INODE, "address", (Address(1, "inet", "198.18.0.1", 24),), reason="reconcile")
    ]


def test_counter_refresh_does_not_hold_notifications(kernel: Kernel) -> None:
    """A stats-only link dump lets notifications through at once (they need no base state)."""
    sync(kernel)
    kernel.session.refresh_stats()
    seq = kernel.answer(RTM_GETLINK)
    kernel.send(addr_msg(1, "198.18.0.5", 32))
    events, _, _ = kernel.session.read()
    assert events == [AddressNew(INODE, Address(1, "inet", "198.18.0.5", 32))]
    kernel.send(done(seq))
    events, _, _ = kernel.session.read()
    assert [type(e).__name__ for e in events] == ["StatsUpdate"]


def test_truncated_datagram_tail_is_ignored(kernel: Kernel) -> None:
    """A datagram cut inside a message yields the whole messages before the cut."""
    sync(kernel)
    tail = link_msg(3, "e3")
    kernel.send(link_msg(2, "e2"), tail[:-4])
    events, _, stale = kernel.session.read()
    assert events == [LinkNew(INODE, dev(2))] and stale is None


def test_a_counter_refresh_is_read_a_few_datagrams_a_turn(kernel: Kernel) -> None:
    """A counter refresh's dump is read READ_BUDGET datagrams at a time, the rest left for
    the loop's next turns; a notification among them is applied as soon as it is read."""
    sync(kernel)
    kernel.session.refresh_stats()
    seq = kernel.answer(RTM_GETLINK)
    n = READ_BUDGET * 2 + 3
    for i in range(n):
        kernel.send(link_msg(100 + i, f"v{i}", seq, NLM_F_MULTI))
        if i == READ_BUDGET + 2:
            kernel.send(addr_msg(1, "198.18.0.5", 32))
    kernel.send(done(seq))
    got: list[list[str]] = []
    while not got or "StatsUpdate" not in got[-1]:
        events, _, _ = kernel.session.read()
        got.append([type(e).__name__ for e in events])
    # 21 datagrams: 19 dump parts, the notification after the 11th, and the end.
    assert got == [[], ["AddressNew"], ["StatsUpdate"]]


def test_anything_but_a_counter_refresh_is_read_to_the_end(kernel: Kernel) -> None:
    """Notifications, and a stale namespace, are read whole in one go: a dump asked for
    later must not find older notifications still unread and apply them over its state."""
    sync(kernel)
    n = READ_BUDGET * 2 + 3
    for i in range(n):
        kernel.send(link_msg(100 + i, f"v{i}"))
    events, _, _ = kernel.session.read()
    assert [e.link.index for e in events if isinstance(e, LinkNew)] == [100 + i for i in range(n)]
    kernel.session.refresh_stats()
    seq = kernel.answer(RTM_GETLINK)
    kernel.send(broken_addr())  # the namespace is stale from here
    for i in range(n):
        kernel.send(link_msg(100 + i, f"v{i}", seq, NLM_F_MULTI))
    kernel.send(done(seq))
    _, _, stale = kernel.session.read()
    assert stale == DECODE_ERROR
    assert kernel.session.read() == ([], [], None)  # nothing was left behind


def test_recv_nowait_reads_one_datagram_at_a_time_and_says_when_none_is_left() -> None:
    """The loop's read (libc's recv with the GIL kept) gives each queued datagram whole,
    then BlockingIOError; a kernel error comes back as OSError with its errno."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setblocking(False)
        a.send(b"first")
        a.send(b"x" * 40_000)
        assert recv_nowait(b) == b"first"
        assert recv_nowait(b) == b"x" * 40_000
        with pytest.raises(BlockingIOError):
            recv_nowait(b)
        fd = b.detach()
        os.close(fd)
        gone = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM, fileno=os.dup(a.fileno()))
        gone.close()
        with pytest.raises(OSError) as e:
            recv_nowait(gone)
        assert e.value.errno == errno.EBADF


def test_sessions_read_real_sockets_with_recv_nowait_and_subclasses_with_their_recv(
    kernel: Kernel,
) -> None:
    """A socket as Python makes it is read holding the GIL; a subclass (the fake kernel end
    here, which fails reads on demand) keeps its own recv, so its failures still reach the
    session."""
    plain = socket.socket(fileno=os.dup(kernel.peer.fileno()))
    with plain:
        plain.setblocking(False)
        kernel.sock.send(b"to the peer")
        assert receiver(plain)() == b"to the peer"
        kernel.sock.fail_next = OSError(errno.ENOBUFS, "No buffer space available")
        with pytest.raises(OSError) as e:
            receiver(kernel.sock)()
        assert e.value.errno == errno.ENOBUFS


GROUP_NAMES = (
    "RTMGRP_LINK",
    "RTMGRP_IPV4_IFADDR",
    "RTMGRP_IPV4_ROUTE",
    "RTMGRP_IPV4_RULE",
    "RTMGRP_IPV6_IFADDR",
    "RTMGRP_IPV6_ROUTE",
    "RTMGRP_IPV6_RULE",
)


def test_the_subscribed_groups_are_pyroute2s() -> None:
    """The multicast group bits written out in netlink.py are pyroute2's, every one subscribed."""
    want = 0
    for name in GROUP_NAMES:
        assert getattr(netlink, name) == getattr(rtnl, name), name
        want |= getattr(rtnl, name)
    assert want == netlink.GROUPS


def test_no_module_of_the_daemon_imports_pyroute2() -> None:
    """pyroute2's package imports all of itself (10 MB of the daemon's RSS); every nswatch
    module loads without it."""
    code = (
        "import importlib, pkgutil, sys, nswatch\n"
        "for m in pkgutil.walk_packages(nswatch.__path__, 'nswatch.'):\n"
        "    if m.name != 'nswatch.__main__':  # runs the command line\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pyroute2'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout
