"""What every collector reads at a scrape: the model, the counters and the apply stats, frozen."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from nswatch.metrics.counters import ApplyStats, Counters, StreamStatsLike
from nswatch.metrics.family import Family, FamilySpec, sanitize
from nswatch.model import Link, Model, Namespace
from nswatch.procnet import ProcNetSnapshot


@dataclass(frozen=True, slots=True)
class NamespaceView:
    """A namespace as exported: its ``netns`` label and its links, one per name."""

    ns: Namespace
    netns: str
    # By ifindex; a name held by two links (during a rename) counts once.
    links: list[tuple[int, Link]]


@dataclass(frozen=True, slots=True)
class ScrapeView:
    """One scrape's inputs; collectors read it and never change it."""

    model: Model
    counters: Counters
    ready: bool
    apply: ApplyStats | None
    namespaces: list[NamespaceView]
    # Namespaces (and directory entries) that exist but are not watched, by reason.
    unwatched: dict[str, int]
    # The latest /proc statistics per namespace (None: no poller runs).
    procnet: ProcNetSnapshot | None = None
    # The event stream's counts (None: no stream served).
    stream: StreamStatsLike | None = None

    @classmethod
    def of(
        cls,
        model: Model,
        counters: Counters,
        ready: bool,
        apply: ApplyStats | None = None,
        unwatched: dict[str, int] | None = None,
        procnet: ProcNetSnapshot | None = None,
        stream: StreamStatsLike | None = None,
    ) -> ScrapeView:
        """The view of a model copy and a counters snapshot (the caller's own)."""
        namespaces = [_view(ns) for ns in _ns_order(model)]
        return cls(
            model, counters, ready, apply, namespaces, dict(unwatched or {}), procnet, stream
        )


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


def _view(ns: Namespace) -> NamespaceView:
    links = ns.links
    devices: set[str] = set()
    unique: list[tuple[int, Link]] = []
    for index in sorted(links):
        link = links[index]
        if link.name not in devices:
            devices.add(link.name)
            unique.append((index, link))
    return NamespaceView(ns, sanitize(ns.name), unique)


class Collector(Protocol):
    """One group of families, in node_exporter's manner.

    ``specs`` lists every family ``collect`` can yield, in the order it
    yields them, whatever the view holds (that list is the metrics contract
    the dashboard test checks).
    """

    @property
    def specs(self) -> tuple[FamilySpec, ...]: ...

    def collect(self, view: ScrapeView) -> Iterable[Family]: ...
