"""Collectors of the daemon itself: build info and sync state, its counters, the apply engine."""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Iterator

from nswatch import __version__
from nswatch.metrics.counters import RELOAD_RESULTS
from nswatch.metrics.family import Family, FamilySpec, sanitize
from nswatch.metrics.view import ScrapeView

# Read from the installed distribution: only the netlink and apply modules
# import pyroute2 itself.
try:
    _PYROUTE2_VERSION = importlib.metadata.version("pyroute2")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a dependency
    _PYROUTE2_VERSION = "unknown"

# The sink's histogram (prometheus-client's own Histogram, rendered by its
# encoder): declared here so that it belongs to the metrics contract too.
PROCESSING = FamilySpec(
    "nswatch_event_processing_seconds",
    "Time from reading a batch of netlink messages to the model being updated.",
    "histogram",
)
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


class StatusCollector:
    """Which nswatch this is, and whether its model is complete."""

    BUILD = FamilySpec(
        "nswatch_build_info",
        "nswatch's version and that of its main dependencies.",
        "gauge",
        ("version", "pyroute2_version", "python_version"),
    )
    SYNCED = FamilySpec(
        "nswatch_synced",
        "1 once the first full sync after start finished (it stays 1; see"
        " nswatch_namespace_synced for each namespace).",
        "gauge",
    )
    UNWATCHED = FamilySpec(
        "nswatch_namespaces_unwatched",
        "Namespaces (or namespace directory entries) that exist but are not watched, by reason.",
        "gauge",
        ("reason",),
    )
    specs = (BUILD, SYNCED, UNWATCHED)

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        build, synced = self.BUILD.family(), self.SYNCED.family()
        build.add((__version__, str(_PYROUTE2_VERSION), platform.python_version()), 1)
        synced.add((), 1 if view.ready else 0)
        yield build
        yield synced
        unwatched = self.UNWATCHED.family()
        for reason, n in sorted(view.unwatched.items()):
            unwatched.add((reason,), n)
        yield unwatched


class EventCollector:
    """The daemon's counters: events read, overruns, resyncs, discrepancies, config reloads."""

    NAMESPACE_EVENTS = FamilySpec(
        "nswatch_namespace_events_total",
        "Namespaces that appeared or went away.",
        "counter",
        ("action",),
    )
    NETLINK_EVENTS = FamilySpec(
        "nswatch_netlink_events_total",
        "Netlink notifications read, by type and action.",
        "counter",
        ("type", "action"),
    )
    OVERRUNS = FamilySpec(
        "nswatch_netlink_overruns_total",
        "Times the kernel dropped notifications (ENOBUFS); each forces a resync.",
        "counter",
    )
    RESYNCS = FamilySpec(
        "nswatch_resyncs_total", "Full re-dumps of a namespace, by reason.", "counter", ("reason",)
    )
    DISCREPANCIES = FamilySpec(
        "nswatch_reconcile_discrepancies_total",
        "Differences found between the model and the kernel by a periodic check.",
        "counter",
        ("kind",),
    )
    INTERNAL_ERRORS = FamilySpec(
        "nswatch_internal_errors_total",
        "Unexpected exceptions the daemon caught and survived, by where (a bug: see the log's"
        " internal_error lines).",
        "counter",
        ("where",),
    )
    LAST_EVENT = FamilySpec(
        "nswatch_last_event_timestamp_seconds",
        "Unix time the model was last updated from netlink (0: never).",
        "gauge",
    )
    RELOADS = FamilySpec(
        "nswatch_config_reload_total",
        "Config reloads (SIGHUP), by result: success, or failure (the old config stays).",
        "counter",
        ("result",),
    )
    RELOAD_OK = FamilySpec(
        "nswatch_config_last_reload_success",
        "1 when the config in use came from the last load or reload; 0 after a failed reload.",
        "gauge",
    )
    specs = (
        NAMESPACE_EVENTS,
        NETLINK_EVENTS,
        OVERRUNS,
        RESYNCS,
        DISCREPANCIES,
        INTERNAL_ERRORS,
        LAST_EVENT,
        RELOADS,
        RELOAD_OK,
    )

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        c = view.counters
        fam = self.NAMESPACE_EVENTS.family()
        for action in sorted(c.namespace_events):
            fam.add((action,), c.namespace_events[action])
        yield fam
        fam = self.NETLINK_EVENTS.family()
        for (etype, eaction), n in sorted(c.netlink_events.items()):
            fam.add((etype, eaction), n)
        yield fam
        fam = self.OVERRUNS.family()
        fam.add((), c.overruns)
        yield fam
        fam = self.RESYNCS.family()
        for reason, n in sorted(c.resyncs.items()):
            fam.add((reason,), n)
        yield fam
        fam = self.DISCREPANCIES.family()
        for dkind, n in sorted(c.discrepancies.items()):
            fam.add((dkind,), n)
        yield fam
        fam = self.INTERNAL_ERRORS.family()
        for place, n in sorted(c.internal_errors.items()):
            fam.add((place,), n)
        yield fam
        fam = self.LAST_EVENT.family()
        fam.add((), c.last_event)
        yield fam
        fam = self.RELOADS.family()
        for result in RELOAD_RESULTS:
            fam.add((result,), c.config_reloads[result])
        yield fam
        fam = self.RELOAD_OK.family()
        fam.add((), 1 if c.last_reload_ok else 0)
        yield fam


