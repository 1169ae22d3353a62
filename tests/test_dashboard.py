"""The Grafana dashboard: schema basics, data source input, template variables, and every query parses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from nswatch import metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "nswatch.json"
DS_UID = "${datasource}"
RULES = DASHBOARD.parent / "nswatch-alerts.yml"

# Every family nswatch exports (the metrics contract); each must be on the dashboard.
METRICS = set(metrics.metric_names())

# Series that are not nswatch's own: Prometheus' per-target series and alerts,
# and the process collector's.
OTHER_SERIES = {
    "ALERTS",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
}

# What Grafana puts in place of its variables: multi-valued ones as regexes
# (".*" for All), single-valued ones as the value itself.
ALL = {"cluster": ".*", "job": ".*", "instance": "a:9442", "netns": "nsA", "device": ".*"}
SINGLE = {"instance", "netns"}

# Labels with few values: an aggregation by these alone returns few series.
BOUNDED_LABELS = {
    "instance",
    "job",
    "cluster",
    "kind",
    "family",
    "table",
    "reason",
    "action",
    "type",
    "profile",
    "result",
    "le",
    "alertname",
    "alertstate",
    "severity",
    # nswatch_internal_errors_total: a handful of places.
    "where",
}
# Families with a series per device (or per route, address or veth end).
PER_DEVICE = {
    "nswatch_network_info",
    "nswatch_network_up",
    "nswatch_network_admin_up",
    "nswatch_network_mtu_bytes",
    *(
        f"nswatch_network_{d}_{s}_total"
        for d in ("receive", "transmit")
        for s in ("bytes", "packets", "errs", "drop")
    ),
    "nswatch_veth_peer_info",
    "nswatch_network_addresses",
    "nswatch_default_route_info",
    "nswatch_default_route_linkdown",
    # node_exporter's series per device, address or route, and its per-namespace
    # ones (sockstat, netstat, conntrack): reading one namespace bounds them too.
    *(
        name
        for name in METRICS
        if name.startswith(
            ("nswatch_network_", "nswatch_sockstat_", "nswatch_netstat_", "nswatch_nf_conntrack_")
        )
        and name != "nswatch_network_removed_total"
    ),
}
# Families with one series per host.
PER_HOST = {
    "nswatch_build_info",
    "nswatch_synced",
    "nswatch_namespaces",
    "nswatch_last_event_timestamp_seconds",
    "nswatch_config_last_reload_success",
    "nswatch_netlink_overruns_total",
    "nswatch_procnet_cpu_seconds_total",
    "nswatch_procnet_passes_total",
    "nswatch_event_processing_seconds_bucket",
    "nswatch_event_processing_seconds_sum",
    "nswatch_event_processing_seconds_count",
    *OTHER_SERIES,
}
RATE_UNITS = {"Bps", "bps", "pps", "ops", "short", "s"}


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' children included, rows themselves excluded."""
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def queries(dash: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query of every panel."""
    return [(p["title"], t["refId"], t["expr"]) for p in panels(dash) for t in p["targets"]]


def expand(expr: str, values: dict[str, str] | None = None, interval: str = "1m") -> str:
    """The query as Grafana sends it, for the given variable values (regexes)."""
    values = {**ALL, **(values or {})}
    out = expr.replace("$__rate_interval", interval).replace("$__interval", interval)
    out = out.replace("$__range", "1h")
    for name, value in values.items():
        # A function, so that backslashes in the value stay as they are.
        out = re.sub(rf"\$(?:{name}\b|\{{{name}\}})", _literal(value), out)
    assert "$" not in out.replace('"$1"', ""), f"unexpanded variable in {out}"
    return out


def _literal(value: str) -> Callable[[re.Match[str]], str]:
    return lambda _: value


def metric_names(expr: str) -> set[str]:
    """The exported families a query reads (recording rules' names left out)."""
    names = set(re.findall(r"(?<![:\w])nswatch_[A-Za-z0-9_]+\b(?!:)", expr))
    # Histogram series belong to their family.
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def recorded_names(expr: str) -> set[str]:
    """The recording rules a query reads."""
    return set(re.findall(r"\b[a-z_]+:[a-z_0-9]+:[a-z_0-9]+\b", expr))


def test_schema_basics() -> None:
    """Importable by a current Grafana: schema version, uid, title, time, unique ids."""
    dash = load()
    assert dash["schemaVersion"] >= 36
    assert dash["uid"] == "nswatch"
    assert dash["title"] == "nswatch"
    assert dash["id"] is None  # a dashboard to import carries no database id
    assert dash["time"]["from"].startswith("now-")
    ids = [p["id"] for p in dash["panels"]] + [
        p["id"] for p in panels(dash) if p not in dash["panels"]
    ]
    assert len(ids) == len(set(ids))
    kinds = {p["type"] for p in panels(dash)}
    assert kinds <= {"timeseries", "stat", "table", "state-timeline"}
    required = {r["id"] for r in dash["__requires"] if r["type"] == "panel"}
    assert kinds <= required


def test_layout_fits_and_does_not_overlap() -> None:
    """Every panel lies inside the 24-column grid and no two overlap."""
    cells: dict[tuple[int, int], str] = {}
    for p in load()["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_datasource_is_one_variable() -> None:
    """Every panel and query uses ${datasource}, the one data source variable (no import input to shadow it)."""
    dash = load()
    assert "__inputs" not in dash
    var = {v["name"]: v for v in dash["templating"]["list"]}["datasource"]
    assert var["type"] == "datasource"
    assert var["query"] == "prometheus"
    assert [v["name"] for v in dash["templating"]["list"] if v["type"] == "datasource"] == [
        "datasource"
    ]
    for p in panels(dash):
        assert p["datasource"] == {"type": "prometheus", "uid": DS_UID}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": DS_UID}, p["title"]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": DS_UID}, v["name"]
    # Nothing else names a concrete data source.
    uids = set(re.findall(r'"uid": "([^"]*)"', DASHBOARD.read_text()))
    assert uids <= {DS_UID, "-- Grafana --", "nswatch"}


def test_template_variables() -> None:
    """cluster and job multi-valued; one host and one namespace; devices of that namespace."""
    dash = load()
    vars_ = {v["name"]: v for v in dash["templating"]["list"]}
    assert list(vars_) == ["datasource", "cluster", "job", "instance", "netns", "device"]
    for name in ("cluster", "job", "instance", "netns", "device"):
        v = vars_[name]
        assert v["type"] == "query", name
        assert v["definition"] == v["query"]["query"], name
        assert v["refresh"] == 2, name  # on time range change: namespaces come and go
    for name in ("cluster", "job", "device"):
        assert vars_[name]["multi"] and vars_[name]["includeAll"], name
        assert vars_[name]["allValue"] == ".*", name
    # Single-valued: totals are one host's, per-device panels one namespace's.
    for name in SINGLE:
        assert not vars_[name]["multi"] and not vars_[name]["includeAll"], name
    assert vars_["netns"]["query"]["query"].startswith("label_values(nswatch_namespace_info{")
    assert 'instance="$instance"' in vars_["netns"]["query"]["query"]
    assert 'netns="$netns"' in vars_["device"]["query"]["query"]
    # Every selector of every query is narrowed to the chosen cluster, job and host.
    for title, ref, expr in queries(dash):
        for selector in re.findall(r"\b[A-Za-z_:]+\{[^}]*\}", expr):
            for want in ('cluster=~"$cluster"', 'job=~"$job"', 'instance="$instance"'):
                assert want in selector, f"{title} {ref}: {selector}"


def test_series_per_panel_bounded() -> None:
    """No panel returns a series per namespace or device of a big host: a query keeps the top N, or its
    left-most per-device selector reads the one selected namespace, or it aggregates to few labels."""
    for title, ref, expr in queries(load()):
        if expr.lstrip("-").startswith(("topk(", "bottomk(", "label_replace(topk(")):
            continue
        per_device = [
            selector
            for name, selector in re.findall(r"(?<![:\w])(nswatch_[A-Za-z0-9_]+)(\{[^}]*\})", expr)
            if name in PER_DEVICE
        ]
        names = set(re.findall(r"(?<![:\w])[A-Za-z_]+(?=\{)", expr))
        if names <= PER_HOST:
            continue
        # The left-most selector drives a join: reading one namespace bounds it.
        if per_device and 'netns="$netns"' in per_device[0]:
            continue
        grouping = re.match(r"-?(?:sum|count|min|max|avg)(?: by \(([^)]*)\))?\s*\(", expr)
        assert grouping, f"{title} {ref}: unbounded {expr}"
        labels = {lab.strip() for lab in (grouping.group(1) or "").split(",") if lab.strip()}
        assert labels <= BOUNDED_LABELS, f"{title} {ref}: by {labels}"


def test_rates_and_units() -> None:
    """Counters are shown as per-second rates over at least a minute (they refresh every 15 s), with units."""
    for p in panels(load()):
        exprs = [t["expr"] for t in p["targets"]]
        assert not any("increase(" in e for e in exprs), p["title"]
        if any("$__rate_interval" in e for e in exprs):
            assert p.get("interval") in {"30s", "1m"}, p["title"]
            assert p["fieldConfig"]["defaults"].get("unit") in RATE_UNITS, p["title"]
        for e in exprs:
            # A counter is only ever read through rate() (or changes() of a start time).
            for m in re.finditer(
                r"(?<![:\w])(nswatch_[A-Za-z0-9_]+_total|[a-z_]+_bucket)\{[^}]*\}(\[[^]]+\])?", e
            ):
                assert m.group(2), f"{p['title']}: {m.group(0)} read without rate()"
                assert "rate(" + m.group(0) in e, f"{p['title']}: {m.group(0)}"


def test_traffic_totals_leave_out_loopback_and_bridge_ports() -> None:
    """Totals over a namespace use the recording rules, which leave out lo and bridge ports."""
    rules = {
        r.get("record"): r["expr"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
    }
    for direction in ("receive", "transmit"):
        expr = rules[f"instance_netns:nswatch_network_{direction}_bytes:rate5m"]
        assert 'device!="lo"' in expr
        assert (
            'unless on (instance, job, netns, device) nswatch_network_info{job="nswatch", master!=""}'
            in expr
        )
    for title, ref, expr in queries(load()):
        if re.search(r"nswatch_network_(receive|transmit)_bytes_total", expr):
            # Raw byte counters only per device, never summed.
            assert 'netns="$netns"' in expr and "sum" not in expr, f"{title} {ref}"
    dash_records = {n for _, _, e in queries(load()) for n in recorded_names(e)}
    assert dash_records <= set(rules), dash_records - set(rules)


def test_required_panels() -> None:
    """The panels the issues ask for, each on the right series."""
    dash = load()
    by_title = {p["title"]: p for p in panels(dash)}

    def exprs(title: str) -> str:
        return "\n".join(t["expr"] for t in by_title[title]["targets"])

    assert "nswatch_namespaces" in exprs("Namespaces")
    veth = by_title["Veth pairs"]
    assert veth["type"] == "table"
    assert "nswatch_veth_peer_info" in exprs("Veth pairs")
    assert "nswatch_network_up" in exprs("Veth pairs")
    assert "peer_device" in exprs("Veth pairs") and "peer_netns" in exprs("Veth pairs")
    assert by_title["Link state"]["type"] == "state-timeline"
    assert "nswatch_network_up" in exprs("Link state")
    assert "receive_bytes" in exprs("Traffic, busiest namespaces")
    assert "transmit_bytes" in exprs("Traffic per device")
    assert "errs" in exprs("Errors and drops per device") and "drop" in exprs(
        "Most errors and drops"
    )
    assert "nswatch_routes" in exprs("Routes")
    assert "nswatch_network_addresses" in exprs("Devices")
    assert by_title["Default routes"]["type"] == "table"
    assert "nswatch_default_route_info" in exprs("Default routes")
    assert "by (reason" in exprs("Removals by reason")
    assert "nswatch_netlink_events_total" in exprs("Netlink events")
    assert "overruns" in exprs("Overruns, resyncs, discrepancies, internal errors")
    assert "nswatch_apply_total" in exprs("Apply results")
    assert "nswatch_drift_objects" in exprs("Drift")
    # Broken now: one query per kind of trouble, each naming it.
    broken = by_title["Broken now"]
    assert broken["type"] == "table"
    problems = {
        re.search(r'"problem", "([^"]+)"', t["expr"]).group(1)  # type: ignore[union-attr]
        for t in broken["targets"]
    }
    assert problems >= {
        "veth gone",
        "veth down (peer down)",
        "default route lost",
        "no default route",
        "unpaired veth ends",
        "drift",
        "apply failing",
    }
    assert "ALERTS{" in exprs("Alerts")
    health = "\n".join(
        exprs(t)
        for t in (
            "Scrape duration",
            "Samples per scrape",
            "Memory and file descriptors",
            "Restarts",
        )
    )
    for series in OTHER_SERIES - {"ALERTS"}:
        assert series in health, series
    # The per-device panels sit in a collapsed row.
    rows = {p["title"]: p for p in dash["panels"] if p["type"] == "row"}
    ns_row = rows["Namespace $netns"]
    assert ns_row["collapsed"]
    assert {p["title"] for p in ns_row["panels"]} >= {
        "Veth pairs",
        "Link state",
        "Devices",
        "Traffic per device",
    }


def test_every_metric_shown_and_no_unknown_metric() -> None:
    """Every exported family is on some panel; no query names a metric nswatch does not export."""
    used: set[str] = set()
    for _, _, expr in queries(load()):
        used |= metric_names(expr)
    assert used - METRICS == set()
    assert METRICS - used == set()


def test_every_query_parses(tmp_path: Path) -> None:
    """promtool parses every panel query (as a recording rule), with the variables expanded."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's 'prometheus' package (see .ci/install)")
    dash = load()
    rules = [
        {"record": f"dashboard:q{i}", "expr": expand(expr)}
        for i, (_, _, expr) in enumerate(queries(dash))
    ]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*), \w+\)", v["query"]["query"])
            assert inner is not None, v["name"]
            rules.append({"record": f"dashboard:var_{v['name']}", "expr": expand(inner.group(1))})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


def test_expand() -> None:
    """Grafana's variables are replaced the way Grafana sends them."""
    assert (
        expand('rate(x{netns="$netns", device=~"${device}"}[$__rate_interval])', {"netns": "b"})
        == 'rate(x{netns="b", device=~".*"}[1m])'
    )
    # Values go in literally (a regex escaped for a PromQL string keeps its backslashes).
    assert expand('x{job=~"$job"}', {"job": r"a\\.b"}) == r'x{job=~"a\\.b"}'
