"""Benchmark /metrics over a synthetic model (or, with --kernel, real namespaces).

The issue's budget: 1000 namespaces, each with a veth to the host, lo, two
addresses and a default route, render in under 0.5 s; a scrape never holds
the daemon's lock (the model copy) for more than 50 ms.

    .venv/bin/python -m tests.bench.bench_metrics [-n 1000] [--kernel [--freeze] [--switch]]

``--kernel`` (root) creates the namespaces with ``ip -batch`` (prefix nswM),
runs a real daemon over them, scrapes it over HTTP, measures how late the
event loop runs a no-op while curl scrapes (with and without address churn),
and removes everything. ``--freeze`` calls ``gc.freeze()`` after the first
sync and ``--switch`` sets a 1 ms GIL switch interval, to compare: full
garbage collections of the daemon's heap, which a scrape's allocations
make more frequent, are the main cause of pauses over 50 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as om_latest

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
    NsidLearned,
    Route,
    RouteNew,
    Synced,
    apply_all,
)
from nswatch.procnet import (
    ERROR_REASONS,
    NETSTAT_COUNTERS,
    NETSTAT_GAUGES,
    SOCKSTAT_FIELDS,
    NetStats,
    ProcNetSnapshot,
)

OM = "application/openmetrics-text; version=1.0.0; charset=utf-8"
HOST = 1


def synthetic(n: int) -> Model:
    """The host plus ``n`` namespaces, each with lo, a veth to the host, 2 addresses, a default route."""
    ev: list[Event] = [NamespaceSeen(HOST, ("host",), is_host=True)]
    st = LinkStats(123456789, 98765432, 123456, 98765, 0, 1, 2, 0)
    ev.append(LinkNew(HOST, Link(1, "lo", "loopback", "00:00:00:00:00:00", 65536, True, "UNKNOWN")))
    ev.append(LinkNew(HOST, Link(2, "eth0", "device", "52:54:00:12:34:56", 1500, True, "UP")))
    for i in range(n):
        inode = 1000 + i
        name = f"nswB{i}"
        hidx = 100 + i
        ev.append(NamespaceSeen(inode, (name,)))
        ev.append(NsidLearned(HOST, i, inode))
        ev.append(NsidLearned(inode, 0, HOST))
        mac = f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
        ev.append(
            LinkNew(HOST, Link(hidx, f"vh{i}", "veth", mac, 1500, True, "UP", None, 2, i, st))
        )
        ev.append(
            LinkNew(
                inode,
                Link(1, "lo", "loopback", "00:00:00:00:00:00", 65536, True, "UNKNOWN", stats=st),
            )
        )
        ev.append(
            LinkNew(
                inode,
                Link(2, "eth0", "veth", "02:aa:00:00:00:01", 1500, True, "UP", None, hidx, 0, st),
            )
        )
        a4 = f"198.18.{i >> 6 & 255}.{(i & 63) * 4 + 2}"
        gw = f"198.18.{i >> 6 & 255}.{(i & 63) * 4 + 1}"
        for a in (
            Address(1, "inet", "127.0.0.1", 8, "host"),
            Address(1, "inet6", "::1", 128, "host"),
            Address(2, "inet", a4, 30),
            Address(2, "inet6", f"2001:db8::{i:x}:2", 64),
        ):
            ev.append(AddressNew(inode, a))
        for r in (
            Route(254, "inet", "unicast", "default", gateway=gw, dev=2),
            Route(254, "inet", "unicast", f"{gw[:-1]}0/30", dev=2, protocol="kernel", scope="link"),
            Route(255, "inet", "local", f"{a4}/32", dev=2, protocol="kernel", scope="host"),
            Route(255, "inet", "local", "127.0.0.0/8", dev=1, protocol="kernel", scope="host"),
            Route(254, "inet6", "unicast", "2001:db8::/64", dev=2, protocol="kernel", priority=256),
            Route(255, "inet6", "local", "::1/128", dev=1, protocol="kernel", priority=0),
        ):
            ev.append(RouteNew(inode, r))
        ev.append(Synced(inode))
    ev.append(Synced(HOST))
    model = Model()
    apply_all(model, ev)
    assert len(model.peers) == 2 * n, "every veth pair resolves"
    return model


def timeit(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """(median, max) seconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times)


