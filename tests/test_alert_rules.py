"""The alerting rules: promtool check and unit tests, conventions, scenario coverage, and tests with teeth."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
RULES = DASHBOARDS / "nswatch-alerts.yml"
RULES_TEST = DASHBOARDS / "nswatch-alerts.test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
JOB = 'job="nswatch"'

# Alerts about nswatch itself, and about the network it watches.
PROCESS_ALERTS = {
    "NswatchDown",
    "NswatchTargetMissing",
    "NswatchRestartLoop",
    "NswatchFdsNearLimit",
    "NswatchNotSynced",
    "NswatchNetlinkOverruns",
    "NswatchModelDiscrepancies",
    "NswatchConfigReloadFailed",
}
NETWORK_ALERTS = {
    "NswatchNamespaceNotSynced",
    "NswatchVethDisappeared",
    "NswatchDefaultRouteMissing",
    "NswatchVethDown",
    "NswatchLinkFlapping",
    "NswatchNetworkReceiveErrors",
    "NswatchNetworkTransmitErrors",
    "NswatchVethMTUMismatch",
    "NswatchExpectedObjectMissing",
    "NswatchApplyFailing",
    "NswatchAddressDADFailed",
    "NswatchDefaultRouteLinkdown",
    "NswatchConntrackNearLimit",
    "NswatchListenOverflows",
}
ALERTS = PROCESS_ALERTS | NETWORK_ALERTS

# What every alert's tests must show (issue 16): firing, staying firing until
# recovery, and silent when nswatch restarts; the network alerts also silent
# on everything that removes or renames objects without an outage.
SILENT_NETWORK = {
    "namespace deletion",
    "recreate under the same name",
    "rename",
    "mass teardown",
}
SCENARIOS: dict[str, set[str]] = {
    **{a: {"fires", "until recovery", "nswatch restart"} for a in PROCESS_ALERTS},
    **{a: {"fires", "until recovery", "nswatch restart", *SILENT_NETWORK} for a in NETWORK_ALERTS},
}
# A namespace has no name of its own to rename (a renamed namespace is a new
# series under a new name, which the rename tests of the other alerts cover).
# The same for the per-namespace /proc figures, which have no device.
for _name in ("NswatchNamespaceNotSynced", "NswatchConntrackNearLimit", "NswatchListenOverflows"):
    SCENARIOS[_name].discard("rename")
# Further silences a group may check.
EXTRA = {"silent while"}


def promtool() -> str:
    """The promtool binary; its absence is a failure (CI installs Debian's prometheus)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's 'prometheus' package (see .ci/install)")
    return path


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_promtool_check_rules() -> None:
    """The rule file is valid: PromQL parses, templates compile."""
    proc = run_promtool("check", "rules", RULES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout


def test_promtool_test_rules() -> None:
    """Every case of the rules test file passes."""
    proc = run_promtool("test", "rules", RULES_TEST)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alert_conventions() -> None:
    """Mixin conventions: Nswatch prefix, severity, a fixed summary, details and a runbook section."""
    got = alerts()
    assert set(got) == ALERTS
    anchors = {
        slug(line.lstrip("#")) for line in RUNBOOK.read_text().splitlines() if line.startswith("#")
    }
    for name, rule in got.items():
        assert name.startswith("Nswatch"), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        ann = rule["annotations"]
        assert set(ann) == {"summary", "description", "runbook_url"}, name
        assert "{{" not in ann["summary"] and ann["summary"].endswith("."), name
        assert "$labels.instance" in ann["description"] or "$labels.job" in ann["description"]
        assert ann["runbook_url"] == f"docs/runbook.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/runbook.md has no section {name}"
    # The alerts about objects name the namespace and device in the description.
    for name in (
        "NswatchVethDisappeared",
        "NswatchVethDown",
        "NswatchVethMTUMismatch",
        "NswatchAddressDADFailed",
        "NswatchDefaultRouteLinkdown",
    ):
        description = got[name]["annotations"]["description"]
        assert "$labels.netns" in description and "$labels.device" in description, name
    veth = got["NswatchVethDisappeared"]["annotations"]["description"]
    assert "$labels.peer_netns" in veth and "$labels.peer_device" in veth
    for name in (
        "NswatchDefaultRouteMissing",
        "NswatchExpectedObjectMissing",
        "NswatchApplyFailing",
        "NswatchConntrackNearLimit",
        "NswatchListenOverflows",
    ):
        assert "$labels.netns" in got[name]["annotations"]["description"], name


def test_job_selector() -> None:
    """Every selector of an exported series says job="nswatch", so one substitution retargets the rules."""
    selectors = 0
    for rule in rules():
        expr = rule["expr"]
        for m in re.finditer(
            r"(?<![:\w\"])(nswatch_[A-Za-z0-9_]+|up|process_[a-z_]+)\b(?![:(])(\{[^}]*\})?", expr
        ):
            selectors += 1
            assert m.group(2) and JOB in m.group(2), (
                f"{rule.get('alert') or rule['record']}: {m.group(0)}"
            )
    assert sum(r["expr"].count(JOB) for r in rules()) == selectors
    assert selectors > 40


def test_every_alert_tested_per_scenario() -> None:
    """Each alert has the scenarios that apply to it, with firing and silent expectations."""
    doc = yaml.safe_load(RULES_TEST.read_text())
    assert doc["rule_files"] == [RULES.name]
    covered: set[tuple[str, str]] = set()
    for case in doc["tests"]:
        names, _, scenarios = case["name"].partition(": ")
        group_alerts = set(names.split(", "))
        assert group_alerts <= ALERTS, case["name"]
        checks = case.get("alert_rule_test", [])
        for alert in group_alerts:
            mine = [t for t in checks if t["alertname"] == alert]
            firing = [t for t in mine if t.get("exp_alerts")]
            silent = [t for t in mine if not t.get("exp_alerts")]
            for scenario in scenarios.split("; "):
                word = next((s for s in SCENARIOS[alert] | EXTRA if scenario.startswith(s)), None)
                assert word is not None, f"{case['name']}: unknown scenario {scenario!r}"
                if word == "fires":
                    assert firing, f"{case['name']}: {alert} never fires"
                elif word == "until recovery":
                    # Still firing 20 minutes in, then cleared once recovered.
                    late = max((_minutes(t["eval_time"]) for t in firing), default=0)
                    assert late >= 20, f"{case['name']}: {alert} not checked 20m in"
                    assert any(_minutes(t["eval_time"]) > late for t in silent), case["name"]
                else:
                    assert silent, f"{case['name']}: {alert} never checked silent"
                covered.add((alert, word))
            for t in firing:
                for expected in t["exp_alerts"]:
                    assert set(expected["exp_annotations"]) == {
                        "summary",
                        "description",
                        "runbook_url",
                    }
    missing = {(a, s) for a, ss in SCENARIOS.items() for s in ss} - covered
    assert missing == set()
    # The outage alerts are checked an hour in.
    for case in doc["tests"]:
        if (
            case["name"].endswith("fires; until recovery")
            and "NswatchVethDisappeared" in case["name"]
        ):
            times = {
                _minutes(t["eval_time"]) for t in case["alert_rule_test"] if t.get("exp_alerts")
            }
            assert {20, 60} <= times


def _minutes(eval_time: str) -> int:
    m = re.fullmatch(r"(\d+)m", eval_time)
    assert m, eval_time
    return int(m.group(1))


# Each mutation removes one safeguard of a rule (every occurrence of the
# text); the unit tests must notice.
MUTATIONS = {
    "memory ignores the namespace's identity (inode)": (
        "and on (instance, job, netns, inode) nswatch_namespace_info",
        "and on (instance, job, netns) nswatch_namespace_info",
    ),
    "memory ignores the peer namespace's identity": (
        "and on (instance, job, peer_netns, peer_inode)",
        "and on (instance, job, peer_netns)",
    ),
    "memory forgets while nswatch is blind (veth)": (
        "          or (nswatch:veth_end:absent and on (instance, job) nswatch:blind)\n",
        "",
    ),
    "memory forgets while nswatch is blind (route)": (
        "          or (nswatch:default_route:absent and on (instance, job) nswatch:blind)\n",
        "",
    ),
    "a missing veth is dropped while nswatch restarts": (
        "          or (nswatch:veth_end:missing and nswatch:veth_end:absent)\n",
        "",
    ),
    "a missing route is dropped while nswatch restarts": (
        "          or (nswatch:default_route:missing and nswatch:default_route:absent)\n",
        "",
    ),
    "VethDisappeared matches ends across namespaces": (
        "unless on (instance, job, netns, device, ifindex)",
        "unless on (instance, job, device, ifindex)",
    ),
    "a moved or renamed end counts as gone": (
        """          unless on (instance, job, peer_netns, peer_device)
            label_replace(label_replace(nswatch_veth_peer_info{job="nswatch"},
              "peer_netns", "$1", "netns", "(.*)"), "peer_device", "$1", "device", "(.*)")
""",
        "",
    ),
    "an end renamed in place counts as gone (ifindex)": (
        'nswatch_veth_peer_info{job="nswatch", ifindex!=""}\n          unless',
        'nswatch_veth_peer_info{job="nswatch", ifindex="none"}\n          unless',
    ),
    "a peer renamed in place counts as gone (ifindex)": (
        '"peer_ifindex", "$1", "ifindex", "(.*)")',
        '"peer_ifindex", "$1", "nothing", "(.*)")',
    ),
    "outages wait no teardown": (
        "        expr: nswatch:veth_end:missing\n        for: 5m",
        "        expr: nswatch:veth_end:missing\n        for: 1m",
    ),
    "route outage waits no teardown": (
        "        expr: nswatch:default_route:missing\n        for: 5m",
        "        expr: nswatch:default_route:missing\n        for: 1m",
    ),
    "no per-namespace sync gate": (
        '            and on (instance, job, netns) (nswatch_namespace_synced{job="nswatch"} == 1)\n            and on (instance, job, peer_netns, peer_inode)',
        "            and on (instance, job, peer_netns, peer_inode)",
    ),
    "no per-namespace sync gate for routes": (
        '            and on (instance, job, netns) (nswatch_namespace_synced{job="nswatch"} == 1)\n          )\n          or (nswatch:default_route:missing',
        "          )\n          or (nswatch:default_route:missing",
    ),
    "no peer-namespace sync gate": (
        """            and on (instance, job, peer_netns)
              label_replace(nswatch_namespace_synced{job="nswatch"} == 1,""",
        """            and on (instance, job, peer_netns)
              label_replace(nswatch_namespace_synced{job="nswatch"} >= 0,""",
    ),
    "DefaultRouteMissing fires on a gateway change": (
        """          unless on (instance, job, netns, family, table)
            nswatch_default_route_info{job="nswatch"}""",
        """          unless on (instance, job, netns, family, table, gateway)
            nswatch_default_route_info{job="nswatch"}""",
    ),
    "VethDown fires for a veth set down on purpose": (
        'and on (instance, job, netns, device) (nswatch_network_admin_up{job="nswatch"} == 1)\n          and on (instance, job, netns) (nswatch_namespace_synced',
        "and on (instance, job, netns) (nswatch_namespace_synced",
    ),
    "VethDown fires for bridges": (
        'nswatch_network_info{job="nswatch", kind="veth", operstate=~"down|lowerlayerdown"}\n          and on (instance, job, netns, device) (nswatch_network_admin_up{job="nswatch"} == 1)\n          and on',
        'nswatch_network_info{job="nswatch", operstate=~"down|lowerlayerdown"}\n          and on (instance, job, netns, device) (nswatch_network_admin_up{job="nswatch"} == 1)\n          and on',
    ),
    "VethDown waits no teardown": (
        """          and on (instance, job, netns) (nswatch_namespace_synced{job="nswatch"} == 1)
        for: 5m""",
        """          and on (instance, job, netns) (nswatch_namespace_synced{job="nswatch"} == 1)
        for: 1m""",
    ),
    "ApplyFailing fires for a deleted namespace": (
        """          max by (instance, job, netns) (nswatch_apply_failing{job="nswatch"}) == 1
          and on (instance, job, netns) nswatch_namespace_info{job="nswatch"}""",
        """          max by (instance, job, netns) (nswatch_apply_failing{job="nswatch"}) == 1""",
    ),
    "ApplyFailing fires for a failure soon repaired": (
        '(nswatch_apply_failing{job="nswatch"}) == 1\n          and on (instance, job, netns) nswatch_namespace_info{job="nswatch"}\n        for: 5m',
        '(nswatch_apply_failing{job="nswatch"}) == 1\n          and on (instance, job, netns) nswatch_namespace_info{job="nswatch"}\n        for: 1m',
    ),
    "MTU mismatch during creation pages": (
        """              "peer_netns", "$1", "netns", "(.*)"), "peer_device", "$1", "device", "(.*)")
        for: 5m""",
        """              "peer_netns", "$1", "netns", "(.*)"), "peer_device", "$1", "device", "(.*)")
        for: 30s""",
    ),
    "restart loop counts one restart": (
        'changes(process_start_time_seconds{job="nswatch"}[30m]) >= 3',
        'changes(process_start_time_seconds{job="nswatch"}[30m]) >= 1',
    ),
    "DADFailed fires for a tentative address": (
        'flags=~"(.*,)?dadfailed(,.*)?"',
        'flags=~".+"',
    ),
    "DefaultRouteLinkdown waits no teardown": (
        """          nswatch_default_route_linkdown{job="nswatch"} == 1
          and on (instance, job, netns) (nswatch_namespace_synced{job="nswatch"} == 1)
        for: 5m""",
        """          nswatch_default_route_linkdown{job="nswatch"} == 1
          and on (instance, job, netns) (nswatch_namespace_synced{job="nswatch"} == 1)
        for: 1m""",
    ),
    "ConntrackNearLimit threshold too high": (
        '/ nswatch_nf_conntrack_entries_limit{job="nswatch"} > 0.75',
        '/ nswatch_nf_conntrack_entries_limit{job="nswatch"} > 0.9',
    ),
    "ListenOverflows fires on any overflow ever": (
        'rate(nswatch_netstat_TcpExt_ListenOverflows_total{job="nswatch"}[5m]) > 0',
        'nswatch_netstat_TcpExt_ListenOverflows_total{job="nswatch"} > 0',
    ),
    "blind ignores an unsynced nswatch": (
        'up{job="nswatch"} unless on (instance, job) (nswatch_synced{job="nswatch"} == 1)',
        'up{job="nswatch"} == 0',
    ),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_unit_tests_catch_broken_rules(mutation: str, tmp_path: Path) -> None:
    """The rules test file fails when a safeguard of a rule is removed."""
    old, new = MUTATIONS[mutation]
    text = RULES.read_text()
    assert old in text, f"mutation no longer applies: {old!r}"
    (tmp_path / RULES.name).write_text(text.replace(old, new))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    proc = run_promtool("test", "rules", tmp_path / RULES_TEST.name)
    assert proc.returncode != 0, f"the rules tests did not notice: {mutation}"
