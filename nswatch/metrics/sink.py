"""The observer that counts the daemon's events and renders ``/metrics``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from nswatch.metrics.counters import ApplySource, Counters, ProcNetSource, StreamSource
from nswatch.metrics.encoder import fast_encoder
from nswatch.metrics.family import Family
from nswatch.metrics.internal import PROCESSING, PROCESSING_BUCKETS
from nswatch.metrics.network import MAX_OBJECTS_PER_NAMESPACE
from nswatch.metrics.registry import collect, collectors, each_family
from nswatch.metrics.view import ScrapeView
from nswatch.model import (
    REMOVAL_REASONS,
    Change,
    LinkAdded,
    LinkChanged,
    LinkRemoved,
    Model,
    NamespaceAdded,
    NamespaceRemoved,
    NamespaceRenamed,
)
from nswatch.observer import BaseObserver, internal_place


class _Bindable(Protocol):
    def view(self) -> Model: ...
    def unwatched_counts(self) -> dict[str, int]: ...

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
        unwatched: Callable[[], dict[str, int]] | None = None,
        max_objects_per_namespace: int = MAX_OBJECTS_PER_NAMESPACE,
    ) -> None:
        self._view: Callable[[], Model] = view or _empty_model
        self._ready: Callable[[], bool] = ready or (lambda: False)
        self._unwatched: Callable[[], dict[str, int]] = unwatched or dict
        self._apply: ApplySource | None = None
        self._procnet: ProcNetSource | None = None
        self._stream: StreamSource | None = None
        self._collectors = collectors(max_objects_per_namespace)
        self._counters = Counters()
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
            PROCESSING.name, PROCESSING.doc, buckets=PROCESSING_BUCKETS, registry=None
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
        self._unwatched = daemon.unwatched_counts

    def bind_apply(self, engine: ApplySource) -> None:
        """Export what the apply engine did (``engine.snapshot()``: an ``ApplyStats``)."""
        self._apply = engine

    def bind_stream(self, hub: StreamSource) -> None:
        """Export the event stream's clients and drops (``hub.stats()``)."""
        self._stream = hub

    def bind_procnet(self, poller: ProcNetSource) -> None:
        """Export the per-namespace /proc statistics ``poller`` reads (``poller.snapshot()``).

        A poller with ``start``/``stop`` (:class:`nswatch.procnet.ProcNetPoller`)
        is started once the daemon is ready and stopped with it.
        """
        self._procnet = poller

    def ready(self, model: Model) -> None:
        start = getattr(self._procnet, "start", None)
        if start is not None:
            start()

    def stopping(self) -> None:
        stop = getattr(self._procnet, "stop", None)
        if stop is not None:
            stop()

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
                if reason == "reconcile" and ch.kind in ("link", "address", "rule", "route"):
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

    def error(self, netns: str | None, where: str, err: BaseException) -> None:
        place = internal_place(where, err)
        if place is not None:
            c = self._counters
            with c.lock:
                c.internal_errors[place] += 1

    def resync(self, netns: str, reason: str) -> None:
        c = self._counters
        with c.lock:
            c.resyncs[reason] = c.resyncs.get(reason, 0) + 1

    def processed(self, seconds: float, wall_time: float) -> None:
        self.processing.observe(seconds)
        with self._counters.lock:
            self._counters.last_event = wall_time

    # -- scraping (HTTP threads) --

    def scrape_view(self) -> ScrapeView:
        """What the collectors read: a fresh model copy and snapshots of the counters."""
        model = self._view()
        ready = self._ready()
        counters = self._counters.snapshot()
        apply = self._apply.snapshot() if self._apply is not None else None
        procnet = self._procnet.snapshot() if self._procnet is not None else None
        stream = self._stream.stats() if self._stream is not None else None
        return ScrapeView.of(model, counters, ready, apply, self._unwatched(), procnet, stream)

    def families(self) -> list[Family]:
        """Every nswatch_* family but the histogram, from a fresh view of the model."""
        return collect(self.scrape_view(), self._collectors)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The body and content type of ``/metrics`` for this Accept header."""
        parts, ctype = self.render_parts(accept)
        return b"".join(parts), ctype

    def render_parts(self, accept: str | None) -> tuple[Iterator[bytes], str]:
        """:meth:`render`'s body as it is made, one part per family.

        The parts are made as they are taken, so that a consumer that
        compresses them (the HTTP server, for a gzip client) never holds the
        whole text (11 MB at 1,000 namespaces): one scrape renders at a time,
        from the first part taken to the last.
        """
        encoder, ctype = choose_encoder(accept or "")
        return self._parts(encoder), ctype

    def _parts(self, encoder: Callable[[CollectorRegistry], bytes]) -> Iterator[bytes]:
        fast = fast_encoder(encoder)
        with self._render_lock:
            if fast is None:
                yield encoder(self.registry)
                return
            std = encoder(self._std)
            om = fast.openmetrics
            if om:
                std = std.removesuffix(b"# EOF\n")
            yield std
            yield from fast.parts(each_family(self.scrape_view(), self._collectors))
        if om:
            yield b"# EOF\n"


class ModelCollector:
    """prometheus-client collector of the model's families (the reference path)."""

    def __init__(self, sink: MetricsSink) -> None:
        self._sink = sink

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for fam in self._sink.families():
            yield fam.to_metric()
