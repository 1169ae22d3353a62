"""/metrics against real namespaces: exact series, removals and their reasons, hostile clients."""

from __future__ import annotations

import errno
import os
import secrets
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from nswatch.daemon import Daemon, Settings
from nswatch.dirwatch import DirWatcher
from nswatch.http import Api, HttpServer
from nswatch.metrics import MetricsSink
from nswatch.metrics.network import LinkCollector
from nswatch.model import Model
from nswatch.observer import BaseObserver
from nswatch.state import table_name
from tests.conftest import require_root
from tests.kernel import Lab, ip, ip_json, wait_for
from tests.test_metrics import NO_OWNER, Key, lab, one, parse, pick

pytestmark = pytest.mark.kernel

OM = "application/openmetrics-text; version=1.0.0; charset=utf-8"
STAT_NAMES = [
    f"nswatch_network_{d}_{what}_total"
    for d in ("receive", "transmit")
    for what in ("bytes", "packets", "errs", "drop")
]


class TickProbe(BaseObserver):
    """Records the longest gap between two turns of the event loop."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.longest = 0.0

    def tick(self, model: Model) -> None:
        now = time.monotonic()
        if self.last is not None:
            self.longest = max(self.longest, now - self.last)
        self.last = now


@dataclass
class Watched:
    """A daemon with the metrics sink and its HTTP API, watching only this test's namespaces."""

    lab: Lab
    daemon: Daemon
    server: HttpServer
    sink: MetricsSink
    probe: TickProbe = field(default_factory=TickProbe)

    def body(self, accept: str | None = None) -> tuple[bytes, str]:
        host, port = self.server.address
        req = urllib.request.Request(f"http://{host}:{port}/metrics")
        if accept is not None:
            req.add_header("Accept", accept)
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
            return bytes(resp.read()), str(resp.headers["Content-Type"])

    def scrape(self, accept: str | None = None) -> dict[Key, float]:
        """One scrape over HTTP, parsed (no duplicates, valid labels)."""
        body, ctype = self.body(accept)
        return parse(body, openmetrics=ctype.startswith("application/openmetrics-text"))

    def until(self, cond: object, timeout: float = 5.0) -> dict[Key, float]:
        """Scrape until ``cond(series)`` holds; return that scrape."""
        assert callable(cond)
        holder: dict[str, dict[Key, float]] = {}

        def check() -> bool:
            holder["s"] = self.scrape()
            return bool(cond(holder["s"]))

        wait_for(check, timeout=timeout, interval=0.05)
        return holder["s"]


@pytest.fixture
def watched() -> Iterator[Watched]:
    """Namespaces named nswM…, removed at the end, and a daemon watching only them (and the host)."""
    require_root()
    mlab = Lab(prefix=f"nswM{secrets.token_hex(2)}")
    try:
        sink = MetricsSink()
        probe = TickProbe()
        daemon = Daemon(
            Settings(netns_dirs=("/run/netns",), include=f"^{mlab.prefix}", reconcile_interval=0),
            observers=[sink, probe],
            dirwatch_factory=DirWatcher,
        )
        sink.bind(daemon)
        api = Api(
            view=daemon.view,
            alive=lambda: time.monotonic() - daemon.last_tick < 10,
            ready=daemon.ready.is_set,
            metrics=sink.render,
        )
        server = HttpServer(("127.0.0.1", 0), api)
        server.start()
        daemon.start()
        w = Watched(mlab, daemon, server, sink, probe)
        try:
            assert daemon.ready.wait(10), "daemon did not sync within 10 s"
            yield w
        finally:
            daemon.request_stop()
            if daemon.loop_thread is not None:
                daemon.loop_thread.join(2)
            server.stop()
    finally:
        mlab.cleanup()


def netns_series(s: dict[Key, float], netns: str) -> set[Key]:
    """Every series naming ``netns`` in any label."""
    return {k for k in s if any(v == netns for _, v in k[1])}


def kernel_route_counts(netns: str) -> dict[tuple[str, str], int]:
    """(table, family) -> routes, as `ip route show table all` sees them."""
    out: dict[tuple[str, str], int] = {}
    for family, flag in (("inet", "-4"), ("inet6", "-6")):
        for r in ip_json(netns, flag, "route", "show", "table", "all"):
            table = str(r.get("table", "main"))
            if table.isdigit():
                table = table_name(int(table))
            out[(table, family)] = out.get((table, family), 0) + 1
    return out


