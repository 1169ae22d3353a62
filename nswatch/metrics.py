"""Prometheus metrics: the model as node_exporter-style series, plus the daemon's own counters.

Series about the kernel's objects are produced at scrape time from a copy of
the model (:meth:`Daemon.view`), so whatever left the kernel is gone from the
next scrape: there is no per-event gauge bookkeeping to go stale. The only
state kept here is counters (events, removals, resyncs), in plain dicts behind
a lock, emitted by the same collector.

Exposition: prometheus-client's formats, negotiated with
:func:`prometheus_client.exposition.choose_encoder`. A scrape of 1000
namespaces is ~60 000 samples, which prometheus-client's generic encoders
format at 10-20 µs each, so the model's families are formatted here by a
specialised encoder that produces the same bytes (the tests check it against
prometheus-client's for both formats); the process, platform and histogram
collectors go through prometheus-client's encoders unchanged.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.exposition import generate_latest as _text_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as _om
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from nswatch import __version__
from nswatch.model import (
    REMOVAL_REASONS,
    Change,
    LinkAdded,
    LinkChanged,
    LinkRemoved,
    Model,
    Namespace,
    NamespaceAdded,
    NamespaceRemoved,
    NamespaceRenamed,
)
from nswatch.observer import BaseObserver
from nswatch.state import table_name

# Read from the installed distribution: only the netlink and apply modules
# import pyroute2 itself.
try:
    _PYROUTE2_VERSION = importlib.metadata.version("pyroute2")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a dependency
    _PYROUTE2_VERSION = "unknown"

NETLINK_TYPES = ("link", "address", "route")
NETLINK_ACTIONS = ("new", "del")
NAMESPACE_ACTIONS = ("added", "removed")
DISCREPANCY_KINDS = ("link", "address", "route", "namespace")
# Resync reasons the daemon reports (Observer.resync); others appear when first seen.
RESYNC_REASONS = ("overrun", "reconcile", "stalled")
FAMILIES = ("inet", "inet6")
RELOAD_RESULTS = ("success", "failure")
# Socket read -> model updated: usually well under a millisecond.
PROCESSING_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    float("inf"),
)

# (metric name, Link.stats attribute), in node_exporter's naming.
STAT_COUNTERS = (
    ("nswatch_network_receive_bytes_total", "rx_bytes"),
    ("nswatch_network_transmit_bytes_total", "tx_bytes"),
    ("nswatch_network_receive_packets_total", "rx_packets"),
    ("nswatch_network_transmit_packets_total", "tx_packets"),
    ("nswatch_network_receive_errs_total", "rx_errors"),
    ("nswatch_network_transmit_errs_total", "tx_errors"),
    ("nswatch_network_receive_drop_total", "rx_dropped"),
    ("nswatch_network_transmit_drop_total", "tx_dropped"),
)

Labels = tuple[str, ...]


@dataclass(slots=True)
class Family:
    """One metric family: row i has label values ``keys[i]`` (``labels`` order), ``values[i]``.

    Two flat lists rather than a list of pairs: a scrape makes ~60 000 rows,
    and pairs are containers the garbage collector would have to track.
    """

    name: str
    doc: str
    type: str  # "gauge" or "counter"
    labels: tuple[str, ...] = ()
    keys: list[Labels] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    @property
    def base(self) -> str:
        """The family name as OpenMetrics names it (a counter without ``_total``)."""
        if self.type == "counter" and self.name.endswith("_total"):
            return self.name[:-6]
        return self.name

    @property
    def sample_name(self) -> str:
        return self.base + "_total" if self.type == "counter" else self.name

    def add(self, labels: Labels, value: float) -> None:
        self.keys.append(labels)
        self.values.append(value)

    def to_metric(self) -> Metric:
        """The same family as a prometheus-client metric (for its encoders and registries)."""
        metric: Metric
        if self.type == "counter":
            metric = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        else:
            metric = GaugeMetricFamily(self.name, self.doc, labels=self.labels)
        sname = self.sample_name
        names = self.labels
        metric.samples = [
            Sample(sname, dict(zip(names, lv, strict=True)), v)
            for lv, v in zip(self.keys, self.values, strict=True)
        ]
        return metric


def sanitize(value: str) -> str:
    """A label value that encodes as UTF-8 (file names may carry undecodable bytes)."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class _Counters:
    """The sink's counters; every access holds :attr:`lock`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # inode -> (kind, reason) -> count. Keyed by inode so a renamed
        # namespace keeps its counts; labelled with the current name.
        self.removed: dict[int, dict[tuple[str, str], int]] = {}
        self.namespace_events = dict.fromkeys(NAMESPACE_ACTIONS, 0)
        self.netlink_events = {(t, a): 0 for t in NETLINK_TYPES for a in NETLINK_ACTIONS}
        self.overruns = 0
        self.resyncs = dict.fromkeys(RESYNC_REASONS, 0)
        self.discrepancies = dict.fromkeys(DISCREPANCY_KINDS, 0)
        self.last_event = 0.0
        self.config_reloads = dict.fromkeys(RELOAD_RESULTS, 0)
        # The daemon only starts with a valid config: 1 until a reload fails.
        self.last_reload_ok = True

    def snapshot(self) -> _Counters:
        out = _Counters()
        with self.lock:
            out.removed = {inode: dict(c) for inode, c in self.removed.items()}
            out.namespace_events = dict(self.namespace_events)
            out.netlink_events = dict(self.netlink_events)
            out.overruns = self.overruns
            out.resyncs = dict(self.resyncs)
            out.discrepancies = dict(self.discrepancies)
            out.last_event = self.last_event
            out.config_reloads = dict(self.config_reloads)
            out.last_reload_ok = self.last_reload_ok
        return out


class _ApplyStats(Protocol):
    """What :class:`nswatch.apply.ApplyStats` holds (duck-typed: no import cycle)."""

    applied: dict[tuple[str, str], int]  # (profile, result) -> n
    drift: dict[tuple[str, str, str], int]  # (netns, profile, kind) -> missing objects
    last_error: dict[str, str]  # netns -> error


class _ApplySource(Protocol):
    def snapshot(self) -> _ApplyStats: ...


class _Bindable(Protocol):
    def view(self) -> Model: ...

    @property
    def ready(self) -> threading.Event: ...


def _empty_model() -> Model:
    return Model()


class MetricsSink(BaseObserver):
    """Observer that counts the daemon's events and renders ``/metrics``.

    ``view`` returns a consistent copy of the model (``Daemon.view``) and
    ``ready`` whether the daemon finished its first sync; :meth:`bind` takes
    both from a daemon.
    """

    def __init__(
        self,
        view: Callable[[], Model] | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self._view: Callable[[], Model] = view or _empty_model
        self._ready: Callable[[], bool] = ready or (lambda: False)
        self._apply: _ApplySource | None = None
        self._counters = _Counters()
        # One scrape renders at a time: concurrent renders would only compete
        # with each other and with the event loop for the GIL.
        self._render_lock = threading.Lock()
        self.collector = ModelCollector(self)
        # Our own registries, never the global one: a process may run several
        # daemons (the tests do). ``registry`` holds everything and is what
        # prometheus-client's encoders would render; ``_std`` is the part
        # rendered by them even on the fast path.
        self.registry = CollectorRegistry(auto_describe=False)
        self._std = CollectorRegistry(auto_describe=False)
        self.processing = Histogram(
            "nswatch_event_processing_seconds",
            "Time from reading a batch of netlink messages to the model being updated.",
            buckets=PROCESSING_BUCKETS,
            registry=None,
        )
        process = ProcessCollector(registry=None)
        plat = PlatformCollector(registry=None)
        for reg in (self._std, self.registry):
            reg.register(process)
            reg.register(plat)
            reg.register(self.processing)
        self.registry.register(self.collector)

    def bind(self, daemon: _Bindable) -> None:
        """Read the model and readiness from ``daemon``."""
        self._view = daemon.view
        self._ready = daemon.ready.is_set

    def bind_apply(self, engine: _ApplySource) -> None:
        """Export what the apply engine did (``engine.snapshot()``: an ``ApplyStats``)."""
        self._apply = engine

    def config_reloaded(self, ok: bool) -> None:
        """A config reload (SIGHUP) succeeded or was refused."""
        c = self._counters
        with c.lock:
            c.config_reloads["success" if ok else "failure"] += 1
            c.last_reload_ok = ok

    # -- observer callbacks (event-loop thread) --

    def changes(self, changes: Sequence[Change], reason: str | None) -> None:
        c = self._counters
        with c.lock:
            for ch in changes:
                match ch:
                    case LinkRemoved(link=link, reason=why):
                        per_ns = self._removed_for(ch.inode, link.kind)
                        per_ns[(link.kind, why)] = per_ns.get((link.kind, why), 0) + 1
                    case LinkAdded(link=link) | LinkChanged(link=link):
                        self._removed_for(ch.inode, link.kind)
                    case NamespaceAdded() | NamespaceRemoved():
                        c.namespace_events[ch.action] += 1
                        if reason == "periodic":
                            c.discrepancies["namespace"] += 1
                        if isinstance(ch, NamespaceRemoved):
                            c.removed.pop(ch.inode, None)
                        continue
                    case NamespaceRenamed():
                        continue
                if reason == "reconcile" and ch.kind in ("link", "address", "route"):
                    c.discrepancies[ch.kind] += 1

    def _removed_for(self, inode: int, kind: str) -> dict[tuple[str, str], int]:
        """The removal counters of ``inode``, with ``kind``'s reasons initialised to 0."""
        per_ns = self._counters.removed.setdefault(inode, {})
        if (kind, REMOVAL_REASONS[0]) not in per_ns:
            for r in REMOVAL_REASONS:
                per_ns.setdefault((kind, r), 0)
        return per_ns

    def netlink_events(self, counts: Mapping[tuple[str, str], int]) -> None:
        c = self._counters
        with c.lock:
            for key, n in counts.items():
                c.netlink_events[key] = c.netlink_events.get(key, 0) + n

    def overrun(self, netns: str) -> None:
        with self._counters.lock:
            self._counters.overruns += 1

    def resync(self, netns: str, reason: str) -> None:
        c = self._counters
        with c.lock:
            c.resyncs[reason] = c.resyncs.get(reason, 0) + 1

    def processed(self, seconds: float, wall_time: float) -> None:
        self.processing.observe(seconds)
        with self._counters.lock:
            self._counters.last_event = wall_time

    # -- scraping (HTTP threads) --

    def families(self) -> list[Family]:
        """Every nswatch_* family but the histogram, from a fresh view of the model."""
        model = self._view()
        ready = self._ready()
        families = build_families(model, self._counters.snapshot(), ready)
        if self._apply is not None:
            families += apply_families(self._apply.snapshot())
        return families

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The body and content type of ``/metrics`` for this Accept header."""
        encoder, ctype = choose_encoder(accept or "")
        fast = fast_encoder(encoder)
        with self._render_lock:
            if fast is None:
                return encoder(self.registry), ctype
            std = encoder(self._std)
            om = fast.openmetrics
            if om:
                std = std.removesuffix(b"# EOF\n")
            body = fast.encode(self.families())
        return std + body + (b"# EOF\n" if om else b""), ctype


class ModelCollector:
    """prometheus-client collector of the model's families (the reference path)."""

    def __init__(self, sink: MetricsSink) -> None:
        self._sink = sink

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for fam in self._sink.families():
            yield fam.to_metric()


