"""Prometheus metrics: the model as node_exporter-style series, plus the daemon's own counters.

Collectors (:mod:`.network` for the kernel's objects, :mod:`.internal` for
the daemon itself), each a class whose ``collect(view)`` yields families,
are listed in :mod:`.registry`; every family is made from a spec the
collector declares, so :func:`metric_names` is the full list of what can be
exported, whatever the model holds. A scrape reads a :class:`ScrapeView`: a
copy of the model (:meth:`Daemon.view`) and snapshots of the counters kept
by :class:`MetricsSink`, so whatever left the kernel is gone from the next
scrape. The formats are prometheus-client's, negotiated with its
``choose_encoder``; the collectors' families go through a specialised
encoder (:mod:`.encoder`) with the same bytes, the process, platform and
histogram collectors through prometheus-client's.
"""

from nswatch.metrics.counters import Counters
from nswatch.metrics.encoder import FastEncoder, fast_encoder
from nswatch.metrics.family import Family, FamilySpec, MetricType, sanitize
from nswatch.metrics.registry import COLLECTORS, collect, metric_names
from nswatch.metrics.sink import MetricsSink, ModelCollector
from nswatch.metrics.view import Collector, NamespaceView, ScrapeView

__all__ = [
    "COLLECTORS",
    "Collector",
    "Counters",
    "Family",
    "FamilySpec",
    "FastEncoder",
    "MetricType",
    "MetricsSink",
    "ModelCollector",
    "NamespaceView",
    "ScrapeView",
    "collect",
    "fast_encoder",
    "metric_names",
    "sanitize",
]
