"""Unit tests for the metrics sink over hand-built models (no kernel, no HTTP)."""

from __future__ import annotations

import gc
import gzip
import re
import tracemalloc
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as om_families,
)
from prometheus_client.parser import text_string_to_metric_families

from nswatch.metrics import (
    COLLECTORS,
    Family,
    MetricsSink,
    ScrapeView,
    collect,
    fast_encoder,
    metric_names,
)
from nswatch.metrics import sink as sink_module
from nswatch.model import (
    Address,
    AddressNew,
    Change,
    Event,
    Link,
    LinkDel,
    LinkNew,
    LinkStats,
    Model,
    NamespaceGone,
    NamespaceSeen,
    Nexthop,
    NsidLearned,
    Route,
    RouteNew,
    Synced,
)
from nswatch.procnet import (
    NETSTAT_COUNTERS,
    NETSTAT_GAUGES,
    SOCKSTAT_FIELDS,
    NetStats,
    ProcNetSnapshot,
)
from nswatch.render_cache import Document
from nswatch.stream import StreamStats
from tests.bench.bench_metrics import synthetic_sink

OM = "application/openmetrics-text; version=1.0.0; charset=utf-8"
Key = tuple[str, tuple[tuple[str, str], ...]]
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
HOST, NS_A, NS_B = 1, 4026532001, 4026532002


def parse(body: bytes, openmetrics: bool = False) -> dict[Key, float]:
    """Every sample of a scrape, keyed by (name, sorted labels); fails on duplicates or bad labels."""
    text = body.decode("utf-8")
    fams = om_families(text) if openmetrics else text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
    out: dict[Key, float] = {}
    for fam in fams:
        for s in fam.samples:
            for k, v in s.labels.items():
                assert LABEL_NAME.match(k), (s.name, k)
                assert isinstance(v, str), (s.name, k, v)
                v.encode("utf-8")
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def pick(series: dict[Key, float], name: str, **labels: str) -> dict[Key, float]:
    """The series called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return {k: v for k, v in series.items() if k[0] == name and want <= set(k[1])}


def one(series: dict[Key, float], name: str, **labels: str) -> float:
    """The value of the only series ``name`` with ``labels``."""
    found = pick(series, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return next(iter(found.values()))


def lab(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


STATS = LinkStats(1000, 2000, 10, 20, 1, 2, 3, 4)
# Every field different, so a sum or a swap shows.
FULL_STATS = LinkStats(*(2**i for i in range(24)))


def base_events() -> list[Event]:
    """The host with lo, eth0 and one veth end; namespace "nswM-a.b" with the other end and a route."""
    return [
        NamespaceSeen(HOST, ("host",), is_host=True),
        NamespaceSeen(NS_A, ("nswM-a.b",)),
        LinkNew(HOST, Link(1, "lo", "loopback", "00:00:00:00:00:00", 65536, True, "UNKNOWN")),
        LinkNew(
            HOST, Link(2, "eth0", "device", "52:54:00:12:34:56", 1500, True, "UP", stats=STATS)
        ),
        NsidLearned(HOST, 7, NS_A),
        NsidLearned(NS_A, 0, HOST),
        LinkNew(HOST, Link(30, "v-h.1", "veth", "02:00:00:00:00:01", 1500, True, "UP", None, 2, 7)),
        LinkNew(NS_A, Link(1, "lo", "loopback", "00:00:00:00:00:00", 65536, False, "DOWN")),
        LinkNew(
            NS_A,
            Link(2, "e-th.0", "veth", "02:00:00:00:00:02", 9000, True, "UP", None, 30, 0, STATS),
        ),
        AddressNew(NS_A, Address(2, "inet", "198.18.0.2", 30)),
        AddressNew(NS_A, Address(2, "inet6", "2001:db8::2", 64)),
        AddressNew(NS_A, Address(2, "inet6", "fe80::2", 64, "link")),
        RouteNew(NS_A, Route(254, "inet", "unicast", "default", gateway="198.18.0.1", dev=2)),
        RouteNew(NS_A, Route(254, "inet", "unicast", "198.18.0.0/30", dev=2, scope="link")),
        RouteNew(NS_A, Route(255, "inet", "local", "198.18.0.2/32", dev=2, scope="host")),
        RouteNew(NS_A, Route(254, "inet6", "unicast", "2001:db8::/64", dev=2, priority=256)),
        Synced(HOST),
        Synced(NS_A),
    ]


class Harness:
    """A model plus a sink fed with the model's changes, as the daemon does."""

    def __init__(self, events: Iterable[Event] = (), ready: bool = True) -> None:
        self.model = Model()
        self.ready = ready
        self.sink = MetricsSink(view=self.model.copy, ready=lambda: self.ready)
        self.apply(events, "initial")

    def apply(self, events: Iterable[Event], reason: str | None = None) -> list[Change]:
        changes: list[Change] = []
        for ev in events:
            changes += self.model.apply(ev)
        self.sink.changes(changes, reason)
        return changes

    def scrape(self, accept: str | None = None) -> dict[Key, float]:
        body, ctype = self.sink.render(accept)
        om = ctype.startswith("application/openmetrics-text")
        return parse(body, openmetrics=om)