def _ns_order(model: Model) -> list[Namespace]:
    """Host first, then by name; a name already taken is skipped.

    Two directories may hold the same name, and a namespace may be called
    like the host label: one series each, never duplicates.
    """
    out: list[Namespace] = []
    seen: set[str] = set()
    for ns in sorted(model.namespaces.values(), key=lambda n: (not n.is_host, n.name, n.inode)):
        if ns.name in seen:
            continue
        seen.add(ns.name)
        out.append(ns)
    return out


def build_families(model: Model, c: _Counters, ready: bool) -> list[Family]:
    """The model's series and the counters, as families (pure: no I/O, no locks)."""
    build = Family(
        "nswatch_build_info",
        "nswatch's version and that of its main dependencies.",
        "gauge",
        ("version", "pyroute2_version", "python_version"),
    )
    build.add((__version__, str(_PYROUTE2_VERSION), platform.python_version()), 1)
    synced = Family("nswatch_synced", "1 once every namespace had its first full sync.", "gauge")
    synced.add((), 1 if (ready and model.synced) else 0)
    namespaces = Family("nswatch_namespaces", "Network namespaces watched.", "gauge")
    ns_info = Family(
        "nswatch_namespace_info", "A watched network namespace.", "gauge", ("netns", "inode")
    )
    info = Family(
        "nswatch_network_info",
        "Non-numeric data about a network device.",
        "gauge",
        ("netns", "device", "kind", "address", "operstate", "master"),
    )
    up = Family(
        "nswatch_network_up",
        "1 when the device's operational state is up.",
        "gauge",
        ("netns", "device", "kind"),
    )
    admin_up = Family(
        "nswatch_network_admin_up",
        "1 when the device is administratively up (IFF_UP).",
        "gauge",
        ("netns", "device"),
    )
    mtu = Family("nswatch_network_mtu_bytes", "The device's MTU.", "gauge", ("netns", "device"))
    stats = [
        (
            Family(
                name,
                f"Network device statistic {attr} (IFLA_STATS64).",
                "counter",
                ("netns", "device"),
            ),
            attr,
        )
        for name, attr in STAT_COUNTERS
    ]
    peer_info = Family(
        "nswatch_veth_peer_info",
        "Which veth end pairs with which (one series for each end).",
        "gauge",
        ("netns", "device", "peer_netns", "peer_device"),
    )
    unpaired = Family(
        "nswatch_veth_unpaired",
        "Veth ends whose peer is not resolved.",
        "gauge",
        ("netns",),
    )
    addresses = Family(
        "nswatch_network_addresses",
        "Addresses on a device, by family.",
        "gauge",
        ("netns", "device", "family"),
    )
    routes = Family(
        "nswatch_routes", "Routes by table and family.", "gauge", ("netns", "table", "family")
    )
    default = Family(
        "nswatch_default_route_info",
        "A default route (one series per path).",
        "gauge",
        ("netns", "family", "table", "gateway", "device"),
    )
    removed = Family(
        "nswatch_network_removed_total",
        "Network devices removed, by kind and reason (deleted, namespace_deleted, moved).",
        "counter",
        ("netns", "kind", "reason"),
    )

    order = _ns_order(model)
    namespaces.add((), len(order))
    peers = model.peers
    all_ns = model.namespaces
    stat_rows = [(fam.keys.append, fam.values.append, attr) for fam, attr in stats]
    info_k, info_v = info.keys.append, info.values.append
    up_k, up_v = up.keys.append, up.values.append
    admin_k, admin_v = admin_up.keys.append, admin_up.values.append
    mtu_k, mtu_v = mtu.keys.append, mtu.values.append
    addr_k, addr_v = addresses.keys.append, addresses.values.append
    for ns in order:
        netns = sanitize(ns.name)
        ns_info.add((netns, str(ns.inode)), 1)
        links = ns.links
        inode = ns.inode
        # Address counts by (ifindex, family).
        acount: dict[tuple[int, str], int] = {}
        for a in ns.addresses.values():
            k = (a.link, a.family)
            acount[k] = acount.get(k, 0) + 1
        n_unpaired = 0
        kinds: set[str] = set()
        devices: set[str] = set()
        for index in sorted(links):
            link = links[index]
            device = link.name
            if device in devices:
                continue
            devices.add(device)
            kind = link.kind
            kinds.add(kind)
            key = (netns, device)
            master = links.get(link.master) if link.master is not None else None
            oper = link.oper_state.lower()
            info_k((netns, device, kind, link.mac or "", oper, master.name if master else ""))
            info_v(1)
            up_k((netns, device, kind))
            up_v(1 if oper == "up" else 0)
            admin_k(key)
            admin_v(1 if link.admin_up else 0)
            mtu_k(key)
            mtu_v(link.mtu)
            st = link.stats
            if st is not None:
                for add_k, add_v, attr in stat_rows:
                    add_k(key)
                    add_v(getattr(st, attr))
            for fam_name in FAMILIES:
                addr_k((netns, device, fam_name))
                addr_v(acount.get((index, fam_name), 0))
            if kind == "veth":
                ref = peers.get((inode, index))
                peer_ns = all_ns.get(ref[0]) if ref is not None else None
                peer = peer_ns.links.get(ref[1]) if (peer_ns is not None and ref) else None
                if peer_ns is None or peer is None:
                    n_unpaired += 1
                else:
                    peer_info.add((netns, device, sanitize(peer_ns.name), peer.name), 1)
        unpaired.add((netns,), n_unpaired)
        # Routes by (table, family); the main table of both families always shows.
        rcount: dict[tuple[int, str], int] = {(254, "inet"): 0, (254, "inet6"): 0}
        defaults: set[tuple[str, str, str, str]] = set()
        for r in ns.routes.values():
            rk = (r.table, r.family)
            rcount[rk] = rcount.get(rk, 0) + 1
            if r.dst == "default" and r.type == "unicast":
                table = table_name(r.table)
                if r.nexthops:
                    for nh in r.nexthops:
                        dev = links.get(nh.dev) if nh.dev is not None else None
                        defaults.add((r.family, table, nh.gateway or "", dev.name if dev else ""))
                else:
                    dev = links.get(r.dev) if r.dev is not None else None
                    defaults.add((r.family, table, r.gateway or "", dev.name if dev else ""))
        for (table_no, fam_name), n in sorted(rcount.items()):
            routes.add((netns, table_name(table_no), fam_name), n)
        for d in sorted(defaults):
            default.add((netns, *d), 1)
        # Removals: counted ones, plus 0 for every kind present now.
        counted = c.removed.get(inode, {})
        rkinds = {k for k, _ in counted} | kinds
        for kind in sorted(rkinds):
            for reason in REMOVAL_REASONS:
                removed.add((netns, kind, reason), counted.get((kind, reason), 0))

    ns_events = Family(
        "nswatch_namespace_events_total",
        "Namespaces that appeared or went away.",
        "counter",
        ("action",),
    )
    for action in sorted(c.namespace_events):
        ns_events.add((action,), c.namespace_events[action])
    nl_events = Family(
        "nswatch_netlink_events_total",
        "Netlink notifications read, by type and action.",
        "counter",
        ("type", "action"),
    )
    for (etype, eaction), n in sorted(c.netlink_events.items()):
        nl_events.add((etype, eaction), n)
    overruns = Family(
        "nswatch_netlink_overruns_total",
        "Times the kernel dropped notifications (ENOBUFS); each forces a resync.",
        "counter",
    )
    overruns.add((), c.overruns)
    resyncs = Family(
        "nswatch_resyncs_total", "Full re-dumps of a namespace, by reason.", "counter", ("reason",)
    )
    for reason, n in sorted(c.resyncs.items()):
        resyncs.add((reason,), n)
    disc = Family(
        "nswatch_reconcile_discrepancies_total",
        "Differences found between the model and the kernel by a periodic check.",
        "counter",
        ("kind",),
    )
    for dkind, n in sorted(c.discrepancies.items()):
        disc.add((dkind,), n)
    last = Family(
        "nswatch_last_event_timestamp_seconds",
        "Unix time the model was last updated from netlink (0: never).",
        "gauge",
    )
    last.add((), c.last_event)
    reloads = Family(
        "nswatch_config_reload_total",
        "Config reloads (SIGHUP), by result: success, or failure (the old config stays).",
        "counter",
        ("result",),
    )
    for result in RELOAD_RESULTS:
        reloads.add((result,), c.config_reloads[result])
    reload_ok = Family(
        "nswatch_config_last_reload_success",
        "1 when the config in use came from the last load or reload; 0 after a failed reload.",
        "gauge",
    )
    reload_ok.add((), 1 if c.last_reload_ok else 0)
    return [
        build,
        synced,
        namespaces,
        ns_info,
        info,
        up,
        admin_up,
        mtu,
        *(fam for fam, _ in stats),
        peer_info,
        unpaired,
        addresses,
        routes,
        default,
        removed,
        ns_events,
        nl_events,
        overruns,
        resyncs,
        disc,
        last,
        reloads,
        reload_ok,
    ]


