"""The alerting rules: promtool check and unit tests, coverage of every alert, and tests with teeth."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
RULES = DASHBOARDS / "nswatch-alerts.yml"
RULES_TEST = DASHBOARDS / "nswatch-alerts.test.yml"

# The alert names are a contract (issue 5).
ALERTS = {
    "NswatchDown",
    "NswatchNotSynced",
    "VethDisappeared",
    "DefaultRouteMissing",
    "RouteCountDropped",
    "ExpectedObjectMissing",
    "NetlinkOverruns",
    "ApplyFailing",
    "ConfigReloadFailed",
}


def promtool() -> str:
    """The promtool binary; its absence is a failure (CI installs Debian's prometheus)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's 'prometheus' package (see .ci/install)")
    return path


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_promtool_check_rules() -> None:
    """The rule file is valid: PromQL parses, templates compile."""
    proc = run_promtool("check", "rules", RULES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in proc.stdout


def test_promtool_test_rules() -> None:
    """Every case of the rules test file passes."""
    proc = run_promtool("test", "rules", RULES_TEST)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alert_names_labels_annotations() -> None:
    """Exactly the contract's alerts, each with a severity and a summary and description."""
    got = {r["alert"]: r for r in rules()}
    assert set(got) == ALERTS
    for name, rule in got.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert set(rule["annotations"]) >= {"summary", "description"}, name
        text = rule["annotations"]["summary"] + rule["annotations"]["description"]
        assert "$labels.instance" in text or "$labels.netns" in text, name
    # The alerts about objects in namespaces name the namespace, and the device
    # where the series has one.
    for name in ("VethDisappeared", "DefaultRouteMissing"):
        summary = got[name]["annotations"]["summary"]
        description = got[name]["annotations"]["description"]
        assert "$labels.netns" in summary, name
        assert "$labels.device" in description, name
    assert "$labels.peer_netns" in got["VethDisappeared"]["annotations"]["description"]
    assert "$labels.peer_device" in got["VethDisappeared"]["annotations"]["description"]
    for name in ("RouteCountDropped", "ExpectedObjectMissing", "ApplyFailing"):
        assert "$labels.netns" in got[name]["annotations"]["summary"], name


def test_every_alert_tested_firing_and_silent() -> None:
    """The test file makes every alert fire and also checks it silent somewhere."""
    doc = yaml.safe_load(RULES_TEST.read_text())
    assert doc["rule_files"] == [RULES.name]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else silent).add(t["alertname"])
            for alert in t.get("exp_alerts") or []:
                # Expected alerts spell out their annotations, so templates are tested too.
                assert set(alert.get("exp_annotations", {})) >= {"summary", "description"}
    assert firing == ALERTS
    assert silent == ALERTS


# Each mutation removes one safeguard of a rule (every occurrence of the
# text); the unit tests must notice.
MUTATIONS = {
    "VethDisappeared fires for a deleted namespace's host-side end": (
        "          and on (instance, job, peer_netns)\n"
        '            label_replace(nswatch_namespace_info, "peer_netns", "$1", "netns", "(.*)")\n',
        "",
    ),
    "VethDisappeared fires for the veths of a deleted namespace": (
        "          and on (instance, job, netns) nswatch_namespace_info\n"
        "          and on (instance, job, peer_netns)",
        "          and on (instance, job, peer_netns)",
    ),
    "VethDisappeared fires for a moved veth": (
        "            unless on (instance, job, device, peer_device) nswatch_veth_peer_info\n",
        "",
    ),
    "alerts fire while nswatch is not synced": (
        "          and on (instance, job) (nswatch_synced == 1)\n",
        "",
    ),
    "DefaultRouteMissing fires on a gateway change": (
        "unless on (instance, job, netns, family, table) nswatch_default_route_info",
        "unless nswatch_default_route_info",
    ),
    "RouteCountDropped misses an emptied table": (
        "or 0 * max_over_time",
        "or 1 * max_over_time",
    ),
    "DefaultRouteMissing and RouteCountDropped fire for a deleted namespace": (
        "          and on (instance, job, netns) nswatch_namespace_info\n"
        "          and on (instance, job) (nswatch_synced == 1)\n",
        "          and on (instance, job) (nswatch_synced == 1)\n",
    ),
    "critical alerts wait no minute (a teardown would fire them)": (
        "        for: 1m\n        labels:\n          severity: critical\n",
        "        labels:\n          severity: critical\n",
    ),
    "ApplyFailing fires for a failure that was repaired": (
        "(nswatch_apply_failing) == 1\n        for: 1m\n",
        "(nswatch_apply_failing) == 1\n",
    ),
    "ConfigReloadFailed ignores the gauge": (
        "unless on (instance, job) nswatch_config_last_reload_success",
        "",
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