class SyntheticProcNet:
    """The /proc poller's figures for every namespace of ``model``, every field it keeps."""

    def __init__(self, model: Model) -> None:
        st = NetStats(
            dict.fromkeys(SOCKSTAT_FIELDS, 3),
            dict.fromkeys((*NETSTAT_COUNTERS, *NETSTAT_GAUGES), 123456),
            (42, 262144),
        )
        self._stats = dict.fromkeys(model.namespaces, st)

    def snapshot(self) -> ProcNetSnapshot:
        return ProcNetSnapshot(dict(self._stats), dict.fromkeys(ERROR_REASONS, 0), 1.0, 1)


def synthetic_sink(n: int) -> tuple[Model, MetricsSink]:
    """The synthetic model and a sink over it that has /proc figures for every namespace."""
    model = synthetic(n)
    sink = MetricsSink(view=model.copy, ready=lambda: True)
    sink.bind_procnet(SyntheticProcNet(model))
    return model, sink


def report(label: str, t: tuple[float, float], budget: float | None = None) -> bool:
    ok = budget is None or t[1] < budget
    mark = "" if budget is None else ("  OK" if ok else f"  OVER BUDGET ({budget * 1000:.0f} ms)")
    print(f"{label:<44} median {t[0] * 1000:8.1f} ms   max {t[1] * 1000:8.1f} ms{mark}")
    return ok


def bench_pure(n: int, repeat: int) -> bool:
    model, sink = synthetic_sink(n)
    body, _ = sink.render(None)
    samples = sum(1 for line in body.splitlines() if not line.startswith(b"#"))
    print(f"synthetic model: {n} namespaces, {samples} samples, {len(body) / 1e6:.1f} MB text")
    ok = report("model.copy() (held under the daemon lock)", timeit(model.copy, repeat), 0.05)
    report("build families", timeit(sink.families, repeat))
    ok &= report("GET /metrics text (render)", timeit(lambda: sink.render(None), repeat), 0.5)
    ok &= report("GET /metrics OpenMetrics (render)", timeit(lambda: sink.render(OM), repeat), 0.5)
    text: Callable[[Any], bytes] = generate_latest
    report("  prometheus-client text encoder, for scale", timeit(lambda: text(sink.registry), 3))
    om: Callable[[Any], bytes] = om_latest
    report("  prometheus-client OM encoder, for scale", timeit(lambda: om(sink.registry), 3))
    return ok


