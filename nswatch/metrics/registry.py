"""The collectors, in exposition order, and the list of every metric they can export."""

from __future__ import annotations

from collections.abc import Iterator

from nswatch.metrics.family import Family, MetricType
from nswatch.metrics.internal import (
    PROCESSING,
    ApplyCollector,
    EventCollector,
    StatusCollector,
    StreamCollector,
)
from nswatch.metrics.network import (
    MAX_OBJECTS_PER_NAMESPACE,
    AddressCollector,
    LinkCollector,
    NamespaceCollector,
    ParentCollector,
    RemovalCollector,
    RouteCollector,
    RuleCollector,
    VethCollector,
)
from nswatch.metrics.procnet import ProcNetCollector
from nswatch.metrics.view import Collector, ScrapeView


def collectors(
    max_objects_per_namespace: int = MAX_OBJECTS_PER_NAMESPACE,
) -> tuple[Collector, ...]:
    """Every collector, in exposition order; address and route info series capped per namespace."""
    return (
        StatusCollector(),
        NamespaceCollector(),
        LinkCollector(),
        VethCollector(),
        ParentCollector(),
        AddressCollector(max_objects_per_namespace),
        RouteCollector(max_objects_per_namespace),
        RuleCollector(),
        RemovalCollector(),
        ProcNetCollector(),
        EventCollector(),
        StreamCollector(),
        ApplyCollector(),
    )


COLLECTORS: tuple[Collector, ...] = collectors()


def collect(view: ScrapeView, collectors: tuple[Collector, ...] = COLLECTORS) -> list[Family]:
    """Every collector's families for one scrape (pure: reads the view, no I/O, no locks)."""
    return list(each_family(view, collectors))


def each_family(
    view: ScrapeView, collectors: tuple[Collector, ...] = COLLECTORS
) -> Iterator[Family]:
    """:func:`collect` one collector at a time: an encoder lets each family go once written."""
    for c in collectors:
        yield from c.collect(view)


def metric_names() -> dict[str, MetricType]:
    """Every nswatch_* family nswatch can export, name -> type, whatever the model holds."""
    specs = [spec for c in COLLECTORS for spec in c.specs]
    specs.append(PROCESSING)
    return {spec.name: spec.type for spec in specs}