def make_pair(w: Watched) -> tuple[str, str, str]:
    """A namespace and a veth pair host<->namespace with a dot and a dash in both names."""
    ns = w.lab.netns("n-1.a")
    a, b = w.lab.name("h.1-a"), w.lab.name("n.1-b")
    w.lab.veth(a, b, b_ns=ns)
    # No link-local addresses: the address counts must not depend on timing.
    ip("link", "set", a, "addrgenmode", "none")
    ip("-n", ns, "link", "set", b, "addrgenmode", "none")
    ip("link", "set", a, "address", "02:4d:00:00:00:0a", "mtu", "1400", "up")
    ip("-n", ns, "link", "set", b, "address", "02:4d:00:00:00:0b", "up")
    ip("-n", ns, "addr", "add", "198.18.77.2/30", "dev", b)
    ip("-n", ns, "addr", "add", "2001:db8:4d::2/64", "dev", b, "nodad")
    ip("-n", ns, "route", "add", "default", "via", "198.18.77.1")
    return ns, a, b


def test_veth_pair_exact_series(watched: Watched) -> None:
    """A namespace with a veth to the host shows up with exactly the expected series and values, in both formats."""
    w = watched
    ns, a, b = make_pair(w)
    inode = str(os.stat(f"/run/netns/{ns}").st_ino)

    def complete(s: dict[Key, float]) -> bool:
        return bool(
            pick(s, "nswatch_default_route_info", netns=ns)
            and pick(s, "nswatch_veth_peer_info", netns=ns)
            and s.get(("nswatch_network_up", lab(netns="host", device=a, kind="veth"))) == 1
            and s.get(("nswatch_network_addresses", lab(netns=ns, device=b, family="inet6"))) == 1
        )

    s = w.until(complete)
    ia = str(ip_json(None, "link", "show", a)[0]["ifindex"])
    ib = str(ip_json(ns, "link", "show", b)[0]["ifindex"])
    assert one(s, "nswatch_synced") == 1
    assert one(s, "nswatch_namespaces") == 2
    assert pick(s, "nswatch_namespace_info", netns=ns) == {
        ("nswatch_namespace_info", lab(netns=ns, inode=inode, **NO_OWNER)): 1
    }
    assert set(pick(s, "nswatch_network_info", device=a)) == {
        (
            "nswatch_network_info",
            lab(
                netns="host",
                device=a,
                kind="veth",
                address="02:4d:00:00:00:0a",
                operstate="up",
                master="",
                broadcast="ff:ff:ff:ff:ff:ff",
                ifalias="",
            ),
        )
    }
    assert set(pick(s, "nswatch_network_info", netns=ns)) == {
        (
            "nswatch_network_info",
            lab(
                netns=ns,
                device="lo",
                kind="loopback",
                address="00:00:00:00:00:00",
                operstate="down",
                master="",
                broadcast="00:00:00:00:00:00",
                ifalias="",
            ),
        ),
        (
            "nswatch_network_info",
            lab(
                netns=ns,
                device=b,
                kind="veth",
                address="02:4d:00:00:00:0b",
                operstate="up",
                master="",
                broadcast="ff:ff:ff:ff:ff:ff",
                ifalias="",
            ),
        ),
    }
    assert one(s, "nswatch_network_up", netns=ns, device=b, kind="veth") == 1
    assert one(s, "nswatch_network_up", netns=ns, device="lo", kind="loopback") == 0
    assert one(s, "nswatch_network_admin_up", netns=ns, device=b) == 1
    assert one(s, "nswatch_network_admin_up", netns=ns, device="lo") == 0
    assert one(s, "nswatch_network_mtu_bytes", netns="host", device=a) == 1400
    assert one(s, "nswatch_network_mtu_bytes", netns=ns, device=b) == 1500
    assert one(s, "nswatch_network_mtu_bytes", netns=ns, device="lo") == 65536
    for name in STAT_NAMES:
        assert one(s, name, netns="host", device=a) >= 0
        assert one(s, name, netns=ns, device=b) >= 0
    assert pick(s, "nswatch_veth_peer_info", device=a) | pick(
        s, "nswatch_veth_peer_info", netns=ns
    ) == {
        (
            "nswatch_veth_peer_info",
            lab(
                netns="host",
                device=a,
                peer_netns=ns,
                peer_device=b,
                ifindex=ia,
                peer_ifindex=ib,
            ),
        ): 1,
        (
            "nswatch_veth_peer_info",
            lab(
                netns=ns,
                device=b,
                peer_netns="host",
                peer_device=a,
                ifindex=ib,
                peer_ifindex=ia,
            ),
        ): 1,
    }
    assert one(s, "nswatch_veth_unpaired", netns=ns) == 0
    assert pick(s, "nswatch_network_addresses", netns=ns) == {
        ("nswatch_network_addresses", lab(netns=ns, device=d, family=f)): n
        for d, f, n in (
            (b, "inet", 1),
            (b, "inet6", 1),
            ("lo", "inet", 0),
            ("lo", "inet6", 0),
        )
    }
    assert one(s, "nswatch_network_addresses", netns="host", device=a, family="inet6") == 0
    routes = {
        (dict(k[1])["table"], dict(k[1])["family"]): v
        for k, v in pick(s, "nswatch_routes", netns=ns).items()
    }
    want = {("main", "inet"): 0, ("main", "inet6"): 0, **kernel_route_counts(ns)}
    assert routes == want
    assert pick(s, "nswatch_default_route_info", netns=ns) == {
        (
            "nswatch_default_route_info",
            lab(netns=ns, family="inet", table="main", gateway="198.18.77.1", device=b),
        ): 1
    }
    assert pick(s, "nswatch_network_removed_total", netns=ns) == {
        ("nswatch_network_removed_total", lab(netns=ns, kind=k, reason=r)): 0
        for k in ("loopback", "veth")
        for r in ("deleted", "namespace_deleted", "moved")
    }
    for r in ("deleted", "namespace_deleted", "moved"):
        assert pick(s, "nswatch_network_removed_total", netns="host", kind="veth", reason=r)
    assert one(s, "nswatch_namespace_events_total", action="added") >= 2
    assert one(s, "nswatch_netlink_events_total", type="link", action="new") > 0
    assert one(s, "nswatch_event_processing_seconds_count") > 0
    assert one(s, "nswatch_last_event_timestamp_seconds") > time.time() - 60
    assert pick(s, "process_resident_memory_bytes")
    # The same series in OpenMetrics (which drops nothing but adds _created).
    body, ctype = w.body(OM)
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    om = parse(body, openmetrics=True)
    assert netns_series(om, ns) == netns_series(s, ns)
    # Nothing else names the namespace: the complete list, by metric.
    per_metric: dict[str, int] = {}
    for name, _ in netns_series(s, ns):
        per_metric[name] = per_metric.get(name, 0) + 1
    # Every device family has lo's and the veth end's series, but carrier:
    # lo is down, and sysfs (so node_exporter) has no carrier for it.
    per_device = {spec.name for spec in LinkCollector.specs} - {"nswatch_network_carrier"}
    assert per_metric == {
        **dict.fromkeys(per_device, 2),
        "nswatch_network_carrier": 1,
        "nswatch_namespace_info": 1,
        "nswatch_namespace_synced": 1,
        "nswatch_veth_peer_info": 2,  # its own end, and the host end's peer_netns
        "nswatch_veth_unpaired": 1,
        "nswatch_network_addresses": 4,
        "nswatch_network_address_info": 2,
        "nswatch_network_addresses_not_exported": 1,
        "nswatch_routes": len(want),
        "nswatch_rules": 2,
        "nswatch_default_route_info": 1,
        "nswatch_default_route_linkdown": 1,
        # The default route, the /30 and the /64 (local routes are not unicast).
        "nswatch_network_route_info": 3,
        "nswatch_network_routes": 1,
        "nswatch_network_routes_not_exported": 1,
        "nswatch_network_removed_total": 6,
    }


