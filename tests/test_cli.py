"""The nswatch command as users run it: snapshot, check-config, apply, run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nswatch.config import render_host_name
from tests.kernel import Lab, ip, ip_json, wait_for

NSWATCH = [sys.executable, "-m", "nswatch"]


def nswatch(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NSWATCH, *args], capture_output=True, text=True, timeout=60, check=check
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.kernel
def test_snapshot_shows_the_seed_pair(lab: Lab) -> None:
    """`nswatch snapshot` prints the pair and addresses; --json is the state document."""
    ns = lab.netns("s")
    a, b = lab.name("a"), lab.name("b")
    lab.veth(a, b, b_ns=ns)
    ip("addr", "add", "198.18.50.1/24", "dev", a)
    ip("-n", ns, "addr", "add", "198.18.50.2/24", "dev", b)
    out = nswatch("snapshot", "--include", f"^{lab.prefix}", check=True).stdout
    assert f"host/{a} <-> {ns}/{b}" in out
    assert "198.18.50.2/24" in out
    state = json.loads(
        nswatch("snapshot", "--json", "--include", f"^{lab.prefix}", check=True).stdout
    )
    assert state["synced"] is True
    assert {"a": {"netns": "host", "link": a}, "b": {"netns": ns, "link": b}} in state["veth_pairs"]


def test_check_config_exit_codes(tmp_path: Path) -> None:
    """check-config exits 0 for a valid file and 2 with file:line: key: problem lines otherwise."""
    good = tmp_path / "good.yaml"
    good.write_text("listen: 127.0.0.1:9442\nprofiles: []\n")
    r = nswatch("check-config", str(good))
    assert r.returncode == 0 and r.stdout.startswith("OK:")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "profiles:\n  - name: p\n    match: '*'\n    veth:\n      host_name: 'v-{id}'\n"
        "      netns_name: eth0\n      pool: 198.18.0.0/24\n      prefix: 31\n"
    )
    r = nswatch("check-config", str(bad))
    assert r.returncode == 2
    assert f"{bad}:8: profiles[0].veth.prefix:" in r.stderr


@pytest.mark.kernel
def test_apply_dry_run_then_apply(lab: Lab, tmp_path: Path) -> None:
    """`apply --dry-run` changes nothing and prints the plan; `apply --netns` does it once."""
    ns = lab.netns("ap")
    lab.host_link(render_host_name("nsw-{id}", ns))
    cfg = tmp_path / "nswatch.yaml"
    cfg.write_text(
        f"include: '^{lab.prefix}'\nprofiles:\n  - name: lab\n    match: '{lab.prefix}*'\n"
        "    loopback: up\n    veth:\n      host_name: 'nsw-{id}'\n      netns_name: eth0\n"
        "      pool: 198.18.0.0/17\n      prefix: 30\n      default_route: true\n"
    )
    r = nswatch("apply", "--config", str(cfg), "--netns", ns, "--dry-run", check=True)
    assert "type veth peer name eth0" in r.stdout and "route add default" in r.stdout
    assert [link["ifname"] for link in ip_json(ns, "link", "show")] == ["lo"]
    nswatch("apply", "--config", str(cfg), "--netns", ns, check=True)
    assert any(r["dst"] == "default" for r in ip_json(ns, "-4", "route", "show"))
    again = nswatch("apply", "--config", str(cfg), "--netns", ns, "--dry-run", check=True)
    assert "0 step(s)" in again.stdout


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


@pytest.mark.kernel
def test_run_serves_and_stops_cleanly(lab: Lab, tmp_path: Path) -> None:
    """`nswatch run` becomes ready, serves state and metrics, reloads on SIGHUP and exits 0 within 2 s of SIGTERM."""
    port = free_port()
    cfg = tmp_path / "nswatch.yaml"
    cfg.write_text(f"include: '^{lab.prefix}'\n")
    proc = subprocess.Popen(
        [
            *NSWATCH,
            "run",
            "--config",
            str(cfg),
            "--listen",
            f"127.0.0.1:{port}",
            "--log-format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(base + "/readyz")[0] == 200, timeout=15)
        ns = lab.netns("run")
        wait_for(lambda: ns.encode() in _get(base + "/api/v1/state")[1], timeout=3)
        status, body = _get(base + "/metrics")
        assert status == 200 and b"nswatch_namespaces" in body
        cfg.write_text("include: '[unclosed'\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: (
                b'nswatch_config_reload_total{result="failure"} 1.0' in _get(base + "/metrics")[1]
            ),
            timeout=5,
        )
        cfg.write_text(f"include: '^{lab.prefix}'\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: (
                b'nswatch_config_reload_total{result="success"} 1.0' in _get(base + "/metrics")[1]
            ),
            timeout=5,
        )
        assert _get(base + "/healthz")[0] == 200
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - t0 < 2.0
        _, err = proc.communicate(timeout=5)
        events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
        assert (
            "synced" in events and "namespace_added" in events and "config_reload_failed" in events
        )
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
