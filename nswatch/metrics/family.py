"""A metric family as the collectors build it, and the spec each one is made from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

Labels = tuple[str, ...]
MetricType = Literal["gauge", "counter", "histogram"]


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


@dataclass(frozen=True, slots=True)
class FamilySpec:
    """What a collector declares it may export: a family's name, help, type and labels.

    Collectors make their families from their specs only, so the specs are the
    whole list of what nswatch can export, whatever the model holds.
    """

    name: str
    doc: str
    type: MetricType
    labels: Labels = ()

    def family(self) -> Family:
        """An empty family of this spec."""
        return Family(self.name, self.doc, self.type, self.labels)


def sanitize(value: str) -> str:
    """A label value that encodes as UTF-8 (file names may carry undecodable bytes)."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
