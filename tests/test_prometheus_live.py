"""A real Prometheus scraping a real nswatch: every dashboard query returns data, and the alerts fire.

Prometheus (Debian's package) listens on 127.0.0.1 only, scrapes and
evaluates every second, with a copy of the alert rules whose `for:` are 2 s.
nswatch watches the host and this test's namespaces (prefix nswA…).

Until nswatch exports nswatch_namespace_synced (issue 16), a recording rule
stands in for it (every listed namespace synced), so that the rules gated on
it can be exercised; it is added only while the exporter lacks the family.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_root
from tests.kernel import Lab, ip, wait_for
from tests.test_dashboard import expand, load, panels

pytestmark = pytest.mark.kernel

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
RATE_INTERVAL = "10s"  # Grafana's $__rate_interval at a 1 s scrape: at least 4 scrapes


# Dashboard queries that list what is broken: empty while nothing is.
# Lower devices: this scene has no macvlan or vxlan.
PROBLEM_PANELS = {"Broken now", "Alerts", "Lower devices"}


def _metrics(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text: str = r.read().decode()
            return text
    except OSError:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str, params: dict[str, str] | None = None) -> Any:
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{url}: {e.code} {e.read().decode(errors='replace')}") from None


@dataclass
class Setup:
    lab: Lab
    nswatch: str  # instance label (host:port)
    prom: str  # base URL of Prometheus
    a: str
    b: str
    c: str
    p: str
    gateway: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = get(f"{self.prom}/api/v1/query", {"query": expr})
        assert data["status"] == "success", data
        result: list[dict[str, Any]] = data["data"]["result"]
        return result

    def query_range(self, expr: str, seconds: int = 20) -> list[dict[str, Any]]:
        end = time.time()
        data = get(
            f"{self.prom}/api/v1/query_range",
            {"query": expr, "start": str(end - seconds), "end": str(end), "step": "1"},
        )
        assert data["status"] == "success", data
        result: list[dict[str, Any]] = data["data"]["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        data = get(f"{self.prom}/api/v1/alerts")
        assert data["status"] == "success", data
        alerts: list[dict[str, Any]] = data["data"]["alerts"]
        return alerts


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """Namespaces A, B, C and P; nswatch with a profile for P; Prometheus scraping it."""
    require_root()
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus not found: install Debian's 'prometheus' package (see .ci/install)")
    lab = Lab(prefix=f"nswA{secrets.token_hex(2)}")
    nswatch_proc: subprocess.Popen[bytes] | None = None
    prom_proc: subprocess.Popen[bytes] | None = None
    try:
        net = random.randrange(0, 256)
        gateway = f"198.19.{net}.1"
        a, b, c = lab.netns("a"), lab.netns("b"), lab.netns("c")
        # A <-> B, host <-> A (A's way out: its default route), host <-> B,
        # host <-> C.
        lab.veth(lab.name("ab"), lab.name("ba"), a, b)
        lab.veth(lab.name("ha"), lab.name("ah"), None, a)
        lab.veth(lab.name("hb"), lab.name("bh"), None, b)
        lab.veth(lab.name("hc"), lab.name("ch"), None, c)
        for ns, dev in ((a, "ab"), (b, "ba"), (a, "ah"), (b, "bh"), (c, "ch")):
            ip("-n", ns, "link", "set", lab.name(dev), "up")
        for dev in ("ha", "hb", "hc"):
            ip("link", "set", lab.name(dev), "up")
        ip("-n", a, "addr", "add", f"198.19.{net}.2/30", "dev", lab.name("ah"))
        ip("-n", a, "route", "add", "default", "via", gateway, "dev", lab.name("ah"))

        config = tmp_path / "nswatch.yaml"
        config.write_text(
            "profiles:\n"
            "  - name: lab\n"
            f'    match: "{lab.prefix}p*"\n'
            "    loopback: up\n"
            "    veth:\n"
            '      host_name: "{netns}h"\n'
            "      netns_name: eth0\n"
            f"      pool: 198.19.{(net + 128) % 256}.0/24\n"
            "      prefix: 30\n"
        )
        port = free_port()
        nswatch_log = open(tmp_path / "nswatch.log", "wb")  # noqa: SIM115 (the child keeps it)
        with nswatch_log:
            nswatch_proc = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "nswatch"),
                    "run",
                    "--config",
                    str(config),
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--include",
                    f"^{lab.prefix}",
                    "--log-format",
                    "json",
                ],
                stdin=subprocess.DEVNULL,
                stdout=nswatch_log,
                stderr=subprocess.STDOUT,
            )
        p = lab.netns("p")  # set up by the profile

        # The rules as shipped, but with `for:` of 2 s.
        rules = (DASHBOARDS / "nswatch-alerts.yml").read_text()
        rules, n = re.subn(r"(?m)^(\s+for:) \S+$", r"\1 2s", rules)
        assert n >= 5
        families = wait_for(lambda: _metrics(port), timeout=30, interval=0.2)
        # The outage alerts are gated on each namespace's own sync state.
        assert "# TYPE nswatch_namespace_synced gauge" in families
        (tmp_path / "nswatch-alerts.yml").write_text(rules)
        prom_config = yaml.safe_load((DASHBOARDS / "prometheus-test.yml").read_text())
        assert prom_config["global"]["scrape_interval"] == "1s"
        assert prom_config["global"]["evaluation_interval"] == "1s"
        prom_config["rule_files"] = [str(tmp_path / "nswatch-alerts.yml")]
        (job,) = prom_config["scrape_configs"]
        assert job["job_name"] == "nswatch"
        job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_config))
        prom_port = free_port()
        prom_log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 (the child keeps it)
        with prom_log:
            prom_proc = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=prom_log,
                stderr=subprocess.STDOUT,
            )
        s = Setup(lab, f"127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}", a, b, c, p, gateway)

        def scraped() -> bool:
            if prom_proc is not None and prom_proc.poll() is not None:
                raise AssertionError((tmp_path / "prometheus.log").read_text())
            if nswatch_proc is not None and nswatch_proc.poll() is not None:
                raise AssertionError((tmp_path / "nswatch.log").read_text())
            try:
                return bool(s.query(f'nswatch_drift_objects{{netns="{p}"}}')) and bool(
                    s.query(f'nswatch_veth_peer_info{{netns="{a}", device="{lab.name("ab")}"}}')
                )
            except OSError:
                return False

        wait_for(scraped, timeout=30, interval=0.2)
        yield s
    finally:
        _stop(prom_proc)
        _stop(nswatch_proc)
        lab.cleanup()


def dashboard_values(s: Setup) -> dict[str, str]:
    # One host and one namespace (single-valued: inserted as they are).
    return {"cluster": ".*", "job": "nswatch", "instance": s.nswatch, "netns": s.a, "device": ".*"}


def variable_values(s: Setup, name: str, values: dict[str, str]) -> list[str]:
    """The values the dashboard's variable offers, asked the way Grafana asks."""
    (var,) = [v for v in load()["templating"]["list"] if v["name"] == name]
    inner = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"]["query"])
    assert inner is not None
    data: list[str] = get(
        f"{s.prom}/api/v1/label/{inner.group(2)}/values",
        {"match[]": expand(inner.group(1), values)},
    )["data"]
    return data


