"""The only state the metrics keep: the daemon's counters, and what the apply engine reports."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

from nswatch.observer import INTERNAL_ERROR_PLACES
from nswatch.procnet import ProcNetSnapshot

NETLINK_TYPES = ("link", "address", "rule", "route")
NETLINK_ACTIONS = ("new", "del")
NAMESPACE_ACTIONS = ("added", "removed")
DISCREPANCY_KINDS = ("link", "address", "rule", "route", "namespace")
# Resync reasons the daemon reports (Observer.resync), exported at 0 from the
# start so increase() sees the first; others appear when first seen.
RESYNC_REASONS = ("decode_error", "overrun", "reconcile", "stalled")
RELOAD_RESULTS = ("success", "failure")


@dataclass(slots=True)
class Counters:
    """The sink's counters; every access of a live instance holds :attr:`lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)
    # inode -> (kind, reason) -> count. Keyed by inode so a renamed
    # namespace keeps its counts; labelled with the current name.
    removed: dict[int, dict[tuple[str, str], int]] = field(default_factory=dict)
    namespace_events: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(NAMESPACE_ACTIONS, 0)
    )
    netlink_events: dict[tuple[str, str], int] = field(
        default_factory=lambda: {(t, a): 0 for t in NETLINK_TYPES for a in NETLINK_ACTIONS}
    )
    overruns: int = 0
    resyncs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESYNC_REASONS, 0))
    discrepancies: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(DISCREPANCY_KINDS, 0)
    )
    last_event: float = 0.0
    internal_errors: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys((*INTERNAL_ERROR_PLACES, "other"), 0)
    )
    config_reloads: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RELOAD_RESULTS, 0))
    # The daemon only starts with a valid config: 1 until a reload fails.
    last_reload_ok: bool = True

    def snapshot(self) -> Counters:
        """A copy sharing no container, taken under the lock."""
        with self.lock:
            return Counters(
                removed={inode: dict(c) for inode, c in self.removed.items()},
                namespace_events=dict(self.namespace_events),
                netlink_events=dict(self.netlink_events),
                overruns=self.overruns,
                resyncs=dict(self.resyncs),
                discrepancies=dict(self.discrepancies),
                last_event=self.last_event,
                internal_errors=dict(self.internal_errors),
                config_reloads=dict(self.config_reloads),
                last_reload_ok=self.last_reload_ok,
            )


class ApplyStats(Protocol):
    """What :class:`nswatch.apply.ApplyStats` holds (duck-typed: no import cycle)."""

    applied: dict[tuple[str, str], int]  # (profile, result) -> n
    drift: dict[tuple[str, str, str], int]  # (netns, profile, kind) -> missing objects
    last_error: dict[str, str]  # netns -> error
    evaluations: int  # namespaces judged against their profile


class ApplySource(Protocol):
    def snapshot(self) -> ApplyStats: ...


class StreamStatsLike(Protocol):
    """What :class:`nswatch.stream.StreamStats` holds (duck-typed: no import of the HTTP side)."""

    @property
    def clients(self) -> int: ...
    @property
    def dropped_total(self) -> int: ...
    @property
    def resyncs_total(self) -> int: ...
    @property
    def last_id(self) -> int: ...
    @property
    def history(self) -> int: ...


class StreamSource(Protocol):
    """The event stream's hub, as the metrics read it."""

    def stats(self) -> StreamStatsLike: ...


class ProcNetSource(Protocol):
    """What :class:`nswatch.procnet.ProcNetPoller` offers a scrape."""

    def snapshot(self) -> ProcNetSnapshot: ...
