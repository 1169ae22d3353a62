"""``nswatch graph`` against the real kernel: veth pairs and lower devices across namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel import Lab, ip

pytestmark = pytest.mark.kernel


def graph(lab: Lab, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "nswatch.yaml"
    config.write_text(f'include: "^{lab.prefix}"\n')
    return subprocess.run(
        [sys.executable, "-m", "nswatch", "graph", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )


def test_graph_joins_veth_ends_and_a_macvlan_to_its_lower_device(lab: Lab, tmp_path: Path) -> None:
    """A veth pair between two namespaces and a macvlan over one end are edges; a down link is marked."""
    one, two = lab.netns("g1"), lab.netns("g2")
    a, b, mv = lab.name("a"), lab.name("b"), lab.name("mv")
    lab.veth(a, b, a_ns=one, b_ns=two)
    ip("-n", one, "link", "add", mv, "link", a, "type", "macvlan", "mode", "bridge")
    ip("-n", one, "link", "set", mv, "netns", two)
    ip("-n", one, "link", "set", a, "up")
    ip("-n", one, "addr", "add", "198.18.141.1/24", "dev", a)
    proc = graph(lab, tmp_path, "--format", "json", "--netns", f"{lab.prefix}*")
    assert proc.returncode == 0, proc.stderr
    g = json.loads(proc.stdout)
    assert [ns["name"] for ns in g["namespaces"]] == [one, two]
    ids = {(ns["name"], link["name"]): link for ns in g["namespaces"] for link in ns["links"]}
    edges = {(e["kind"], e["a"], e["b"]) for e in g["edges"]}
    pair = {ids[(one, a)]["id"], ids[(two, b)]["id"]}
    assert any(k == "veth" and {x, y} == pair for k, x, y in edges)
    assert ("parent", ids[(two, mv)]["id"], ids[(one, a)]["id"]) in edges
    assert ids[(two, b)]["down"] is True and ids[(two, b)]["admin_up"] is False
    # Set up, but its peer is down: it cannot pass traffic either.
    assert ids[(one, a)]["admin_up"] is True and ids[(one, a)]["oper_state"] != "UP"
    assert ids[(one, a)]["down"] is True
    assert ids[(one, a)]["addresses"][0] == "198.18.141.1/24"
    dot = graph(lab, tmp_path, "--netns", f"{lab.prefix}*")
    assert dot.returncode == 0 and dot.stdout.startswith("graph nswatch {")
    assert f'label="{one}"' in dot.stdout and "style=dashed" in dot.stdout