def ns_batch(ns: str, lines: list[str]) -> None:
    """`ip -n NS -batch -` (batch lines cannot carry -n)."""
    import subprocess

    text = "\n".join(lines) + "\n"
    proc = subprocess.run(
        ["ip", "-n", ns, "-batch", "-"], input=text, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ip -n {ns} -batch: {proc.stderr.strip()}")


def bench_kernel(n: int, repeat: int, freeze: bool, switch: bool) -> bool:
    import secrets
    import subprocess
    import threading
    import urllib.request

    from nswatch.daemon import Daemon, Settings
    from nswatch.dirwatch import DirWatcher
    from nswatch.http import Api, HttpServer
    from tests.kernel import Lab, ip_batch

    lab = Lab(prefix=f"nswM{secrets.token_hex(2)}")
    names = [f"{lab.prefix}b{i}" for i in range(n)]
    hosts = [f"{lab.prefix}h{i}" for i in range(n)]
    try:
        t0 = time.monotonic()
        lab.namespaces.extend(names)
        ip_batch(f"netns add {ns}" for ns in names)
        lines = []
        for ns, h in zip(names, hosts, strict=True):
            lab.host_links.append(h)
            lines += [f"link add {h} type veth peer name eth0 netns {ns}", f"link set {h} up"]
        ip_batch(lines)
        for i, ns in enumerate(names):
            a4 = f"198.18.{i >> 6 & 255}.{(i & 63) * 4 + 2}"
            gw = f"198.18.{i >> 6 & 255}.{(i & 63) * 4 + 1}"
            ns_batch(
                ns,
                [
                    "link set lo up",
                    "link set eth0 up",
                    f"addr add {a4}/30 dev eth0",
                    f"addr add 2001:db8::{i:x}:2/64 dev eth0 nodad",
                    f"route add default via {gw}",
                ],
            )
        print(f"created {n} namespaces in {time.monotonic() - t0:.1f} s")
        sink = MetricsSink()
        t0 = time.monotonic()
        daemon = Daemon(
            Settings(include=f"^{lab.prefix}", reconcile_interval=0, stats_interval=0),
            observers=[sink],
            dirwatch_factory=DirWatcher,
        )
        sink.bind(daemon)
        server = HttpServer(
            ("127.0.0.1", 0), Api(daemon.view, lambda: True, daemon.ready.is_set, sink.render)
        )
        server.start()
        daemon.start()
        try:
            assert daemon.ready.wait(120), "daemon did not sync"
            print(f"daemon synced in {time.monotonic() - t0:.1f} s")
            host, port = server.address

            def scrape(accept: str | None = None) -> bytes:
                req = urllib.request.Request(f"http://{host}:{port}/metrics")
                if accept:
                    req.add_header("Accept", accept)
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return bytes(resp.read())

            body = scrape()
            samples = sum(1 for line in body.splitlines() if not line.startswith(b"#"))
            print(f"real daemon: {len(daemon.model.namespaces)} namespaces, {samples} samples")
            ok = report("model view (copy under the lock)", timeit(daemon.view, repeat), 0.05)
            ok &= report("curl /metrics text", timeit(scrape, repeat), 0.5)
            ok &= report("curl /metrics OpenMetrics", timeit(lambda: scrape(OM), repeat), 0.5)

            # How long event handling waits while /metrics is scraped: a
            # thread asks the loop to run a no-op every 2 ms and records how
            # late it runs (GIL, the model lock, GC pauses: everything).
            churned = [0]

            def lateness(seconds: float, scrapers: int, churn: bool) -> list[float]:
                delays: list[float] = []
                stop = threading.Event()

                def hammer() -> None:
                    # An external scraper, as in production (an in-process
                    # client would compete for the GIL itself).
                    url = f"http://{host}:{port}/metrics"
                    while not stop.is_set():
                        subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True)

                def change() -> None:
                    while not stop.is_set():
                        i = churned[0]
                        churned[0] += 1
                        ns = names[i % len(names)]
                        op = "add" if (i // len(names)) % 2 == 0 else "del"
                        ns_batch(ns, [f"addr {op} 2001:db8:1::{i % len(names):x}/64 dev eth0"])

                threads = [threading.Thread(target=hammer) for _ in range(scrapers)]
                if churn:
                    threads.append(threading.Thread(target=change))
                for t in threads:
                    t.start()
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    t0 = time.perf_counter()
                    done = threading.Event()

                    def mark(t0: float = t0, done: threading.Event = done) -> None:
                        delays.append(time.perf_counter() - t0)
                        done.set()

                    daemon.wake(mark)
                    done.wait(5)
                    time.sleep(0.002)
                stop.set()
                for t in threads:
                    t.join()
                return sorted(delays)

            if freeze:
                # What the daemon could do after its first sync: keep the
                # long-lived heap out of full collections.
                import gc

                gc.freeze()
                print(f"gc.freeze(): {gc.get_freeze_count()} objects frozen")
            if switch:
                sys.setswitchinterval(0.001)
                print("sys.setswitchinterval(0.001)")
            for label, scrapers, churn in (
                ("idle", 0, False),
                ("address churn, no scraper", 0, True),
                ("1 scraper", 1, False),
                ("2 scrapers + address churn", 2, True),
            ):
                d = lateness(5.0, scrapers, churn)
                p99 = d[int(len(d) * 0.99)]
                ok &= d[-1] < 0.05
                print(
                    f"event-loop lateness, {label:<28} n={len(d):5d} median "
                    f"{statistics.median(d) * 1000:5.1f} ms  p99 {p99 * 1000:5.1f} ms  "
                    f"max {d[-1] * 1000:5.1f} ms"
                )
        finally:
            daemon.request_stop()
            if daemon.loop_thread is not None:
                daemon.loop_thread.join(5)
            server.stop()
        return ok
    finally:
        t0 = time.monotonic()
        # Deleting the namespaces destroys the veths; then whatever is left.
        text = "".join(f"netns del {ns}\n" for ns in names)
        subprocess.run(["ip", "-force", "-batch", "-"], input=text, capture_output=True, text=True)
        lab.host_links.clear()
        lab.namespaces.clear()
        lab.cleanup()
        print(f"cleaned up in {time.monotonic() - t0:.1f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", type=int, default=1000, help="namespaces (default 1000)")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--kernel", action="store_true", help="real namespaces (root)")
    p.add_argument("--freeze", action="store_true", help="gc.freeze() after the first sync")
    p.add_argument("--switch", action="store_true", help="sys.setswitchinterval(0.001)")
    args = p.parse_args()
    ok = (
        bench_kernel(args.n, args.repeat, args.freeze, args.switch)
        if args.kernel
        else bench_pure(args.n, args.repeat)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