def apply_families(stats: _ApplyStats) -> list[Family]:
    """The apply engine's counters and drift gauges."""
    applied = Family(
        "nswatch_apply_total",
        "Profile applications (setup or repair), by profile and result.",
        "counter",
        ("profile", "result"),
    )
    for (profile, result), n in sorted(stats.applied.items()):
        applied.add((sanitize(profile), result), n)
    drift = Family(
        "nswatch_drift_objects",
        "Objects a namespace's profile wants that are missing or wrong, by kind.",
        "gauge",
        ("netns", "profile", "kind"),
    )
    for (netns, profile, kind), n in sorted(stats.drift.items()):
        drift.add((sanitize(netns), sanitize(profile), kind), n)
    failing = Family(
        "nswatch_apply_failing",
        "1 for a namespace whose last application of its profile failed.",
        "gauge",
        ("netns",),
    )
    for netns in sorted(stats.last_error):
        failing.add((sanitize(netns),), 1)
    return [applied, drift, failing]


# --- the fast encoder -----------------------------------------------------------


def _escape_value(v: str) -> str:
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return v


@dataclass(frozen=True)
class FastEncoder:
    """Formats families exactly as prometheus-client's encoder for one format and escaping."""

    openmetrics: bool
    escaping: str

    def _sample_name(self, fam: Family) -> str:
        name = fam.sample_name
        if self.openmetrics:
            return _om._escape(name, self.escaping, _om._is_legacy_labelname_rune)
        return _om.escape_metric_name(name, self.escaping)

    def _header(self, fam: Family) -> str:
        esc = self.escaping
        if self.openmetrics:
            name = _om.escape_metric_name(fam.base, esc)
            doc = _om._escape(fam.doc, _om.ALLOWUTF8, _om._is_legacy_labelname_rune)
            return f"# HELP {name} {doc}\n# TYPE {name} {fam.type}\n"
        name = _om.escape_metric_name(fam.sample_name, esc)
        doc = fam.doc.replace("\\", r"\\").replace("\n", r"\n")
        return f"# HELP {name} {doc}\n# TYPE {name} {fam.type}\n"

    def encode(self, families: Iterable[Family]) -> bytes:
        out: list[str] = []
        esc = self.escaping
        # Whole label sets repeat (a device's netns and name label 12
        # families), and so do integer values (0, 1, an MTU): render each
        # once. Only ints are memoised: 0.0 == -0.0 but they print apart.
        labelsets: dict[tuple[str, ...], dict[Labels, str]] = {}
        ints: dict[int, str] = {}
        go: Callable[[float], str] = floatToGoString

        def value(v: object) -> str:
            s = go(v)  # type: ignore[arg-type]
            if isinstance(v, int):
                ints[v] = s
            return s

        for fam in families:
            out.append(self._header(fam))
            sname = self._sample_name(fam)
            if not fam.labels:
                out.extend(
                    [
                        f"{sname} {(ints.get(v) if isinstance(v, int) else None) or value(v)}\n"
                        for v in fam.values
                    ]
                )
                continue
            # prometheus-client sorts the labels by name.
            order = sorted(range(len(fam.labels)), key=lambda i: fam.labels[i])
            keys = tuple(f'{_om.escape_label_name(fam.labels[i], esc)}="' for i in order)
            cache = labelsets.setdefault(keys, {})
            pairs = tuple(zip(keys, order, strict=True))

            def labelset(
                lv: Labels,
                pairs: tuple[tuple[str, int], ...] = pairs,
                cache: dict[Labels, str] = cache,
            ) -> str:
                ls = "{" + '",'.join([k + _escape_value(lv[i]) for k, i in pairs]) + '"} '
                cache[lv] = ls
                return ls

            out.extend(
                [
                    sname
                    + (cache.get(lv) or labelset(lv))
                    + ((ints.get(v) if isinstance(v, int) else None) or value(v))
                    + "\n"
                    for lv, v in zip(fam.keys, fam.values, strict=True)
                ]
            )
        return "".join(out).encode("utf-8")


_KNOWN_ESCAPINGS = (_om.UNDERSCORES, _om.DOTS, _om.VALUES, _om.ALLOWUTF8)


def fast_encoder(encoder: Callable[..., Any]) -> FastEncoder | None:
    """The fast equivalent of an encoder returned by ``choose_encoder`` (None: none known)."""
    func: Any = encoder
    kw: dict[str, Any] = {}
    if isinstance(encoder, functools.partial):
        func, kw = encoder.func, dict(encoder.keywords)
        if encoder.args:
            return None
    escaping = kw.pop("escaping", _om.UNDERSCORES)
    kw.pop("version", None)
    if kw or escaping not in _KNOWN_ESCAPINGS:
        return None
    if func is _text_latest:
        return FastEncoder(openmetrics=False, escaping=escaping)
    if func is _om.generate_latest:
        return FastEncoder(openmetrics=True, escaping=escaping)
    return None


__all__ = ["Family", "MetricsSink", "ModelCollector", "build_families"]
