"""The /proc statistics poller in real namespaces: each namespace's own figures, and a namespace that went."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest

from nswatch.metrics import MetricsSink
from nswatch.model import Model, NamespaceSeen
from nswatch.netns import NetnsEnterer
from nswatch.procnet import ProcNetPoller
from tests.kernel import Lab, ip
from tests.test_metrics import one, parse, pick

pytestmark = pytest.mark.kernel


def overflow_listen_queue(path: str) -> list[socket.socket]:
    """In namespace ``path``: a listener never accepting, and clients until its queue overflows."""
    enterer = NetnsEnterer()
    fd = os.open(path, os.O_RDONLY)
    try:

        def make() -> list[socket.socket]:
            srv = socket.socket()
            srv.bind(("127.0.0.1", 0))
            srv.listen(1)
            socks = [srv]
            for _ in range(8):
                c = socket.socket()
                c.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    c.connect(srv.getsockname())
                socks.append(c)
            return socks

        return enterer.run_in(fd, make)
    finally:
        os.close(fd)
        enterer.close()


def test_each_namespace_reads_its_own_figures(lab: Lab) -> None:
    """A namespace whose listener overflows shows its own overflows and sockets; a quiet one shows none; conntrack is read per namespace."""
    busy, quiet = lab.netns("busy"), lab.netns("quiet")
    for ns in (busy, quiet):
        ip("-n", ns, "link", "set", "lo", "up")
    paths = {ns: f"/run/netns/{ns}" for ns in (busy, quiet)}
    inodes = {ns: os.stat(p).st_ino for ns, p in paths.items()}
    socks = overflow_listen_queue(paths[busy])
    try:
        model = Model()
        model.apply(NamespaceSeen(os.stat("/proc/self/ns/net").st_ino, ("host",), is_host=True))
        for ns, inode in inodes.items():
            model.apply(NamespaceSeen(inode, (ns,)))
        by_inode = {inode: paths[ns] for ns, inode in inodes.items()}
        poller = ProcNetPoller(model.copy, by_inode.get)
        sink = MetricsSink(view=model.copy, ready=lambda: True)
        sink.bind_procnet(poller)
        poller.poll_once()
        s = parse(sink.render(None)[0])
        assert one(s, "nswatch_netstat_TcpExt_ListenOverflows_total", netns=busy) > 0
        assert one(s, "nswatch_netstat_TcpExt_ListenOverflows_total", netns=quiet) == 0
        assert one(s, "nswatch_sockstat_TCP_inuse", netns=busy) >= 2
        assert one(s, "nswatch_sockstat_TCP_inuse", netns=quiet) == 0
        assert one(s, "nswatch_netstat_Tcp_ActiveOpens_total", netns=busy) >= 1
        assert pick(s, "nswatch_sockstat_sockets_used", netns="host")
        if os.path.exists("/proc/sys/net/netfilter/nf_conntrack_count"):
            assert one(s, "nswatch_nf_conntrack_entries_limit", netns=quiet) > 0
        assert one(s, "nswatch_procnet_errors_total", reason="enter") == 0
        # A namespace deleted between listing and reading: counted, and its figures go.
        ip("netns", "del", quiet)
        poller.poll_once()
        snap = poller.snapshot()
        assert snap.errors["enter"] == 1
        assert inodes[quiet] not in snap.stats
        assert inodes[busy] in snap.stats
    finally:
        for sock in socks:
            sock.close()