GOLDEN = Path(__file__).resolve().parent / "data" / "metrics"
# build_info's values depend on the installation, not on the model.
BUILD_INFO = re.compile(rb"^nswatch_build_info\{[^}]*\} 1(\.0)?$", re.MULTILINE)
# prometheus-client before 0.25 writes exponents of 10 and more as "e+010"
# (Prometheus reads both); the golden files hold today's "e+10".
OLD_EXPONENT = re.compile(rb"e\+0(\d{2,})\b")


def rich_harness() -> Harness:
    """A model touching every branch of every collector, plus counters and apply stats."""
    h = Harness(base_events())
    weird = 'nswM "q" \\ \n é \udcff'
    h.apply(
        [
            NamespaceSeen(NS_B, ("host",)),
            LinkNew(NS_B, Link(1, "lo", "loopback")),
            NamespaceSeen(4026532003, ("nswM-a.b",)),
            NamespaceSeen(4026532004, (weird,)),
            LinkNew(4026532004, Link(1, 'a"b\\c.d-e', "veth", "02:00:00:00:00:01")),
            LinkNew(4026532004, Link(2, "ünï", "dummy", mtu=1400)),
            LinkNew(4026532004, Link(3, "ünï", "dummy")),
            LinkNew(HOST, Link(40, "nswM-br0", "bridge", "02:00:00:00:00:40", 1500, True, "UP")),
            LinkNew(
                HOST,
                Link(41, "nswM-v.x", "veth", "02:00:00:00:00:41", 1500, True, "UP", 40, 9, 99),
            ),
            LinkNew(NS_A, Link(5, "br0", "bridge")),
            LinkDel(NS_A, 5),
            LinkNew(NS_A, Link(6, "mv", "macvlan")),
            LinkDel(NS_A, 6, moved=True),
            RouteNew(
                NS_A,
                Route(254, "inet6", "unicast", "default", gateway="2001:db8::1", dev=2, priority=1),
            ),
            RouteNew(
                NS_A,
                Route(254, "inet6", "unicast", "default", gateway="2001:db8::1", dev=2, priority=2),
            ),
            RouteNew(
                NS_A,
                Route(
                    100,
                    "inet",
                    "unicast",
                    "default",
                    nexthops=(Nexthop("198.18.0.1", 2), Nexthop("198.18.0.5", None)),
                ),
            ),
            RouteNew(NS_A, Route(101, "inet", "blackhole", "default")),
            RouteNew(HOST, Route(254, "inet", "unicast", "default", dev=99)),
            # node_exporter's netclass and route series, and a lower device.
            LinkNew(
                NS_A,
                Link(
                    7,
                    "mv0",
                    "macvlan",
                    "02:00:00:00:00:07",
                    1500,
                    True,
                    "LOWERLAYERDOWN",
                    stats=FULL_STATS,
                    carrier=False,
                    carrier_changes=3,
                    carrier_up_count=1,
                    carrier_down_count=2,
                    txqlen=500,
                    flags=0x1003,
                    promiscuity=1,
                    allmulti=1,
                    ifalias='uplink "a"',
                    broadcast="ff:ff:ff:ff:ff:ff",
                    parent_index=2,
                    parent_netnsid=0,
                    ifi_type=1,
                    link_mode=1,
                    group=4,
                ),
            ),
            AddressNew(
                NS_A, Address(7, "inet6", "2001:db8::7", 64, flags=("tentative", "dadfailed"))
            ),
            RouteNew(
                NS_A,
                Route(
                    102,
                    "inet",
                    "unicast",
                    "default",
                    gateway="198.18.0.9",
                    dev=7,
                    protocol="dhcp",
                    priority=20,
                    prefsrc="198.18.0.10",
                    flags=("linkdown",),
                ),
            ),
        ],
        "reconcile",
    )
    h.apply([NamespaceSeen(4026532005, ("nswM-x",))], "periodic")
    h.apply([NamespaceSeen(4026532006, ("nswM-gone",)), NamespaceGone(4026532006)], "event")
    sink = h.sink
    sink.netlink_events({("link", "new"): 12345678901, ("route", "del"): 2, ("nsid", "new"): 1})
    sink.overrun("host")
    sink.resync("host", "overrun")
    sink.resync("host", "whatever")
    sink.processed(0.001, 1764383462.123456)
    sink.config_reloaded(False)
    sink.config_reloaded(True)
    sink.bind_apply(_FakeApply())
    sink.bind_procnet(_FakeProcNet())
    sink.bind_stream(_FakeStream())
    return h


class _FakeStream:
    """Stands in for the event stream's hub: a few clients, one dropped."""

    def stats(self) -> StreamStats:
        return StreamStats(clients=3, dropped_total=1, resyncs_total=2, last_id=1234, history=1234)


def rich_exposition(accept: str | None) -> bytes:
    """The nswatch_* part of a scrape of :func:`rich_harness`, build info's values blanked."""
    encoder, _ = choose_encoder(accept or "")
    fast = fast_encoder(encoder)
    assert fast is not None
    body = fast.encode(rich_harness().sink.families())
    body = OLD_EXPONENT.sub(rb"e+\1", body)
    return BUILD_INFO.sub(b"nswatch_build_info{BUILD} 1", body)


