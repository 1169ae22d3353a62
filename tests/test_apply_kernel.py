"""Auto-apply against the real kernel: setup within a second, drift reported and repaired."""

from __future__ import annotations

import subprocess
import time

import pytest

from nswatch.apply import Applier, ApplyEngine
from nswatch.config import parse_config, render_host_name
from nswatch.daemon import Daemon, Settings
from nswatch.dirwatch import DirWatcher
from nswatch.plan import Blocked, plan
from tests.kernel import Lab, ip, ip_json, wait_for

pytestmark = pytest.mark.kernel


def profile_yaml(prefix: str, enforce: bool) -> str:
    return f"""
profiles:
  - name: lab
    match: "{prefix}*"
    loopback: up
    sysctls:
      net.ipv4.ip_forward: 1
    veth:
      host_name: "nsw-{{id}}"
      netns_name: eth0
      mtu: 1400
      pool: 198.18.0.0/17
      prefix: 30
      default_route: true
    routes:
      - {{dst: 198.19.0.0/24, via: host_end}}
    enforce: {"true" if enforce else "false"}
"""


def run_engine(lab: Lab, enforce: bool) -> tuple[Daemon, ApplyEngine]:
    config = parse_config(profile_yaml(lab.prefix, enforce))
    daemon = Daemon(
        Settings(include=f"^{lab.prefix}", reconcile_interval=0), dirwatch_factory=DirWatcher
    )
    engine = ApplyEngine(config, daemon.view, Applier(daemon.enterer, daemon.path_of))
    daemon.observers.append(engine)
    engine.start()
    daemon.start()
    assert daemon.ready.wait(10)
    return daemon, engine


def stop(daemon: Daemon, engine: ApplyEngine) -> None:
    daemon.request_stop()
    assert daemon.loop_thread is not None
    daemon.loop_thread.join(2)
    engine.stop()


def add_namespaces(lab: Lab, names: list[str]) -> None:
    """Create namespaces in one `ip -batch` (as fast as ip can) and own their host ends."""
    subprocess.run(
        ["ip", "-batch", "-"],
        input="".join(f"netns add {n}\n" for n in names),
        text=True,
        check=True,
    )
    lab.namespaces.extend(names)
    for n in names:
        lab.host_link(render_host_name("nsw-{id}", n))


def default_route(ns: str) -> list[dict[str, object]]:
    return [r for r in ip_json(ns, "-4", "route", "show") if r["dst"] == "default"]


