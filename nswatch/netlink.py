"""rtnetlink: one socket per namespace, dump + subscribe, resync.

Fetch is kept apart from parse: :class:`Session` reads datagrams from a socket
and hands them to the pure functions of :mod:`nswatch.decode`. Sockets are
plain ``socket.socket`` objects created inside the namespace by
:class:`nswatch.netns.NetnsEnterer`, so no helper process is forked per
namespace. pyroute2's decoder and constants are the reference the tests
hold :mod:`nswatch.decode` and this module to; the daemon never imports it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nswatch.decode import (
    NLM_F_DUMP_INTR,
    NLMSG_DONE,
    NLMSG_ERROR,
    RTM_NEWNSID,
    Decoded,
    Message,
    decode_dump_item,
    decode_notification,
    decode_nsid,
    dump_request,
    error_code,
    messages,
    nsid_request,
)
from nswatch.model import (
    Address,
    Dump,
    DumpKind,
    Event,
    Family,
    Link,
    NsidLearned,
    Route,
    Rule,
    StatsUpdate,
    Synced,
)

# The multicast groups subscribed to, as bits of nl_groups: group N is bit
# N - 1 (<linux/rtnetlink.h>: RTNLGRP_LINK 1, RTNLGRP_IPV4_IFADDR 5,
# RTNLGRP_IPV4_ROUTE 7, RTNLGRP_IPV4_RULE 8, RTNLGRP_IPV6_IFADDR 9,
# RTNLGRP_IPV6_ROUTE 11, RTNLGRP_IPV6_RULE 19, which has no RTMGRP_ name
# there). Written out rather than imported from pyroute2, whose package
# imports all of itself (163 modules) for them: 10 MB of the daemon's RSS.
# tests/test_netlink_session.py holds them to pyroute2's.
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV4_RULE = 0x80
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
RTMGRP_IPV6_RULE = 0x40000
GROUPS = (
    RTMGRP_LINK
    | RTMGRP_IPV4_IFADDR
    | RTMGRP_IPV6_IFADDR
    | RTMGRP_IPV4_ROUTE
    | RTMGRP_IPV6_ROUTE
    | RTMGRP_IPV4_RULE
    | RTMGRP_IPV6_RULE
)
# A namespace's first dump, in this order: rules before routes, since the
# route dump's end is what marks the namespace synced.
FULL_DUMP: tuple[DumpKind, ...] = ("link", "address", "rule", "route")
SO_RCVBUFFORCE = 33
SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12
FAMILY_NUMBERS: dict[str, int] = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}


# --- sockets and sessions -------------------------------------------------------


class Overrun(Exception):
    """The kernel dropped notifications for this socket (ENOBUFS)."""


# The largest datagram read: the kernel fills a dump's datagrams to at most
# 32 KiB, and a notification is far less.
RECV_SIZE = 1 << 20
# libc through ctypes.PyDLL: called with the GIL held (ctypes.CDLL lets it go).
_libc = ctypes.PyDLL(None, use_errno=True)
_recv = _libc.recv
_recv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_recv.restype = ctypes.c_ssize_t
# One buffer per thread that reads (the event loop's; a test's), never per
# socket: 1,000 namespaces' buffers would each keep what their largest
# dump touched.
_buffers = threading.local()


def recv_nowait(sock: socket.socket) -> bytes:
    """One datagram from ``sock`` if one is queued (else BlockingIOError), holding the GIL.

    ``socket.recv`` lets go of the GIL around every call, even one that
    cannot block, and the event loop then waits to take it back from
    whichever thread took it meanwhile: under 16 + 4 readers the render
    threads always want it, and each read of a netlink socket cost a wait
    (py-spy put a fifth of the loop's busy time in ``Session.read`` itself).
    A read with MSG_DONTWAIT never waits, so it keeps the GIL. It also
    reads into one buffer instead of making a 1 MiB bytes object per call
    (a fresh mapping at glibc's fixed mmap threshold) and shrinking it.
    """
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = ctypes.create_string_buffer(RECV_SIZE)
    n = _recv(sock.fileno(), buf, RECV_SIZE, socket.MSG_DONTWAIT)
    if n < 0:
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise BlockingIOError(err, os.strerror(err))
        raise OSError(err, os.strerror(err))
    return ctypes.string_at(buf, n)


def receiver(sock: socket.socket) -> Callable[[], bytes]:
    """How a session reads ``sock``: :func:`recv_nowait` for a socket as Python makes it; a
    subclass (the tests' fake kernel, which fails reads on demand) reads with its ``recv``."""
    if type(sock) is socket.socket:
        return lambda: recv_nowait(sock)
    return lambda: sock.recv(RECV_SIZE)


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
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        # Lets a route dump be limited to one link (RTA_OIF), so a re-dump
        # after a link goes down costs that link's routes, not the table's.
        sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        # Subscribe before any dump, so no change can fall between dump and stream.
        sock.bind((0, GROUPS))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(slots=True)
class _Request:
    what: DumpKind
    family: Family | None = None
    dev: int | None = None
    reason: str = "initial"
    seq: int = 0
    items: list[Link | Address | Route | Rule] = field(default_factory=list)
    interrupted: bool = False
    # An item of the reply failed to decode: the dump lacks it, so applying
    # it would remove that object from the model. Retry it instead.
    broken: bool = False
    attempts: int = 0


# Counter refreshes are link dumps that change nothing but counters: they
# need not hold notifications back (which would delay them by the dump's
# length, ~45 ms for a host with 1000 links).
STATS = "stats"
# Datagrams one read() takes of a counter refresh before it lets the loop go
# round: the socket is still readable, so the rest comes next turn. A dump
# is made as it is read, a few datagrams ahead, and a notification is queued
# behind only those: the refresh of a host with 1,000 veths (a dump of 1,000
# links) read in one go held every other event up for 40-110 ms under
# readers, every 15 s (tests/bench/bench_readers.py, the loop's callbacks timed).
READ_BUDGET = 8

# A dump interrupted this often in a row is taken as it is; the periodic
# reconcile will catch what it missed.
MAX_DUMP_ATTEMPTS = 5

# The resync reason of a namespace whose notification could not be decoded.
DECODE_ERROR = "decode_error"

# What a malformed message makes the decoder raise (short bodies, addresses
# of the wrong length, bad attribute layouts).
DECODE_ERRORS = (struct.error, ValueError, IndexError, KeyError, TypeError)


class Session:
    """One namespace's netlink socket: dumps, notifications, nsid queries.

    Dumps on one socket run one at a time. Notifications that arrive while a
    dump is running are held and replayed after the dump is applied: the dump
    then gives the base state and the notifications, in kernel order, bring it
    up to date. nsid queries are not dumps and go out at once.
    """

    def __init__(
        self,
        inode: int,
        name: str,
        sock: socket.socket,
        clock: Callable[[], float] = time.monotonic,
        port: int | None = None,
    ) -> None:
        self.inode = inode
        # Our netlink port id. A notification caused by another socket's
        # request carries that socket's port *and its seq*, which may equal
        # one of ours: only port and seq together say a message answers us.
        self.port: int = sock.getsockname()[0] if port is None else port
        self.clock = clock
        self.last_progress = clock()
        self.name = name
        self.sock = sock
        self._recv = receiver(sock)
        self._seq = 0
        self._queue: deque[_Request] = deque()
        self._dump: _Request | None = None
        self._nsid: dict[int, int] = {}
        self._held: list[Decoded] = []
        self.synced = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket: this releases our hold on the namespace."""
        self.sock.close()

    @property
    def busy(self) -> bool:
        """True while a dump runs or waits."""
        return self._dump is not None or bool(self._queue)

    @property
    def idle(self) -> bool:
        """True when no dump and no nsid question is outstanding."""
        return not self.busy and not self._nsid

    def stalled(self, timeout: float) -> bool:
        """True when a dump has had no reply for ``timeout`` seconds."""
        return self._dump is not None and self.clock() - self.last_progress > timeout

    def start(self, reason: str = "initial") -> None:
        """Queue the first full dump on this socket."""
        self.resync(reason)

    def resync(self, reason: str, kinds: Iterable[DumpKind] = FULL_DUMP) -> None:
        """Queue fresh dumps (skipping any already queued but not started)."""
        for what in kinds:
            if not any(r.what == what and r.family is None for r in self._queue):
                self._queue.append(_Request(what, reason=reason))
        self._next()

    def redump_routes(self, family: Family, reason: str, dev: int | None = None) -> None:
        """Queue a dump of one family's routes (through ``dev`` only, if given)."""
        for r in self._queue:
            if r.what == "route" and r.family in (None, family) and r.dev in (None, dev):
                return
        self._queue.append(_Request("route", family=family, reason=reason, dev=dev))
        self._next()

    def refresh_stats(self) -> None:
        """Queue a link dump that only refreshes counters."""
        if not any(r.what == "link" for r in self._queue):
            self._queue.append(_Request("link", reason=STATS))
        self._next()

    def ask_nsid(self, target: int, fd: int) -> None:
        """Ask which nsid this namespace uses for namespace ``target``, open at ``fd``."""
        self._seq += 1
        # The kernel resolves the fd while handling send(): it may be closed after.
        self.sock.send(nsid_request(fd, self._seq))
        self._nsid[self._seq] = target

    def _next(self) -> None:
        if self._dump is not None or not self._queue:
            return
        req = self._queue.popleft()
        self.last_progress = self.clock()
        self._seq += 1
        req.seq = self._seq
        family = FAMILY_NUMBERS[req.family] if req.family else 0
        self.sock.send(dump_request(req.what, family, req.seq, req.dev))
        self._dump = req

    def read(self) -> tuple[list[Event], list[Decoded], str | None]:
        """Read what the socket has (of a counter refresh, :data:`READ_BUDGET` datagrams a turn).

        Returns (events to apply in order, the notifications among them for
        counting, a resync reason if the namespace went stale). A message
        that fails to decode is skipped, never the rest of its datagram: a
        dump it belonged to is retried, and a notification's loss makes the
        namespace stale (:data:`DECODE_ERROR`), so a fresh dump restores it.
        """
        events: list[Event] = []
        notes: list[Decoded] = []
        stale: str | None = None
        budget = READ_BUDGET
        while True:
            # Only a counter refresh is left half-read: its notifications are
            # applied as they come, and no other dump is asked for until it
            # is done. Any other dump holds notifications back until its end,
            # so one asked for with older notifications still unread would
            # apply them over its fresher state; and a stale namespace is
            # read to the end before its resync.
            dump = self._dump
            if budget <= 0 and stale is None and dump is not None and dump.reason == STATS:
                break
            budget -= 1
            try:
                data = self._recv()
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
            for msg in messages(data):
                if not self._handle(msg, events, notes):
                    stale = stale or DECODE_ERROR
        if stale is not None:
            self.resync(stale)
        return events, notes, stale

    def _handle(self, msg: Message, events: list[Event], notes: list[Decoded]) -> bool:
        """Take one message; False when it was a notification that failed to decode."""
        dump = self._dump
        ours = msg.pid == self.port
        if ours and dump is not None and msg.seq == dump.seq:
            if msg.flags & NLM_F_DUMP_INTR:
                dump.interrupted = True
            self.last_progress = self.clock()
            if msg.type == NLMSG_ERROR:
                err = -error_code(msg)
                if err == errno.ENOBUFS:
                    # The first chunk did not fit the receive buffer. The
                    # kernel keeps the dump running and sends it as we read.
                    return True
                self._dump_done(dump, events, failed=True)
                return True
            if msg.type == NLMSG_DONE:
                self._dump_done(dump, events, failed=dump.broken)
                return True
            try:
                item = decode_dump_item(msg, dump.what)
            except DECODE_ERRORS:
                dump.broken = True
                return True
            if item is not None:
                dump.items.append(item)
            return True
        target = self._nsid.pop(msg.seq, None) if ours and msg.seq else None
        if target is not None:
            if msg.type == RTM_NEWNSID:
                try:
                    nsid = decode_nsid(msg)
                except DECODE_ERRORS:
                    return True  # the veth stays unresolved; nothing else is lost
                if nsid is not None:
                    events.append(NsidLearned(self.inode, nsid, target))
            return True
        try:
            decoded = decode_notification(msg, self.inode)
        except DECODE_ERRORS:
            return False
        if decoded is None:
            return True
        notes.append(decoded)
        if self._dump is not None and self._dump.reason != STATS:
            self._held.append(decoded)
        else:
            events.append(decoded.event)
        return True

    def _dump_done(self, dump: _Request, events: list[Event], *, failed: bool) -> None:
        self._dump = None
        dump.attempts += 1
        if (dump.interrupted or failed) and dump.attempts < MAX_DUMP_ATTEMPTS:
            # NLM_F_DUMP_INTR: the kernel's tables changed under the dump, so
            # it may be inconsistent. Run it again before trusting it.
            dump.items.clear()
            dump.interrupted = False
            dump.broken = False
            self._queue.appendleft(dump)
        else:
            if failed:
                pass
            elif dump.reason == STATS:
                events.append(
                    StatsUpdate(
                        self.inode,
                        tuple(
                            (item.index, item.stats)
                            for item in dump.items
                            if isinstance(item, Link) and item.stats is not None
                        ),
                    )
                )
            else:
                events.append(
                    Dump(
                        self.inode,
                        dump.what,
                        tuple(dump.items),  # type: ignore[arg-type]
                        family=dump.family,
                        reason=dump.reason,
                        dev=dump.dev,
                    )
                )
            events.extend(d.event for d in self._held)
            self._held.clear()
            if dump.what == "route" and dump.family is None and not self.synced:
                self.synced = True
                events.append(Synced(self.inode))
        self._next()