def test_a_scrape_is_encoded_one_family_at_a_time() -> None:
    """A scrape holds at most about twice its own size while it is made (the parts, plus one
    collector's families and the model view): it used to hold every line, then the joined
    text, then its bytes, about five times its size (55 MB at 1,000 namespaces)."""
    _, sink = synthetic_sink(300)
    sink.render(None)  # the first scrape also fills caches that stay
    gc.collect()
    tracemalloc.start()
    try:
        parts = list(sink.render_parts(None)[0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = sum(map(len, parts))
    assert size > 3_000_000
    assert peak < 2.6 * size, (peak, size)


def test_a_scrape_for_a_gzip_client_never_holds_its_text_whole() -> None:
    """Compressed as its parts are made, a scrape peaks under its own size (0.84x measured):
    nothing holds every part (2.1x), nor every label set and value string it printed (1.36x)."""
    _, sink = synthetic_sink(300)
    whole, _ = sink.render(None)
    gc.collect()
    tracemalloc.start()
    try:
        doc = Document(*sink.render_parts(None), compress=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = len(whole)
    assert size > 3_000_000
    assert peak < 1.0 * size, (peak, size)
    # The build info's and process figures move between scrapes; the network part does not.
    assert nswatch_lines(gzip.decompress(doc.gzipped())) == nswatch_lines(whole)


GOLDEN_FORMATS = {"text": "text/plain; version=0.0.4", "openmetrics": OM}


@pytest.mark.parametrize("fmt", sorted(GOLDEN_FORMATS))
def test_exposition_matches_the_golden_file(fmt: str) -> None:
    """A rich model's series render byte for byte as frozen in tests/data/metrics (names, labels, types, help, values, order)."""
    want = (GOLDEN / f"rich.{fmt}").read_bytes()
    assert rich_exposition(GOLDEN_FORMATS[fmt]) == want


# nswatch_namespace_info's owner labels, for a namespace no process was found for.
NO_OWNER = dict.fromkeys(("pid", "comm", "unit", "container_id", "pod_uid"), "")


def test_exact_series_for_a_veth_pair() -> None:
    """A host<->namespace veth pair yields exactly node_exporter-style series with the model's values."""
    h = Harness(base_events())
    s = h.scrape()
    ns = "nswM-a.b"
    assert one(s, "nswatch_namespaces") == 2
    assert one(s, "nswatch_synced") == 1
    assert pick(s, "nswatch_namespace_info") == {
        ("nswatch_namespace_info", lab(netns="host", inode=str(HOST), **NO_OWNER)): 1,
        ("nswatch_namespace_info", lab(netns=ns, inode=str(NS_A), **NO_OWNER)): 1,
    }
    info = {k[1] for k in pick(s, "nswatch_network_info", netns=ns)}
    assert info == {
        lab(
            netns=ns,
            device="lo",
            kind="loopback",
            address="00:00:00:00:00:00",
            operstate="down",
            master="",
            broadcast="",
            ifalias="",
        ),
        lab(
            netns=ns,
            device="e-th.0",
            kind="veth",
            address="02:00:00:00:00:02",
            operstate="up",
            master="",
            broadcast="",
            ifalias="",
        ),
    }
    assert all(v == 1 for v in pick(s, "nswatch_network_info").values())
    assert one(s, "nswatch_network_up", netns=ns, device="e-th.0", kind="veth") == 1
    assert one(s, "nswatch_network_up", netns=ns, device="lo", kind="loopback") == 0
    assert one(s, "nswatch_network_up", netns="host", device="lo", kind="loopback") == 0
    assert one(s, "nswatch_network_admin_up", netns=ns, device="lo") == 0
    assert one(s, "nswatch_network_admin_up", netns=ns, device="e-th.0") == 1
    assert one(s, "nswatch_network_mtu_bytes", netns=ns, device="e-th.0") == 9000
    for name, value in (
        ("receive_bytes", 1000),
        ("transmit_bytes", 2000),
        ("receive_packets", 10),
        ("transmit_packets", 20),
        ("receive_errs", 1),
        ("transmit_errs", 2),
        ("receive_drop", 3),
        ("transmit_drop", 4),
    ):
        metric = f"nswatch_network_{name}_total"
        assert one(s, metric, netns=ns, device="e-th.0") == value
        assert one(s, metric, netns="host", device="eth0") == value
        # No stats in the message: no series (not a fake 0).
        assert pick(s, metric, netns="host", device="v-h.1") == {}
        assert pick(s, metric, device="lo") == {}
    assert pick(s, "nswatch_veth_peer_info") == {
        (
            "nswatch_veth_peer_info",
            lab(
                netns="host",
                device="v-h.1",
                peer_netns=ns,
                peer_device="e-th.0",
                ifindex="30",
                peer_ifindex="2",
            ),
        ): 1,
        (
            "nswatch_veth_peer_info",
            lab(
                netns=ns,
                device="e-th.0",
                peer_netns="host",
                peer_device="v-h.1",
                ifindex="2",
                peer_ifindex="30",
            ),
        ): 1,
    }
    assert one(s, "nswatch_veth_unpaired", netns=ns) == 0
    assert one(s, "nswatch_veth_unpaired", netns="host") == 0
    assert one(s, "nswatch_network_addresses", netns=ns, device="e-th.0", family="inet") == 1
    assert one(s, "nswatch_network_addresses", netns=ns, device="e-th.0", family="inet6") == 2
    assert one(s, "nswatch_network_addresses", netns=ns, device="lo", family="inet") == 0
    assert pick(s, "nswatch_routes", netns=ns) == {
        ("nswatch_routes", lab(netns=ns, table="main", family="inet")): 2,
        ("nswatch_routes", lab(netns=ns, table="main", family="inet6")): 1,
        ("nswatch_routes", lab(netns=ns, table="local", family="inet")): 1,
    }
    assert pick(s, "nswatch_default_route_info") == {
        (
            "nswatch_default_route_info",
            lab(netns=ns, family="inet", table="main", gateway="198.18.0.1", device="e-th.0"),
        ): 1,
    }
    assert pick(s, "nswatch_network_removed_total", netns=ns) == {
        ("nswatch_network_removed_total", lab(netns=ns, kind=k, reason=r)): 0
        for k in ("loopback", "veth")
        for r in ("deleted", "namespace_deleted", "moved")
    }
    assert set(pick(s, "nswatch_network_removed_total", netns="host")) == {
        ("nswatch_network_removed_total", lab(netns="host", kind=k, reason=r))
        for k in ("loopback", "device", "veth")
        for r in ("deleted", "namespace_deleted", "moved")
    }


def test_counters_known_in_advance_start_at_zero() -> None:
    """Counters with label values known in advance are exported at 0 before any event."""
    s = Harness().scrape()
    for t in ("link", "address", "route"):
        for a in ("new", "del"):
            assert one(s, "nswatch_netlink_events_total", type=t, action=a) == 0
    for a in ("added", "removed"):
        assert one(s, "nswatch_namespace_events_total", action=a) == 0
    for k in ("link", "address", "route", "namespace"):
        assert one(s, "nswatch_reconcile_discrepancies_total", kind=k) == 0
    for r in ("overrun", "reconcile", "stalled"):
        assert one(s, "nswatch_resyncs_total", reason=r) == 0
    assert one(s, "nswatch_netlink_overruns_total") == 0
    assert one(s, "nswatch_last_event_timestamp_seconds") == 0
    assert one(s, "nswatch_event_processing_seconds_count") == 0
    assert one(s, "nswatch_namespaces") == 0
    assert one(s, "nswatch_synced") == 1  # nothing to sync yet, and "ready"
    info = pick(s, "nswatch_build_info")
    assert len(info) == 1
    assert {k for k, _ in next(iter(info))[1]} == {"version", "pyroute2_version", "python_version"}
    # prometheus-client's process and platform collectors are there too.
    assert pick(s, "python_info")
    assert pick(s, "process_cpu_seconds_total")


def test_synced_is_first_sync_done_and_each_namespace_has_its_own() -> None:
    """nswatch_synced follows the daemon's first sync and stays; nswatch_namespace_synced is per namespace."""
    events = base_events()
    h = Harness([e for e in events if not isinstance(e, Synced)], ready=False)
    assert one(h.scrape(), "nswatch_synced") == 0
    assert one(h.scrape(), "nswatch_namespace_synced", netns="host") == 0
    h.apply([Synced(HOST)])
    assert one(h.scrape(), "nswatch_namespace_synced", netns="host") == 1
    assert one(h.scrape(), "nswatch_namespace_synced", netns="nswM-a.b") == 0
    h.ready = True
    # A namespace still being read does not take the host-wide flag back to 0.
    assert one(h.scrape(), "nswatch_synced") == 1
    h.apply([Synced(NS_A)])
    assert one(h.scrape(), "nswatch_namespace_synced", netns="nswM-a.b") == 1


def test_link_deleted_counts_and_its_series_vanish() -> None:
    """Deleting a veth end counts reason="deleted" for its kind and its series leave the next scrape."""
    h = Harness(base_events())
    h.apply([LinkDel(HOST, 30)])
    s = h.scrape()
    assert one(s, "nswatch_network_removed_total", netns="host", kind="veth", reason="deleted") == 1
    assert one(s, "nswatch_network_removed_total", netns="host", kind="veth", reason="moved") == 0
    assert not pick(s, "nswatch_network_info", device="v-h.1")
    assert not pick(s, "nswatch_veth_peer_info")
    # The other end is now unpaired.
    assert one(s, "nswatch_veth_unpaired", netns="nswM-a.b") == 1
    assert one(s, "nswatch_veth_unpaired", netns="host") == 0


def test_moved_link_counts_moved() -> None:
    """A link that left for another namespace counts reason="moved" where it was."""
    h = Harness(base_events())
    h.apply([LinkDel(NS_A, 2, moved=True)])
    s = h.scrape()
    assert (
        one(s, "nswatch_network_removed_total", netns="nswM-a.b", kind="veth", reason="moved") == 1
    )
    assert (
        one(s, "nswatch_network_removed_total", netns="nswM-a.b", kind="veth", reason="deleted")
        == 0
    )


def test_namespace_deleted_drops_every_series_of_it() -> None:
    """A deleted namespace loses every series with its netns label; the host end of its veth counts namespace_deleted under host."""
    h = Harness(base_events())
    h.apply([LinkDel(NS_A, 1)])  # a count that must vanish with the namespace
    h.apply([NamespaceGone(NS_A)], "event")
    s = h.scrape()
    assert not [k for k in s if ("netns", "nswM-a.b") in k[1]]
    assert not [k for k in s if ("peer_netns", "nswM-a.b") in k[1]]
    assert one(s, "nswatch_namespace_events_total", action="removed") == 1
    assert one(s, "nswatch_namespace_events_total", action="added") == 2
    assert one(s, "nswatch_veth_unpaired", netns="host") == 1
    # The kernel then destroys the host end: a consequence, not an outage.
    h.apply([LinkDel(HOST, 30)])
    s = h.scrape()
    assert (
        one(
            s,
            "nswatch_network_removed_total",
            netns="host",
            kind="veth",
            reason="namespace_deleted",
        )
        == 1
    )
    assert one(s, "nswatch_network_removed_total", netns="host", kind="veth", reason="deleted") == 0
    # A namespace coming back under the same name starts from zero.
    h.apply([NamespaceSeen(NS_B, ("nswM-a.b",)), LinkNew(NS_B, Link(1, "lo", "loopback"))])
    s = h.scrape()
    assert all(v == 0 for v in pick(s, "nswatch_network_removed_total", netns="nswM-a.b").values())


def test_removal_counters_exist_only_for_kinds_seen() -> None:
    """Removal counters appear per kind seen in a namespace, and stay (at their count) after the last one goes."""
    h = Harness(base_events())
    s = h.scrape()
    assert not pick(s, "nswatch_network_removed_total", netns="nswM-a.b", kind="bridge")
    h.apply([LinkNew(NS_A, Link(5, "br0", "bridge")), LinkDel(NS_A, 5)])
    s = h.scrape()
    assert (
        one(s, "nswatch_network_removed_total", netns="nswM-a.b", kind="bridge", reason="deleted")
        == 1
    )
    assert (
        one(s, "nswatch_network_removed_total", netns="nswM-a.b", kind="bridge", reason="moved")
        == 0
    )


def test_renamed_namespace_keeps_its_counts() -> None:
    """Removal counts follow a namespace's inode, labelled with its current name."""
    h = Harness(base_events())
    h.apply([LinkDel(NS_A, 1)])
    h.apply([NamespaceSeen(NS_A, ("nswM-c",))])
    s = h.scrape()
    assert (
        one(s, "nswatch_network_removed_total", netns="nswM-c", kind="loopback", reason="deleted")
        == 1
    )
    assert not [k for k in s if ("netns", "nswM-a.b") in k[1]]


def test_reconcile_and_periodic_discrepancies() -> None:
    """Changes found by a reconcile count by kind; namespaces found by a periodic rescan count as kind="namespace"; first syncs count nothing."""
    h = Harness(base_events())
    s = h.scrape()
    assert sum(pick(s, "nswatch_reconcile_discrepancies_total").values()) == 0
    h.apply(
        [
            AddressNew(NS_A, Address(1, "inet", "198.18.1.1", 32)),
            RouteNew(NS_A, Route(254, "inet", "unicast", "198.18.9.0/24", dev=2)),
            LinkDel(NS_A, 1),
        ],
        "reconcile",
    )
    h.apply([NamespaceSeen(NS_B, ("nswM-x",))], "periodic")
    h.apply([NamespaceSeen(4026532003, ("nswM-y",))], "event")
    s = h.scrape()
    assert one(s, "nswatch_reconcile_discrepancies_total", kind="address") == 1
    assert one(s, "nswatch_reconcile_discrepancies_total", kind="route") == 1
    # The link's removal also drops its address and route silently (one change).
    assert one(s, "nswatch_reconcile_discrepancies_total", kind="link") == 1
    assert one(s, "nswatch_reconcile_discrepancies_total", kind="namespace") == 1
    assert one(s, "nswatch_namespace_events_total", action="added") == 4


def test_event_hooks_count() -> None:
    """netlink_events, overrun, resync and processed feed their counters, histogram and timestamp."""
    h = Harness(base_events())
    sink = h.sink
    sink.netlink_events({("link", "new"): 3, ("route", "del"): 2})
    sink.netlink_events({("link", "new"): 1, ("nsid", "new"): 1})
    sink.overrun("host")
    sink.resync("host", "overrun")
    sink.resync("host", "whatever")
    sink.processed(0.0003, 1700000000.5)
    sink.processed(0.002, 1700000001.25)
    s = h.scrape()
    assert one(s, "nswatch_netlink_events_total", type="link", action="new") == 4
    assert one(s, "nswatch_netlink_events_total", type="route", action="del") == 2
    assert one(s, "nswatch_netlink_events_total", type="address", action="new") == 0
    assert one(s, "nswatch_netlink_events_total", type="nsid", action="new") == 1
    assert one(s, "nswatch_netlink_overruns_total") == 1
    assert one(s, "nswatch_resyncs_total", reason="overrun") == 1
    assert one(s, "nswatch_resyncs_total", reason="whatever") == 1
    assert one(s, "nswatch_last_event_timestamp_seconds") == 1700000001.25
    assert one(s, "nswatch_event_processing_seconds_count") == 2
    assert one(s, "nswatch_event_processing_seconds_bucket", le="0.0005") == 1
    assert one(s, "nswatch_event_processing_seconds_bucket", le="0.0025") == 2


def test_default_routes_one_series_per_path_without_duplicates() -> None:
    """Multipath default routes give one series per nexthop, and equal paths (other metrics) one series."""
    h = Harness(base_events())
    h.apply(
        [
            RouteNew(
                NS_A,
                Route(254, "inet6", "unicast", "default", gateway="2001:db8::1", dev=2, priority=1),
            ),
            RouteNew(
                NS_A,
                Route(254, "inet6", "unicast", "default", gateway="2001:db8::1", dev=2, priority=2),
            ),
            RouteNew(
                NS_A,
                Route(
                    100,
                    "inet",
                    "unicast",
                    "default",
                    nexthops=(Nexthop("198.18.0.1", 2), Nexthop("198.18.0.5", 2)),
                ),
            ),
            RouteNew(NS_A, Route(101, "inet", "blackhole", "default")),
        ]
    )
    s = h.scrape()
    got = {
        dict(k[1])["table"] + "/" + dict(k[1]).get("gateway", "")
        for k in pick(s, "nswatch_default_route_info")
    }
    assert got == {"main/198.18.0.1", "main/2001:db8::1", "100/198.18.0.1", "100/198.18.0.5"}
    assert one(s, "nswatch_routes", netns="nswM-a.b", table="100", family="inet") == 1
    assert one(s, "nswatch_routes", netns="nswM-a.b", table="101", family="inet") == 1
    assert one(s, "nswatch_routes", netns="nswM-a.b", table="main", family="inet6") == 3


def test_unresolved_veth_and_master() -> None:
    """A veth whose peer is unknown counts as unpaired and has no peer series; a bridge port names its master."""
    h = Harness(base_events())
    h.apply(
        [
            LinkNew(HOST, Link(40, "nswM-br0", "bridge", "02:00:00:00:00:40", 1500, True, "UP")),
            LinkNew(
                HOST,
                Link(41, "nswM-v.x", "veth", "02:00:00:00:00:41", 1500, True, "UP", 40, 9, 99),
            ),
        ]
    )
    s = h.scrape()
    assert one(s, "nswatch_veth_unpaired", netns="host") == 1
    assert not pick(s, "nswatch_veth_peer_info", device="nswM-v.x")
    assert one(s, "nswatch_network_info", device="nswM-v.x", master="nswM-br0") == 1


def test_name_collisions_never_duplicate_series() -> None:
    """A namespace named like the host label, or two with one name, never yields duplicate series."""
    h = Harness(base_events())
    h.apply(
        [
            NamespaceSeen(NS_B, ("host",)),
            LinkNew(NS_B, Link(1, "lo", "loopback")),
            NamespaceSeen(4026532003, ("nswM-a.b",)),
            LinkNew(4026532003, Link(1, "lo", "loopback")),
        ]
    )
    s = h.scrape()  # parse() fails on duplicates
    assert one(s, "nswatch_namespace_info", netns="host") == 1
    assert one(s, "nswatch_namespace_info", netns="host", inode=str(HOST)) == 1


def test_awkward_label_values_round_trip() -> None:
    """Quotes, backslashes, newlines, non-ASCII and undecodable bytes in names survive both formats."""
    weird_ns = 'nswM "q" \\ \n é \udcff'
    h = Harness(
        [
            NamespaceSeen(HOST, ("host",), is_host=True),
            NamespaceSeen(NS_A, (weird_ns,)),
            LinkNew(NS_A, Link(1, 'a"b\\c.d-e', "veth", "02:00:00:00:00:01")),
            LinkNew(NS_A, Link(2, "ünï", "dummy")),
        ]
    )
    for accept in (None, OM):
        s = h.scrape(accept)
        names = {dict(k[1])["netns"] for k in pick(s, "nswatch_namespace_info")}
        assert names == {"host", 'nswM "q" \\ \n é \ufffd'}
        devices = {dict(k[1])["device"] for k in pick(s, "nswatch_network_mtu_bytes")}
        assert devices == {'a"b\\c.d-e', "ünï"}


# --- the fast encoder is prometheus-client's, byte for byte ---------------------------------


class _Fixed:
    def __init__(self, families: Sequence[Family]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for fam in self.families:
            yield fam.to_metric()


ACCEPTS = (
    None,
    "",
    "text/plain",
    "text/plain; version=0.0.4",
    "text/plain; version=1.0.0; escaping=underscores",
    "text/plain; version=1.0.0; escaping=dots",
    "text/plain; version=1.0.0; escaping=values",
    "text/plain; version=1.0.0; escaping=allow-utf-8",
    OM,
    "application/openmetrics-text",
    "application/openmetrics-text; version=0.0.1",
    "application/openmetrics-text; version=1.0.0; escaping=dots",
    "application/openmetrics-text; version=1.0.0; escaping=allow-utf-8",
    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "application/json",
)


def assert_same_bytes(families: Sequence[Family]) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    for accept in ACCEPTS:
        encoder, _ = choose_encoder(accept or "")
        fast = fast_encoder(encoder)
        assert fast is not None, accept
        want = encoder(registry)
        got = fast.encode(families)
        if fast.openmetrics:
            got += b"# EOF\n"
        assert got == want, accept


def test_fast_encoder_matches_prometheus_client_on_a_model() -> None:
    """The fast encoder gives prometheus-client's exact bytes for a model's families in every negotiable format."""
    h = Harness(base_events())
    h.sink.netlink_events({("link", "new"): 12345678901})
    h.sink.processed(0.001, 1764383462.123456)
    assert_same_bytes(h.sink.families())


label_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"]) | st.sampled_from('"\\\n.-_:'),
    min_size=1,
    max_size=12,
)
values = st.one_of(
    st.integers(min_value=0, max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=True),
    st.sampled_from([0, 1, -0.0, 0.0, True, 0.5, 1e-7, 1e22, 123456789.0, 9999999, 10000000]),
)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.tuples(st.tuples(label_text, label_text), values), max_size=8),
    scalars=st.lists(values, min_size=1, max_size=3),
)
def test_fast_encoder_matches_prometheus_client_property(
    rows: list[tuple[tuple[str, str], float]], scalars: list[float]
) -> None:
    """For any label values and numbers, the fast encoder's bytes equal prometheus-client's."""
    g = Family(
        "nswatch_test_gauge", 'doc with "quotes" \\ and\nnewline', "gauge", ("zeta", "alpha")
    )
    c = Family("nswatch_test_total", "a counter", "counter", ("netns", "device"))
    seen: set[tuple[str, str]] = set()
    for lv, v in rows:
        if lv in seen:
            continue
        seen.add(lv)
        g.add(lv, v)
        c.add(lv, abs(v))
    n = Family("nswatch_test_plain", "no labels", "gauge")
    for v in scalars[:1]:
        n.add((), v)
    assert_same_bytes([g, c, n])


def nswatch_lines(body: bytes) -> bytes:
    """The nswatch_* samples of a text scrape (the process collectors' values move)."""
    return b"".join(
        line + b"\n"
        for line in body.splitlines()
        if line.startswith(b"nswatch_") and b"_created" not in line
    )


def test_unknown_encoder_falls_back_to_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """An encoder the fast path does not know renders the sink's whole registry itself."""
    calls: list[CollectorRegistry] = []

    def future_format(registry: CollectorRegistry) -> bytes:
        calls.append(registry)
        return generate_latest(registry)

    assert fast_encoder(future_format) is None
    monkeypatch.setattr(
        sink_module, "choose_encoder", lambda accept: (future_format, "text/x-future")
    )
    h = Harness(base_events())
    body, ctype = h.sink.render("text/x-future")
    assert ctype == "text/x-future"
    assert calls == [h.sink.registry]
    s = parse(body)
    assert one(s, "nswatch_network_mtu_bytes", netns="nswM-a.b", device="e-th.0") == 9000
    assert one(s, "nswatch_event_processing_seconds_count") == 0
    assert pick(s, "process_cpu_seconds_total")
    # The same series as the fast path, from prometheus-client's encoder.
    monkeypatch.undo()
    assert nswatch_lines(body) == nswatch_lines(h.sink.render(None)[0])


def test_openmetrics_scrape_has_one_eof_and_parses() -> None:
    """An OpenMetrics scrape is one valid document ending in a single # EOF."""
    h = Harness(base_events())
    body, ctype = h.sink.render(OM)
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n") and body.count(b"# EOF") == 1
    s = parse(body, openmetrics=True)
    assert one(s, "nswatch_network_removed_total", netns="host", kind="veth", reason="deleted") == 0
    text_body, text_type = h.sink.render("text/plain; version=0.0.4")
    assert text_type.startswith("text/plain; version=0.0.4")
    assert b"# EOF" not in text_body


def test_sinks_use_their_own_registry() -> None:
    """Several sinks live side by side and none registers in prometheus-client's global registry."""
    before = set(REGISTRY._collector_to_names)
    a, b = MetricsSink(), MetricsSink()
    a.processed(0.1, 1.0)
    assert one(parse(a.render(None)[0]), "nswatch_event_processing_seconds_count") == 1
    assert one(parse(b.render(None)[0]), "nswatch_event_processing_seconds_count") == 0
    assert set(REGISTRY._collector_to_names) == before


def test_collectors_are_pure() -> None:
    """Collecting reads the model, the live counters and the apply stats without changing any of them."""
    h = rich_harness()
    counters = h.sink._counters
    apply = _FakeApply()
    before = (
        h.model.copy(),
        dict(h.model.by_name),
        counters.snapshot(),
        (dict(apply.applied), dict(apply.drift), dict(apply.last_error)),
    )
    families = collect(ScrapeView.of(h.model, counters, True, apply))
    assert sum(len(f.values) for f in families) > 100
    assert h.model.namespaces == before[0].namespaces
    assert h.model.by_name == before[1]
    assert h.model.peers == before[0].peers
    assert counters == before[2]
    assert (apply.applied, apply.drift, apply.last_error) == before[3]


def test_collectors_export_only_what_they_declare() -> None:
    """Every family a collector yields matches one of its declared specs, in order, and the rich model exercises them all."""
    h = rich_harness()
    view = h.sink.scrape_view()
    seen: set[str] = set()
    for collector in COLLECTORS:
        got = [(f.name, f.doc, f.type, f.labels) for f in collector.collect(view)]
        want = [(s.name, s.doc, s.type, s.labels) for s in collector.specs]
        assert got == want, type(collector).__name__
        seen |= {name for name, *_ in got}
    assert seen == {n for n, t in metric_names().items() if t != "histogram"}


def test_metric_names_cover_a_whole_scrape() -> None:
    """metric_names() lists every nswatch_* family of a scrape (the histogram too) with its type, and nothing else."""
    h = rich_harness()
    body, _ = h.sink.render(OM)
    parsed = om_families(body.decode("utf-8"))  # type: ignore[no-untyped-call]
    fams = {f.name: f.type for f in parsed if f.name.startswith("nswatch_")}
    # OpenMetrics names a counter without its _total.
    want = {n.removesuffix("_total") if t == "counter" else n: t for n, t in metric_names().items()}
    assert fams == want


@pytest.mark.parametrize("n", [0, 3])
def test_every_namespace_reports_unpaired(n: int) -> None:
    """Every namespace has an nswatch_veth_unpaired series, 0 when all its veths are paired."""
    events: list[Event] = [NamespaceSeen(HOST, ("host",), is_host=True)]
    events += [NamespaceSeen(NS_A + i, (f"nswM{i}",)) for i in range(n)]
    s = Harness(events).scrape()
    assert len(pick(s, "nswatch_veth_unpaired")) == n + 1
    assert one(s, "nswatch_namespaces") == n + 1


class _FakeProcNet:
    """Stands in for the /proc poller: the host without conntrack, a namespace with it, a gone one."""

    def snapshot(self) -> ProcNetSnapshot:
        full = {k: i + 1 for i, k in enumerate((*NETSTAT_COUNTERS, *NETSTAT_GAUGES))}
        return ProcNetSnapshot(
            {
                HOST: NetStats({"sockets_used": 9, "TCP_inuse": 2, "TCP6_inuse": 1}, {}, None),
                NS_A: NetStats(dict.fromkeys(SOCKSTAT_FIELDS, 3), full, (7, 262144)),
                4026532006: NetStats({"sockets_used": 1}, {}, (1, 2)),
            },
            {"enter": 2, "read": 0},
            1.5,
            4,
        )


class _FakeApply:
    """Stands in for the apply engine: ``snapshot()`` returns its stats."""

    def __init__(self) -> None:
        self.applied = {("web", "success"): 3, ("web", "failure"): 1}
        self.drift = {("nswM-a.b", "web", "route"): 2, ("nswM-a.b", "web", "link"): 0}
        self.last_error = {"nswM-a.b": "RTNETLINK answers: File exists"}
        self.evaluations = 42

    def snapshot(self) -> _FakeApply:
        return self


def test_config_reloads_and_apply_engine() -> None:
    """Config reloads count by result from 0, and the apply engine's counts, drift and failures are exported."""
    h = Harness(base_events())
    s = h.scrape()
    assert one(s, "nswatch_config_reload_total", result="success") == 0
    assert one(s, "nswatch_config_reload_total", result="failure") == 0
    assert not pick(s, "nswatch_apply_total")
    assert one(s, "nswatch_config_last_reload_success") == 1
    h.sink.config_reloaded(False)
    assert one(h.scrape(), "nswatch_config_last_reload_success") == 0
    h.sink.config_reloaded(True)
    h.sink.config_reloaded(True)
    h.sink.bind_apply(_FakeApply())
    for accept in (None, OM):
        s = h.scrape(accept)
        assert one(s, "nswatch_config_reload_total", result="success") == 2
        assert one(s, "nswatch_config_reload_total", result="failure") == 1
        assert one(s, "nswatch_config_last_reload_success") == 1
        assert one(s, "nswatch_apply_total", profile="web", result="success") == 3
        assert one(s, "nswatch_apply_total", profile="web", result="failure") == 1
        assert one(s, "nswatch_drift_objects", netns="nswM-a.b", profile="web", kind="route") == 2
        assert one(s, "nswatch_drift_objects", netns="nswM-a.b", profile="web", kind="link") == 0
        assert one(s, "nswatch_apply_failing", netns="nswM-a.b") == 1
    assert_same_bytes(h.sink.families())


if __name__ == "__main__":
    # Re-freezes the golden files: only for a deliberate change of the exposition.
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for name, accept in GOLDEN_FORMATS.items():
        (GOLDEN / f"rich.{name}").write_bytes(rich_exposition(accept))


def test_internal_errors_count_bugs_by_place_not_kernel_errors() -> None:
    """nswatch_internal_errors_total counts exceptions that are bugs, by where they were caught, from 0; OSErrors are not bugs."""
    h = Harness(base_events())
    s = h.scrape()
    assert one(s, "nswatch_internal_errors_total", where="observer") == 0
    h.sink.error(None, "observer:LogObserver.changes", KeyError("x"))
    h.sink.error(None, "timer:rescan", ValueError("y"))
    h.sink.error("ns", "netlink_read", OSError(105, "ENOBUFS"))
    s = h.scrape()
    assert one(s, "nswatch_internal_errors_total", where="observer") == 1
    assert one(s, "nswatch_internal_errors_total", where="timer") == 1
    assert one(s, "nswatch_internal_errors_total", where="netlink_session") == 0