def test_new_namespace_is_set_up_within_a_second(lab: Lab) -> None:
    """A namespace matching a profile gets its veth, addresses, routes, lo and sysctl within 1 s, and traffic flows."""
    daemon, engine = run_engine(lab, enforce=True)
    try:
        t0 = time.monotonic()
        ns = lab.netns("a1")
        lab.host_link(render_host_name("nsw-{id}", ns))
        wait_for(lambda: default_route(ns), timeout=1.0, interval=0.01)
        assert time.monotonic() - t0 < 1.0
        routes = {r["dst"] for r in ip_json(ns, "-4", "route", "show")}
        assert {"default", "198.19.0.0/24"} <= routes
        lo = ip_json(ns, "link", "show", "lo")[0]
        assert "UP" in lo["flags"]
        fwd = subprocess.run(
            ["ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.ip_forward"],
            capture_output=True,
            text=True,
        )
        assert fwd.stdout.strip() == "1"
        gw = str(default_route(ns)[0]["gateway"])
        ping = subprocess.run(
            ["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "2", gw], capture_output=True
        )
        assert ping.returncode == 0
        eth0 = ip_json(ns, "link", "show", "eth0")[0]
        assert eth0["mtu"] == 1400
    finally:
        stop(daemon, engine)


def test_two_namespaces_at_once_get_distinct_subnets(lab: Lab) -> None:
    """Namespaces created together never share a subnet."""
    daemon, engine = run_engine(lab, enforce=True)
    try:
        names = [lab.name(f"s{i}") for i in range(6)]
        add_namespaces(lab, names)
        wait_for(lambda: all(default_route(n) for n in names), timeout=5)
        subnets = []
        for n in names:
            addr = ip_json(n, "-4", "addr", "show", "eth0")[0]["addr_info"][0]
            subnets.append(
                (addr["local"].rsplit(".", 1)[0], int(addr["local"].rsplit(".", 1)[1]) // 4)
            )
        assert len(set(subnets)) == len(names)
    finally:
        stop(daemon, engine)


def test_drift_is_repaired_when_enforced(lab: Lab) -> None:
    """Deleting the profile's default route is drift; with enforce: true it is put back."""
    daemon, engine = run_engine(lab, enforce=True)
    try:
        ns = lab.netns("d1")
        lab.host_link(render_host_name("nsw-{id}", ns))
        wait_for(lambda: default_route(ns), timeout=2)
        ip("-n", ns, "route", "del", "default")
        wait_for(lambda: default_route(ns), timeout=3)
        assert engine.snapshot().applied.get(("lab", "success"), 0) >= 2
    finally:
        stop(daemon, engine)


def test_drift_is_reported_when_not_enforced(lab: Lab) -> None:
    """Without enforce, a missing route is counted as drift and left alone."""
    daemon, engine = run_engine(lab, enforce=False)
    try:
        ns = lab.netns("r1")
        lab.host_link(render_host_name("nsw-{id}", ns))
        wait_for(lambda: default_route(ns), timeout=2)
        ip("-n", ns, "route", "del", "default")
        wait_for(lambda: engine.snapshot().drift.get((ns, "lab", "route")) == 1, timeout=3)
        time.sleep(0.3)
        assert not default_route(ns)
        ip("-n", ns, "link", "del", "eth0")
        wait_for(lambda: engine.snapshot().drift.get((ns, "lab", "link"), 0) >= 1, timeout=3)
    finally:
        stop(daemon, engine)


def settled(daemon: Daemon, engine: ApplyEngine, names: list[str]) -> bool:
    """True when this instance's model shows every namespace complete and its engine has nothing left to do.

    Complete: the plan holds nothing but sysctls (which the model cannot
    see). Nothing left: no namespace queued or in its post-apply grace, and
    each one set up (seen) by this engine.
    """
    model = daemon.view()
    profile = engine.config.profiles[0]
    try:
        complete = all(
            {s.op for s in plan(profile, n, model, engine.config.settings.host_label)}
            <= {"set_sysctl"}
            for n in names
        )
    except Blocked:
        return False  # a pair whose peers this model has not placed yet
    with engine.lock:
        seen = set(engine._seen)
    return complete and set(names) <= seen and engine.idle()


def test_two_daemons_never_share_a_subnet(lab: Lab) -> None:
    """Two nswatch instances applying the same profile to namespaces created together hand out distinct subnets, one per namespace."""
    first = run_engine(lab, enforce=True)
    second = run_engine(lab, enforce=True)
    try:
        names = [lab.name(f"t{i}") for i in range(8)]
        add_namespaces(lab, names)
        wait_for(lambda: all(default_route(n) for n in names), timeout=10)
        # Both instances done with every namespace: nothing either could still add.
        wait_for(lambda: settled(*first, names) and settled(*second, names), timeout=10)
        subnets = []
        for n in names:
            infos = ip_json(n, "-4", "addr", "show", "eth0")[0]["addr_info"]
            assert len(infos) == 1, (n, infos)
            host = ip_json(None, "-4", "addr", "show", render_host_name("nsw-{id}", n))[0][
                "addr_info"
            ]
            assert len(host) == 1, (n, host)
            subnets.append(
                infos[0]["local"].rsplit(".", 1)[0]
                + "."
                + str(int(infos[0]["local"].rsplit(".", 1)[1]) // 4)
            )
        assert len(set(subnets)) == len(names)
    finally:
        stop(*second)
        stop(*first)
