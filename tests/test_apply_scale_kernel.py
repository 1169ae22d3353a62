"""Auto-apply against the real kernel: restarts, shutdown in flight, and objects it must not touch."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import structlog
import structlog.testing

from nswatch.apply import Applier, ApplyEngine, Gone
from nswatch.config import parse_config, render_host_name
from nswatch.daemon import Daemon, Settings
from nswatch.dirwatch import DirWatcher
from nswatch.netns import NetnsEnterer
from nswatch.plan import Step
from tests.kernel import Lab, ip, ip_json, wait_for
from tests.test_apply_kernel import add_namespaces

pytestmark = pytest.mark.kernel


def config_for(prefix: str) -> str:
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
      pool: 198.18.0.0/17
      prefix: 30
      default_route: true
    enforce: true
"""


@contextmanager
def running(lab: Lab) -> Iterator[tuple[Daemon, ApplyEngine]]:
    daemon = Daemon(
        Settings(include=f"^{lab.prefix}", reconcile_interval=0), dirwatch_factory=DirWatcher
    )
    engine = ApplyEngine(
        parse_config(config_for(lab.prefix)), daemon.view, Applier(daemon.enterer, daemon.path_of)
    )
    daemon.observers.append(engine)
    engine.start()
    daemon.start()
    try:
        assert daemon.ready.wait(10)
        yield daemon, engine
    finally:
        daemon.request_stop()
        assert daemon.loop_thread is not None
        daemon.loop_thread.join(5)
        engine.stop()


def wired(ns: str) -> bool:
    return any(r["dst"] == "default" for r in ip_json(ns, "-4", "route", "show"))


def test_restarts_raise_no_false_failures(lab: Lab) -> None:
    """After a restart the wired namespaces are recognised: no step is run, no failure shows, three restarts in a row."""
    names = [lab.name(f"r{i}") for i in range(6)]
    with running(lab):
        add_namespaces(lab, names)
        wait_for(lambda: all(wired(n) for n in names), timeout=10)
        time.sleep(0.5)
    for _restart in range(3):
        with structlog.testing.capture_logs() as logs, running(lab) as (_daemon, engine):
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                snap = engine.snapshot()
                assert snap.last_error == {}, snap.last_error
                time.sleep(0.05)
            assert wait_for(lambda: engine.snapshot().evaluations >= len(names))
            snap = engine.snapshot()
            assert ("lab", "failure") not in snap.applied
        events = [e["event"] for e in logs]
        assert "apply_failed" not in events
        assert "applied" not in events and "repaired" not in events


def test_shutdown_while_wiring_is_quiet_and_quick(lab: Lab) -> None:
    """Stopping the daemon in the middle of a burst drops the rest without failures, and the engine stops within 2 s."""
    names = [lab.name(f"q{i}") for i in range(80)]
    with structlog.testing.capture_logs() as logs, running(lab) as (daemon, engine):
        add_namespaces(lab, names)
        wait_for(lambda: engine.snapshot().applied.get(("lab", "success"), 0) >= 1, timeout=10)
        t0 = time.monotonic()
        daemon.request_stop()
        assert daemon.loop_thread is not None
        daemon.loop_thread.join(5)
        engine.stop()
        took = time.monotonic() - t0
    assert took < 2.0
    failed = [e for e in logs if e["event"] in ("apply_failed", "apply_error")]
    assert not failed, failed[:3]


def test_steps_never_land_in_a_namespace_that_took_the_name(lab: Lab) -> None:
    """Steps planned for one namespace are refused when its name now holds another: nothing changes there."""
    a = lab.netns("ga")
    other = lab.netns("gb")
    inode_other = os.stat(f"/run/netns/{other}").st_ino
    enterer = NetnsEnterer()
    try:
        applier = Applier(enterer, lambda name: f"/run/netns/{name}")
        with pytest.raises(Gone):
            applier.run([Step("link_up", a, "lo")], inode=inode_other)
    finally:
        enterer.close()
    lo = ip_json(a, "link", "show", "lo")[0]
    assert "UP" not in lo["flags"]


def test_host_link_holding_the_host_end_name_is_left_alone(lab: Lab) -> None:
    """A host veth pair that holds the host end's name is not ours: it is reported, not rewired, addressed or deleted."""
    with running(lab) as (_daemon, engine):
        ns = lab.name("c1")
        hname = render_host_name("nsw-{id}", ns)
        lab.veth(hname, lab.name("cp"))
        before = ip_json(None, "link", "show", hname)[0]
        ip("netns", "add", ns)
        lab.namespaces.append(ns)
        wait_for(lambda: hname in engine.snapshot().last_error.get(ns, ""), timeout=5)
        time.sleep(0.5)
        after = ip_json(None, "link", "show", hname)[0]
        assert after["ifindex"] == before["ifindex"]
        assert after["flags"] == before["flags"]
        assert ip_json(None, "addr", "show", hname)[0]["addr_info"] == []
        assert not [link for link in ip_json(ns, "link", "show") if link["ifname"] == "eth0"]