def test_deleted_veth_counts_and_vanishes(watched: Watched) -> None:
    """Deleting a veth counts reason="deleted" for both ends and their info series vanish from the next scrape."""
    w = watched
    ns, a, b = make_pair(w)
    s = w.until(lambda s: pick(s, "nswatch_veth_peer_info", netns=ns))
    host_before = one(
        s, "nswatch_network_removed_total", netns="host", kind="veth", reason="deleted"
    )
    ip("link", "del", a)
    s = w.until(
        lambda s: (
            one(s, "nswatch_network_removed_total", netns=ns, kind="veth", reason="deleted") == 1
            and not pick(s, "nswatch_network_info", device=a)
        )
    )
    assert (
        one(s, "nswatch_network_removed_total", netns="host", kind="veth", reason="deleted")
        >= host_before + 1
    )
    assert not pick(s, "nswatch_network_info", device=b)
    assert not pick(s, "nswatch_veth_peer_info", device=a)
    assert not pick(s, "nswatch_veth_peer_info", netns=ns)
    assert not pick(s, "nswatch_network_mtu_bytes", device=b)
    assert not pick(s, "nswatch_default_route_info", netns=ns)
    assert one(s, "nswatch_network_removed_total", netns=ns, kind="veth", reason="moved") == 0
    assert (
        one(s, "nswatch_network_removed_total", netns=ns, kind="veth", reason="namespace_deleted")
        == 0
    )
    assert one(s, "nswatch_network_addresses", netns=ns, device="lo", family="inet") == 0
    assert not pick(s, "nswatch_network_addresses", device=b)


