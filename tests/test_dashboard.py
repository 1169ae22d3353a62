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
DS_UID = "${DS_PROMETHEUS}"

# Every family nswatch exports (the metrics contract); each must be on the dashboard.
METRICS = set(metrics.metric_names())

# What Grafana puts in place of its variables when every value is selected.
ALL = {"instance": ".*", "netns": ".*", "device": ".*"}


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
    names = set(re.findall(r"\bnswatch_[a-z_]+", expr))
    # Histogram series belong to their family.
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


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


def test_datasource_is_an_input_and_a_variable() -> None:
    """Every panel and query uses ${DS_PROMETHEUS}, declared as an import input and a variable."""
    dash = load()
    (inp,) = dash["__inputs"]
    assert inp["name"] == "DS_PROMETHEUS"
    assert inp["type"] == "datasource"
    assert inp["pluginId"] == "prometheus"
    var = {v["name"]: v for v in dash["templating"]["list"]}["DS_PROMETHEUS"]
    assert var["type"] == "datasource"
    assert var["query"] == "prometheus"
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
    """netns and device are query variables, device narrowed by netns; all of them multi-valued."""
    dash = load()
    vars_ = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"DS_PROMETHEUS", "instance", "netns", "device"} <= set(vars_)
    netns, device = vars_["netns"], vars_["device"]
    assert netns["type"] == device["type"] == "query"
    assert netns["query"]["query"].startswith("label_values(nswatch_namespace_info")
    assert netns["query"]["query"].endswith(", netns)")
    assert device["query"]["query"].startswith("label_values(nswatch_network_info")
    assert 'netns=~"$netns"' in device["query"]["query"]
    assert device["query"]["query"].endswith(", device)")
    for v in (vars_["instance"], netns, device):
        assert v["multi"] and v["includeAll"] and v["allValue"] == ".*", v["name"]
        assert v["definition"] == v["query"]["query"]
        assert v["refresh"] == 2  # on time range change: namespaces come and go
    # Panels filter by the variables (each query at least by instance).
    for title, ref, expr in queries(dash):
        assert '=~"$instance"' in expr, f"{title} {ref}"
    uses_netns = [t for t, _, e in queries(dash) if '=~"$netns"' in e]
    uses_device = [t for t, _, e in queries(dash) if '=~"$device"' in e]
    assert len(uses_netns) >= 10
    assert len(uses_device) >= 5


def test_required_panels() -> None:
    """The panels the issue asks for, each on the right metrics."""
    dash = load()
    by_title = {p["title"]: p for p in panels(dash)}

    def exprs(title: str) -> str:
        return "\n".join(t["expr"] for t in by_title[title]["targets"])

    assert "nswatch_namespaces" in exprs("Namespaces")
    assert "nswatch_network_info" in exprs("Links per namespace")
    veth = by_title["Veth pairs"]
    assert veth["type"] == "table"
    assert "nswatch_veth_peer_info" in exprs("Veth pairs")
    assert "nswatch_network_up" in exprs("Veth pairs")
    assert "peer_device" in exprs("Veth pairs") and "peer_netns" in exprs("Veth pairs")
    assert by_title["Link state"]["type"] == "state-timeline"
    assert "nswatch_network_up" in exprs("Link state")
    assert "receive_bytes" in exprs("Traffic per namespace") and "by (netns)" in exprs(
        "Traffic per namespace"
    )
    assert "transmit_bytes" in exprs("Traffic per device")
    assert "errs" in exprs("Errors and drops per device") and "drop" in exprs(
        "Errors and drops per namespace"
    )
    assert "nswatch_routes" in exprs("Routes per namespace")
    assert "nswatch_network_addresses" in exprs("Addresses per namespace")
    assert by_title["Default routes"]["type"] == "table"
    assert "nswatch_default_route_info" in exprs("Default routes")
    assert "by (reason" in exprs("Removals by reason")
    assert "nswatch_netlink_events_total" in exprs("Netlink events")
    assert "overruns" in exprs("Overruns and resyncs") and "resyncs" in exprs(
        "Overruns and resyncs"
    )
    assert "nswatch_apply_total" in exprs("Apply results")
    assert "nswatch_drift_objects" in exprs("Drift")


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
        expand('rate(x{netns=~"$netns", device=~"${device}"}[$__rate_interval])', {"netns": "a|b"})
        == 'rate(x{netns=~"a|b", device=~".*"}[1m])'
    )
    # Values go in literally (a regex escaped for a PromQL string keeps its backslashes).
    assert expand('x{instance=~"$instance"}', {"instance": r"a\\.b"}) == r'x{instance=~"a\\.b"}'
