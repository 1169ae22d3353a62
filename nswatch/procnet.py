"""Per-namespace socket, TCP/UDP and conntrack statistics, read from inside each namespace.

node_exporter's sockstat, netstat and conntrack collectors read the host's
/proc/net; this module reads the same files for every watched namespace.
/proc/thread-self/net and /proc/sys/net follow the *reading thread's*
namespace, so a thread of its own enters each namespace in turn (setns, see
:class:`nswatch.netns.NetnsEnterer`), reads a handful of small files and
comes back: no process, no socket. A pass over every namespace is spread
over the interval, never on the event-loop thread.

The parsers are pure (text in, numbers out); :class:`ProcNetPoller` is the
thread, and its :meth:`~ProcNetPoller.snapshot` is what a scrape reads.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

import structlog

from nswatch.model import Model
from nswatch.netns import NetnsEnterer

#: Seconds between two reads of one namespace, by default.
DEFAULT_INTERVAL = 30.0

#: sockstat fields (node_exporter's names) the kernel counts per namespace;
#: the others (TCP orphan/alloc/mem, UDP mem) are host-wide and belong to
#: node_exporter.
SOCKSTAT_FIELDS = (
    "sockets_used",
    "TCP_inuse",
    "TCP_tw",
    "UDP_inuse",
    "RAW_inuse",
    "FRAG_inuse",
    "FRAG_memory",
    "TCP6_inuse",
    "UDP6_inuse",
    "RAW6_inuse",
    "FRAG6_inuse",
    "FRAG6_memory",
)
#: snmp and netstat counters, in node_exporter's naming (Proto_Field): the
#: ones that answer "who drops SYNs, retransmits or resets".
NETSTAT_COUNTERS = (
    "Tcp_ActiveOpens",
    "Tcp_PassiveOpens",
    "Tcp_AttemptFails",
    "Tcp_EstabResets",
    "Tcp_InSegs",
    "Tcp_OutSegs",
    "Tcp_RetransSegs",
    "Tcp_InErrs",
    "Tcp_OutRsts",
    "TcpExt_ListenOverflows",
    "TcpExt_ListenDrops",
    "TcpExt_SyncookiesSent",
    "TcpExt_SyncookiesRecv",
    "TcpExt_SyncookiesFailed",
    "TcpExt_TCPSynRetrans",
    "TcpExt_TCPTimeouts",
    "TcpExt_TCPAbortOnMemory",
    "Udp_InDatagrams",
    "Udp_OutDatagrams",
    "Udp_NoPorts",
    "Udp_InErrors",
    "Udp_RcvbufErrors",
    "Udp_SndbufErrors",
)
NETSTAT_GAUGES = ("Tcp_CurrEstab",)

# Read from inside the namespace; relative to the proc mount.
SOCKSTAT_FILES = ("net/sockstat", "net/sockstat6")
NETSTAT_FILES = ("net/snmp", "net/netstat")
CONNTRACK_COUNT = "sys/net/netfilter/nf_conntrack_count"
CONNTRACK_MAX = "sys/net/netfilter/nf_conntrack_max"

#: Why a namespace could not be read, as counted.
ERROR_REASONS = ("enter", "read")


def parse_sockstat(text: str) -> dict[str, int]:
    """``/proc/net/sockstat`` or ``sockstat6`` as {"TCP_inuse": 3, "sockets_used": 9, ...}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        proto, sep, rest = line.partition(":")
        if not sep:
            continue
        words = rest.split()
        for name, value in zip(words[::2], words[1::2], strict=False):
            if value.isdigit():
                out[f"{proto}_{name}"] = int(value)
    return out


def parse_snmp(text: str) -> dict[str, int]:
    """``/proc/net/snmp`` or ``netstat`` (header, values per protocol) as {"Tcp_InSegs": n}."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        proto, _, names = head.partition(":")
        vproto, _, nums = values.partition(":")
        if proto != vproto:
            # Out of step: a file this parser does not know; take nothing rather than mislabel.
            return out
        for name, value in zip(names.split(), nums.split(), strict=False):
            try:
                out[f"{proto}_{name}"] = int(value)
            except ValueError:
                continue
    return out


@dataclass(frozen=True, slots=True)
class NetStats:
    """One namespace's statistics as of one read; ``conntrack`` is None without the module."""

    sockstat: dict[str, int]
    netstat: dict[str, int]
    # (entries, limit)
    conntrack: tuple[int, int] | None = None


def select(
    sockstat: dict[str, int], netstat: dict[str, int], conntrack: tuple[int, int] | None
) -> NetStats:
    """The parsed files cut down to the fields nswatch exports."""
    return NetStats(
        {k: sockstat[k] for k in SOCKSTAT_FIELDS if k in sockstat},
        {k: netstat[k] for k in (*NETSTAT_COUNTERS, *NETSTAT_GAUGES) if k in netstat},
        conntrack,
    )


def _read(path: str) -> str | None:
    """A small proc file's text, or None when it does not exist (no IPv6, no conntrack)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_current(proc: str = "/proc") -> NetStats:
    """The calling thread's namespace's statistics (files that are missing give nothing)."""
    base = os.path.join(proc, "thread-self")
    sockstat: dict[str, int] = {}
    for name in SOCKSTAT_FILES:
        text = _read(os.path.join(base, name))
        if text is not None:
            sockstat.update(parse_sockstat(text))
    netstat: dict[str, int] = {}
    for name in NETSTAT_FILES:
        text = _read(os.path.join(base, name))
        if text is not None:
            netstat.update(parse_snmp(text))
    count = _read(os.path.join(proc, CONNTRACK_COUNT))
    limit = _read(os.path.join(proc, CONNTRACK_MAX))
    conntrack = (
        (int(count), int(limit))
        if count is not None and limit is not None and count.strip().isdigit()
        else None
    )
    return select(sockstat, netstat, conntrack)


@dataclass(frozen=True, slots=True)
class ProcNetSnapshot:
    """What a scrape reads: the latest statistics per namespace inode, and the poller's counts."""

    stats: dict[int, NetStats] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_REASONS, 0))
    # CPU time the poller thread spent reading, in total.
    cpu_seconds: float = 0.0
    passes: int = 0