def test_dashboard_and_alerts_live(setup: Setup) -> None:
    """Every panel query returns data; a deleted veth and default route and a veth whose peer is down
    fire and show as broken, a deleted namespace does not."""
    s = setup
    # Rates need a few scrapes in their window.
    time.sleep(5)

    # --- the dashboard: variables, then every query of every panel ---
    values = dashboard_values(s)
    assert s.nswatch in variable_values(s, "instance", values)
    assert {s.a, s.b, s.c, s.p, "host"} <= set(variable_values(s, "netns", values))
    assert {s.lab.name("ab"), s.lab.name("ah"), "lo"} <= set(variable_values(s, "device", values))
    empty = []
    for panel in panels(load()):
        for target in panel["targets"]:
            expr = expand(target["expr"], values, RATE_INTERVAL)
            result = s.query(expr) if target.get("instant") else s.query_range(expr)
            if not result and panel["title"] not in PROBLEM_PANELS:
                empty.append(f"{panel['title']} {target['refId']}: {expr}")
    assert empty == [], "queries without data:\n" + "\n".join(empty)

    # The veth table pairs our ends, with their states.
    rows = s.query(expand(_target("Veth pairs", "A"), values))
    ends = {(r["metric"]["netns"], r["metric"]["device"]): r["metric"] for r in rows}
    assert ends[(s.a, s.lab.name("ab"))]["peer_netns"] == s.b
    assert ends[(s.a, s.lab.name("ab"))]["peer_device"] == s.lab.name("ba")
    routes = s.query(expand(_target("Default routes", "A"), values))
    assert {
        (r["metric"]["netns"], r["metric"]["gateway"], r["metric"]["device"]) for r in routes
    } >= {(s.a, s.gateway, s.lab.name("ah"))}

    # --- alerts ---
    def ours(alert: dict[str, Any]) -> bool:
        labels: dict[str, str] = alert["labels"]
        return labels.get("netns", "").startswith(s.lab.prefix) or labels.get(
            "peer_netns", ""
        ).startswith(s.lab.prefix)

    watched = {"NswatchVethDisappeared", "NswatchDefaultRouteMissing", "NswatchVethDown"}
    assert [a for a in s.alerts() if ours(a) and a["labels"]["alertname"] in watched] == []

    ip("-n", s.a, "link", "del", s.lab.name("ab"))  # a veth between two live namespaces
    ip("-n", s.a, "route", "del", "default")
    ip("link", "set", s.lab.name("hb"), "down")  # B's end loses its carrier
    ip("netns", "del", s.c)  # a whole namespace, with its veth to the host
    deleted_at = time.monotonic()

    want_veth = {
        (s.a, s.lab.name("ab"), s.b, s.lab.name("ba")),
        (s.b, s.lab.name("ba"), s.a, s.lab.name("ab")),
    }
    want_route = (s.a, "inet", "main", s.gateway, s.lab.name("ah"))
    want_down = (s.b, s.lab.name("bh"))

    def firing() -> list[dict[str, Any]] | None:
        alerts = [a for a in s.alerts() if ours(a) and a["state"] == "firing"]
        veth = {
            tuple(x["labels"][k] for k in ("netns", "device", "peer_netns", "peer_device"))
            for x in alerts
            if x["labels"]["alertname"] == "NswatchVethDisappeared"
        }
        route = {
            tuple(x["labels"][k] for k in ("netns", "family", "table", "gateway", "device"))
            for x in alerts
            if x["labels"]["alertname"] == "NswatchDefaultRouteMissing"
        }
        down = {
            (x["labels"]["netns"], x["labels"]["device"])
            for x in alerts
            if x["labels"]["alertname"] == "NswatchVethDown"
        }
        ok = want_veth <= veth and want_route in route and want_down in down
        return alerts if ok else None

    alerts = wait_for(firing, timeout=60, interval=0.5)
    for alert in alerts:
        if alert["labels"]["alertname"] in watched:
            assert alert["labels"]["severity"] == "critical"
            assert alert["labels"]["netns"] in alert["annotations"]["description"]
            assert alert["labels"]["device"] in alert["annotations"]["description"]
            assert alert["annotations"]["runbook_url"].startswith("docs/runbook.md#")

    # The dashboard's "Broken now" and "Alerts" tables show them.
    broken = set()
    for target in next(p for p in panels(load()) if p["title"] == "Broken now")["targets"]:
        for r in s.query(expand(target["expr"], values)):
            broken.add((r["metric"]["problem"], r["metric"]["netns"], r["metric"].get("device")))
    assert {
        ("veth gone", s.a, s.lab.name("ab")),
        ("veth gone", s.b, s.lab.name("ba")),
        ("default route lost", s.a, s.lab.name("ah")),
        ("veth down (peer down)", s.b, s.lab.name("bh")),
        ("no default route", s.a, None),
    } <= broken
    listed = {r["metric"]["alertname"] for r in s.query(expand(_target("Alerts", "A"), values))}
    assert watched <= listed

    # The deleted namespace's veth (both ends, the host's included) stays
    # silent: give it as long again as the others took to fire, and more.
    time.sleep(max(5.0, time.monotonic() - deleted_at))
    about_c = [
        a
        for a in s.alerts()
        if a["labels"]["alertname"] in watched
        and s.c in (a["labels"].get("netns"), a["labels"].get("peer_netns"))
    ]
    assert about_c == []
    # ... although nswatch did see its host end go (counted as namespace_deleted).
    removed = s.query(
        'nswatch_network_removed_total{netns="host", kind="veth", reason="namespace_deleted"}'
    )
    assert removed and float(removed[0]["value"][1]) >= 1
    still = {
        (a["labels"]["netns"], a["labels"]["device"])
        for a in s.alerts()
        if a["labels"]["alertname"] == "NswatchVethDisappeared" and a["state"] == "firing"
    }
    assert {(s.a, s.lab.name("ab")), (s.b, s.lab.name("ba"))} <= still


def _target(title: str, ref: str) -> str:
    for panel in panels(load()):
        if panel["title"] == title:
            for t in panel["targets"]:
                if t["refId"] == ref:
                    expr: str = t["expr"]
                    return expr
    raise KeyError((title, ref))
