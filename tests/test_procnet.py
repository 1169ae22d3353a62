"""The /proc statistics parsers and the poller over fake proc trees (no root)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from nswatch.metrics import MetricsSink
from nswatch.model import Model, NamespaceGone, NamespaceSeen
from nswatch.procnet import (
    NetStats,
    ProcNetPoller,
    ProcNetSnapshot,
    parse_snmp,
    parse_sockstat,
    read_current,
)
from tests.kernel import wait_for

SOCKSTAT = """sockets: used 28
TCP: inuse 3 orphan 1 tw 20 alloc 5 mem 206
UDP: inuse 2 mem 4
UDPLITE: inuse 0
RAW: inuse 0
FRAG: inuse 1 memory 2048
"""
SOCKSTAT6 = """TCP6: inuse 4
UDP6: inuse 5
UDPLITE6: inuse 0
RAW6: inuse 0
FRAG6: inuse 0 memory 0
"""
SNMP = """Ip: Forwarding DefaultTTL InReceives
Ip: 2 64 100
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 11 12 13 14 2 15 16 17 18 19 0
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 21 22 23 24 25 26 0 0 0
"""
NETSTAT = """TcpExt: SyncookiesSent SyncookiesRecv SyncookiesFailed ListenOverflows ListenDrops TCPTimeouts TCPSynRetrans
TcpExt: 31 32 33 34 35 36 37
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 0
"""


def test_parse_sockstat() -> None:
    """sockstat and sockstat6 lines become Proto_field numbers, as node_exporter names them."""
    got = parse_sockstat(SOCKSTAT) | parse_sockstat(SOCKSTAT6)
    assert got["sockets_used"] == 28
    assert got["TCP_inuse"] == 3
    assert got["TCP_tw"] == 20
    assert got["FRAG_memory"] == 2048
    assert got["TCP6_inuse"] == 4
    assert got["UDP6_inuse"] == 5


def test_parse_snmp_pairs_header_and_value_lines() -> None:
    """snmp/netstat header and value lines pair up by protocol; negative values parse; an out-of-step file yields nothing wrong."""
    got = parse_snmp(SNMP) | parse_snmp(NETSTAT)
    assert got["Tcp_MaxConn"] == -1
    assert got["Tcp_RetransSegs"] == 17
    assert got["Tcp_CurrEstab"] == 2
    assert got["Udp_SndbufErrors"] == 26
    assert got["TcpExt_ListenOverflows"] == 34
    assert got["TcpExt_TCPSynRetrans"] == 37
    assert parse_snmp("Tcp: A B\nUdp: 1 2\n") == {}


def fake_proc(root: Path, conntrack: bool = True, ipv6: bool = True) -> Path:
    """A /proc-like tree with thread-self/net files and, optionally, conntrack sysctls."""
    net = root / "thread-self" / "net"
    net.mkdir(parents=True)
    (net / "sockstat").write_text(SOCKSTAT)
    if ipv6:
        (net / "sockstat6").write_text(SOCKSTAT6)
    (net / "snmp").write_text(SNMP)
    (net / "netstat").write_text(NETSTAT)
    if conntrack:
        nf = root / "sys" / "net" / "netfilter"
        nf.mkdir(parents=True)
        (nf / "nf_conntrack_count").write_text("7\n")
        (nf / "nf_conntrack_max").write_text("65536\n")
    return root


def test_read_current_keeps_only_exported_fields(tmp_path: Path) -> None:
    """Host-wide sockstat fields (TCP orphan/alloc/mem) are left out; conntrack is (entries, limit)."""
    st = read_current(str(fake_proc(tmp_path)))
    assert "TCP_orphan" not in st.sockstat and "TCP_mem" not in st.sockstat
    assert st.sockstat["TCP_inuse"] == 3 and st.sockstat["TCP6_inuse"] == 4
    assert "Tcp_RtoMin" not in st.netstat
    assert st.netstat["TcpExt_ListenDrops"] == 35
    assert st.conntrack == (7, 65536)


def test_missing_conntrack_and_ipv6_are_absent_not_errors(tmp_path: Path) -> None:
    """Without the conntrack module or IPv6 the files are missing: no conntrack, no TCP6, still a read."""
    st = read_current(str(fake_proc(tmp_path, conntrack=False, ipv6=False)))
    assert st.conntrack is None
    assert "TCP6_inuse" not in st.sockstat
    assert st.sockstat["TCP_inuse"] == 3


def test_poller_reads_host_counts_failures_and_forgets_gone_namespaces(tmp_path: Path) -> None:
    """The host is read in place; a namespace without a file counts an enter error; a namespace gone loses its stats."""
    model = Model()
    model.apply(NamespaceSeen(1, ("host",), is_host=True))
    model.apply(NamespaceSeen(2, ("nswJ-x",)))
    poller = ProcNetPoller(model.copy, lambda inode: None, proc=str(fake_proc(tmp_path)))
    poller.poll_once()
    snap = poller.snapshot()
    assert set(snap.stats) == {1}
    assert isinstance(snap.stats[1], NetStats)
    assert snap.errors == {"enter": 1, "read": 0}
    assert snap.passes == 1
    assert snap.cpu_seconds > 0
    model.apply(NamespaceGone(1))
    poller.poll_once()
    assert poller.snapshot().stats == {}


def test_poller_unreadable_file_is_a_read_error(tmp_path: Path) -> None:
    """A proc file that cannot be read (here: a directory) counts a read error and keeps the previous stats."""
    model = Model()
    model.apply(NamespaceSeen(1, ("host",), is_host=True))
    proc = fake_proc(tmp_path)
    poller = ProcNetPoller(model.copy, lambda inode: None, proc=str(proc))
    poller.poll_once()
    (proc / "thread-self" / "net" / "snmp").unlink()
    (proc / "thread-self" / "net" / "snmp").mkdir()
    poller.poll_once()
    snap = poller.snapshot()
    assert snap.errors["read"] == 1
    assert snap.stats[1].netstat["Tcp_RetransSegs"] == 17


@contextlib.contextmanager
def _hourly_poller(tmp_path: Path) -> Iterator[ProcNetPoller]:
    """A started poller of the host, once per hour, after its first pass; stopped after."""
    model = Model()
    model.apply(NamespaceSeen(1, ("host",), is_host=True))
    poller = ProcNetPoller(
        model.copy, lambda inode: None, interval=3600.0, proc=str(fake_proc(tmp_path))
    )
    poller.start()
    try:
        wait_for(lambda: poller.snapshot().passes >= 1, timeout=5)
        yield poller
    finally:
        poller.stop()


def test_poller_thread_reads_at_once_then_stops(tmp_path: Path) -> None:
    """The thread's first pass reads every namespace without waiting for the interval, and stop() ends it."""
    with _hourly_poller(tmp_path) as poller:
        assert 1 in poller.snapshot().stats
    assert poller._thread is not None and not poller._thread.is_alive()


class _Recorder:
    """A poller stand-in that records its lifecycle calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def snapshot(self) -> ProcNetSnapshot:
        return ProcNetSnapshot()

    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")


def test_sink_starts_the_poller_when_ready_and_stops_it_with_the_daemon() -> None:
    """The metrics sink owns the poller it is bound to: started at the first full sync, stopped at shutdown."""
    sink = MetricsSink()
    rec = _Recorder()
    sink.bind_procnet(rec)
    assert rec.calls == []
    sink.ready(Model())
    sink.stopping()
    assert rec.calls == ["start", "stop"]


def test_a_new_interval_takes_over_without_waiting_out_the_old_one(tmp_path: Path) -> None:
    """After a reload sets a shorter interval, the next pass comes within it, not after
    the hour the poller was started with (the wait is cut short and measured again)."""
    with _hourly_poller(tmp_path) as poller:
        poller.set_interval(0.2)
        wait_for(lambda: poller.snapshot().passes >= 3, timeout=5)