class ProcNetPoller:
    """A thread reading every watched namespace's statistics once per ``interval``, spread evenly.

    ``view`` gives the daemon's model (which namespaces exist), ``path_of``
    the file namespace ``inode`` was opened from (None for the host, read
    where the thread already is). A namespace that goes between the two is
    an ``enter`` error, counted and logged once per reason, never raised.
    """

    def __init__(
        self,
        view: Callable[[], Model],
        path_of: Callable[[int], str | None],
        interval: float = DEFAULT_INTERVAL,
        proc: str = "/proc",
    ) -> None:
        self._view = view
        self._path_of = path_of
        self.interval = interval
        self._proc = proc
        self._lock = threading.Lock()
        self._stats: dict[int, NetStats] = {}
        self._errors = dict.fromkeys(ERROR_REASONS, 0)
        self._cpu = 0.0
        self._passes = 0
        self._logged: set[str] = set()
        self._stop = threading.Event()
        # Set by stop() and set_interval(): a wait for the next read ends early.
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._enterer: NetnsEnterer | None = None
        self._log = structlog.get_logger("nswatch.procnet")

    # -- lifecycle --

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nswatch-procnet", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def set_interval(self, interval: float) -> None:
        """Read every namespace once per ``interval`` seconds from now on (a reload).

        A pass under way spreads what it has left over the new interval, so
        going from an hour to 30 s does not wait out the hour.
        """
        self.interval = interval
        self._wake.set()

    def snapshot(self) -> ProcNetSnapshot:
        """A copy of the latest statistics and counts (any thread)."""
        with self._lock:
            return ProcNetSnapshot(dict(self._stats), dict(self._errors), self._cpu, self._passes)

    # -- the work --

    def _run(self) -> None:
        self._enterer = NetnsEnterer()
        # The first pass reads everything at once, so that figures are there
        # from the first scrapes; later ones are spread over the interval.
        spread = 0.0
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                self.poll_once(spread=spread)
                spread = self.interval
                # A pass with nothing to read still waits a whole interval.
                while not self._stop.is_set():
                    left = self.interval - (time.monotonic() - start)
                    if left <= 0 or not self._wake.wait(left):
                        break
                    self._wake.clear()  # a new interval: measure against it
        finally:
            self._enterer.close()

    def poll_once(self, spread: float = 0.0) -> None:
        """Read every namespace of the model once, spreading the reads over ``spread`` seconds."""
        enterer = self._enterer
        own = enterer is None
        if enterer is None:
            enterer = NetnsEnterer()
        try:
            targets = [(ns.inode, ns.is_host) for ns in self._view().namespaces.values()]
            step = spread / len(targets) if targets else 0.0
            start = time.monotonic()
            for i, (inode, is_host) in enumerate(targets):
                while step and self._wake.wait(max(0.0, start + i * step - time.monotonic())):
                    if self._stop.is_set():
                        return
                    self._wake.clear()
                    # A new interval: the rest of the pass spreads over it from now.
                    step = self.interval / len(targets)
                    start = time.monotonic() - i * step
                cpu = time.thread_time()
                stats = self._read_one(enterer, inode, is_host)
                with self._lock:
                    if stats is not None:
                        self._stats[inode] = stats
                    self._cpu += time.thread_time() - cpu
            self._forget(inode for inode, _ in targets)
        finally:
            if own:
                enterer.close()

    def _forget(self, alive: Iterable[int]) -> None:
        """Drop the statistics of namespaces no longer watched."""
        keep = set(alive)
        with self._lock:
            for inode in [i for i in self._stats if i not in keep]:
                del self._stats[inode]
            self._passes += 1

    def _read_one(self, enterer: NetnsEnterer, inode: int, is_host: bool) -> NetStats | None:
        proc = self._proc
        if is_host:
            return self._guard("read", inode, partial(read_current, proc))
        path = self._path_of(inode)
        if path is None:
            self._error("enter", inode, FileNotFoundError(f"no file for namespace {inode}"))
            return None
        try:
            fd = enterer.open_ns(path, inode)
        except OSError as e:
            self._error("enter", inode, e)
            return None
        try:
            return self._guard(
                "read", inode, lambda: enterer.run_in(fd, partial(read_current, proc))
            )
        finally:
            os.close(fd)

    def _guard(self, reason: str, inode: int, fn: Callable[[], NetStats]) -> NetStats | None:
        try:
            return fn()
        except (OSError, ValueError) as e:
            if isinstance(e, OSError) and reason == "read" and e.filename is None:
                # setns failing inside run_in has no file name: entering failed.
                reason = "enter"
            self._error(reason, inode, e)
            return None

    def _error(self, reason: str, inode: int, err: BaseException) -> None:
        with self._lock:
            self._errors[reason] = self._errors.get(reason, 0) + 1
            if reason == "enter":
                # Gone or replaced: its last figures are no longer its own.
                self._stats.pop(inode, None)
        # A namespace going away between listing and reading is routine: one line per reason.
        if reason not in self._logged:
            self._logged.add(reason)
            self._log.warning("procnet_error", reason=reason, inode=inode, error=str(err))