class StreamCollector:
    """The event stream (`/api/v1/events`): its clients, and those it had to drop."""

    CLIENTS = FamilySpec("nswatch_stream_clients", "Event stream clients connected.", "gauge")
    DROPPED = FamilySpec(
        "nswatch_stream_clients_dropped_total",
        "Stream clients dropped for falling behind (each got a final resync event).",
        "counter",
    )
    RESYNCS = FamilySpec(
        "nswatch_stream_resyncs_total",
        "resync events sent: a client asked for changes older than the history, or fell behind.",
        "counter",
    )
    LAST_ID = FamilySpec(
        "nswatch_stream_last_event_id",
        "The id of the newest change (the state's event_id).",
        "gauge",
    )
    HISTORY = FamilySpec(
        "nswatch_stream_history_events", "Changes held for clients that reconnect.", "gauge"
    )
    specs = (CLIENTS, DROPPED, RESYNCS, LAST_ID, HISTORY)

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        s = view.stream
        if s is None:
            return
        for spec, value in (
            (self.CLIENTS, s.clients),
            (self.DROPPED, s.dropped_total),
            (self.RESYNCS, s.resyncs_total),
            (self.LAST_ID, s.last_id),
            (self.HISTORY, s.history),
        ):
            fam = spec.family()
            fam.add((), value)
            yield fam


class ApplyCollector:
    """The apply engine's counters and drift gauges (nothing when no engine is bound)."""

    APPLIED = FamilySpec(
        "nswatch_apply_total",
        "Profile applications (setup or repair), by profile and result.",
        "counter",
        ("profile", "result"),
    )
    DRIFT = FamilySpec(
        "nswatch_drift_objects",
        "Objects a namespace's profile wants that are missing or wrong, by kind.",
        "gauge",
        ("netns", "profile", "kind"),
    )
    FAILING = FamilySpec(
        "nswatch_apply_failing",
        "1 for a namespace whose last application of its profile failed.",
        "gauge",
        ("netns",),
    )
    EVALUATIONS = FamilySpec(
        "nswatch_apply_evaluations_total",
        "Namespaces judged against their profile: it grows with changes, and stays flat when the"
        " kernel is still.",
        "counter",
    )
    specs = (APPLIED, DRIFT, FAILING, EVALUATIONS)

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        stats = view.apply
        if stats is None:
            return
        applied = self.APPLIED.family()
        for (profile, result), n in sorted(stats.applied.items()):
            applied.add((sanitize(profile), result), n)
        yield applied
        drift = self.DRIFT.family()
        for (netns, profile, kind), n in sorted(stats.drift.items()):
            drift.add((sanitize(netns), sanitize(profile), kind), n)
        yield drift
        failing = self.FAILING.family()
        for netns in sorted(stats.last_error):
            failing.add((sanitize(netns),), 1)
        yield failing
        evaluations = self.EVALUATIONS.family()
        evaluations.add((), stats.evaluations)
        yield evaluations