def test_deleted_namespace_drops_its_series(watched: Watched) -> None:
    """Deleting a namespace removes every series with its netns label and counts the host end as namespace_deleted."""
    w = watched
    ns, a, _ = make_pair(w)
    s = w.until(lambda s: pick(s, "nswatch_veth_peer_info", netns=ns))
    assert len(netns_series(s, ns)) > 20
    before = one(
        s, "nswatch_network_removed_total", netns="host", kind="veth", reason="namespace_deleted"
    )
    removed_before = one(s, "nswatch_namespace_events_total", action="removed")
    ip("netns", "del", ns)
    s = w.until(
        lambda s: (
            not netns_series(s, ns)
            and one(
                s,
                "nswatch_network_removed_total",
                netns="host",
                kind="veth",
                reason="namespace_deleted",
            )
            >= before + 1
        )
    )
    assert not pick(s, "nswatch_network_info", device=a)
    assert one(s, "nswatch_namespace_events_total", action="removed") >= removed_before + 1
    assert one(s, "nswatch_namespaces") == 1


def test_moved_veth_counts_moved(watched: Watched) -> None:
    """Moving a veth end to another namespace counts reason="moved" where it was and re-pairs it where it went."""
    w = watched
    n1, n2 = w.lab.netns("m1"), w.lab.netns("m2")
    x, y = w.lab.name("x.1-m"), w.lab.name("y.1-m")
    w.lab.veth(x, y, a_ns=n1, b_ns=n1)
    s = w.until(lambda s: len(pick(s, "nswatch_veth_peer_info", netns=n1)) == 2)
    ip("-n", n1, "link", "set", y, "netns", n2)
    s = w.until(
        lambda s: (
            one(s, "nswatch_network_removed_total", netns=n1, kind="veth", reason="moved") == 1
            and pick(s, "nswatch_veth_peer_info", netns=n2, device=y, peer_netns=n1, peer_device=x)
            and pick(s, "nswatch_veth_peer_info", netns=n1, device=x, peer_netns=n2, peer_device=y)
        )
    )
    assert one(s, "nswatch_network_removed_total", netns=n1, kind="veth", reason="deleted") == 0
    assert one(s, "nswatch_network_removed_total", netns=n2, kind="veth", reason="moved") == 0
    assert pick(s, "nswatch_network_info", netns=n2, device=y)
    assert not pick(s, "nswatch_network_info", netns=n1, device=y)
    assert len(pick(s, "nswatch_veth_peer_info", netns=n1)) == 1


def _raw(addr: tuple[str, int], data: bytes, half_close: bool = False) -> bytes:
    with socket.create_connection(addr, timeout=5) as sock:
        sock.sendall(data)
        if half_close:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                # The server may refuse garbage and reset the connection first.
                if e.errno != errno.ENOTCONN:
                    raise
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def test_metrics_survive_hostile_clients_without_stalling_events(watched: Watched) -> None:
    """Garbage, huge headers, half-closed and idle connections on /metrics neither break it nor stall event handling."""
    w = watched
    addr = w.server.address
    stop = threading.Event()
    errors: list[BaseException] = []

    def garbage() -> None:
        payloads = [
            b"BREW /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\n" + b"X-H: y\r\n" * 500 + b"\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),
            b"GET /metrics HTTP/1.1\r\nAccept: \xff\xfe\r\n\r\n",
            b"GET /metrics",
        ]
        try:
            while not stop.is_set():
                for p in payloads:
                    _raw(addr, p, half_close=True)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    idle = [socket.create_connection(addr, timeout=5) for _ in range(8)]
    for sock in idle:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # never finished
    threads = [threading.Thread(target=garbage) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        # Scrape in parallel with the garbage while the kernel changes.
        scrapes = threading.Thread(target=lambda: [w.scrape(OM) for _ in range(5)])
        scrapes.start()
        w.probe.longest = 0.0
        t0 = time.monotonic()
        ns = w.lab.netns("g")
        for i in range(10):
            ip("-n", ns, "link", "add", f"d.{i}-x", "type", "veth", "peer", "name", f"e.{i}-x")

        def all_seen() -> bool:
            model_ns = w.daemon.view().get(ns)
            return model_ns is not None and len(model_ns.links) == 21

        wait_for(all_seen, timeout=3, interval=0.01)
        latency = time.monotonic() - t0
        scrapes.join(30)
        assert not scrapes.is_alive()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for sock in idle:
            sock.close()
    assert not errors, errors
    assert latency < 3
    # The loop turns at least twice a second when idle; a wedged loop (not a
    # slow one: this machine is shared, timing is the benchmark's job) would
    # show here.
    assert w.probe.longest < 5.0, f"event loop stalled for {w.probe.longest:.3f} s"
    s = w.scrape()
    assert len(pick(s, "nswatch_veth_peer_info", netns=ns, peer_netns=ns)) == 20
    assert one(s, "nswatch_veth_peer_info", netns=ns, device="d.7-x", peer_device="e.7-x") == 1
