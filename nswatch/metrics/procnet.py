"""node_exporter's sockstat, netstat and conntrack series for every namespace.

See :mod:`nswatch.procnet` for how they are read.

The statistics are read by the poller on its own schedule; a scrape only
exports the latest read of each namespace still in the view, so a namespace
that went is gone from the next scrape, and one not read yet has none.
"""

from __future__ import annotations

from collections.abc import Iterator

from nswatch.metrics.family import Family, FamilySpec
from nswatch.metrics.view import ScrapeView
from nswatch.procnet import ERROR_REASONS, NETSTAT_COUNTERS, NETSTAT_GAUGES, SOCKSTAT_FIELDS

NETNS = ("netns",)


class ProcNetCollector:
    """Per-namespace sockstat, snmp/netstat and conntrack figures, and the poller's own counts."""

    SOCKSTAT = tuple(
        (
            FamilySpec(
                f"nswatch_sockstat_{name}",
                f"Sockets: {name.replace('_', ' ')} (/proc/net/sockstat of the namespace).",
                "gauge",
                NETNS,
            ),
            name,
        )
        for name in SOCKSTAT_FIELDS
    )
    NETSTAT = tuple(
        (
            FamilySpec(
                f"nswatch_netstat_{name}_total",
                f"{name.replace('_', ' ')} (/proc/net/snmp or netstat of the namespace).",
                "counter",
                NETNS,
            ),
            name,
        )
        for name in NETSTAT_COUNTERS
    ) + tuple(
        (
            FamilySpec(
                f"nswatch_netstat_{name}",
                f"{name.replace('_', ' ')} (/proc/net/snmp of the namespace).",
                "gauge",
                NETNS,
            ),
            name,
        )
        for name in NETSTAT_GAUGES
    )
    CONNTRACK = FamilySpec(
        "nswatch_nf_conntrack_entries",
        "Connection tracking entries of the namespace (absent without the conntrack module).",
        "gauge",
        NETNS,
    )
    CONNTRACK_LIMIT = FamilySpec(
        "nswatch_nf_conntrack_entries_limit",
        "The conntrack table's size limit (nf_conntrack_max) as the namespace sees it.",
        "gauge",
        NETNS,
    )
    ERRORS = FamilySpec(
        "nswatch_procnet_errors_total",
        "Namespaces whose /proc statistics could not be read, by reason (enter, read).",
        "counter",
        ("reason",),
    )
    CPU = FamilySpec(
        "nswatch_procnet_cpu_seconds_total",
        "CPU time the /proc statistics poller spent reading namespaces.",
        "counter",
    )
    PASSES = FamilySpec(
        "nswatch_procnet_passes_total",
        "Full passes of the /proc statistics poller over every namespace.",
        "counter",
    )
    specs = (
        *(spec for spec, _ in SOCKSTAT),
        *(spec for spec, _ in NETSTAT),
        CONNTRACK,
        CONNTRACK_LIMIT,
        ERRORS,
        CPU,
        PASSES,
    )

    def collect(self, view: ScrapeView) -> Iterator[Family]:
        sockstat = [(spec.family(), name) for spec, name in self.SOCKSTAT]
        netstat = [(spec.family(), name) for spec, name in self.NETSTAT]
        entries, limit = self.CONNTRACK.family(), self.CONNTRACK_LIMIT.family()
        errors, cpu, passes = self.ERRORS.family(), self.CPU.family(), self.PASSES.family()
        snap = view.procnet
        if snap is not None:
            stats = snap.stats
            for nv in view.namespaces:
                st = stats.get(nv.ns.inode)
                if st is None:
                    continue
                key = (nv.netns,)
                for fam, name in sockstat:
                    if name in st.sockstat:
                        fam.add(key, st.sockstat[name])
                for fam, name in netstat:
                    if name in st.netstat:
                        fam.add(key, st.netstat[name])
                if st.conntrack is not None:
                    entries.add(key, st.conntrack[0])
                    limit.add(key, st.conntrack[1])
            for reason in ERROR_REASONS:
                errors.add((reason,), snap.errors.get(reason, 0))
            cpu.add((), snap.cpu_seconds)
            passes.add((), snap.passes)
        yield from (fam for fam, _ in sockstat)
        yield from (fam for fam, _ in netstat)
        yield from (entries, limit, errors, cpu, passes)
