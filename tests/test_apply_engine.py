"""The apply engine's scheduling, without the kernel: what it judges, when, and what it leaves alone."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing

import nswatch.apply
from nswatch.apply import Applier, ApplyEngine, StepFailed
from nswatch.config import Config, parse_config, render_host_name
from nswatch.model import (
    Address,
    AddressNew,
    Change,
    Link,
    LinkNew,
    Model,
    NamespaceSeen,
    NsidLearned,
    Route,
    RouteNew,
    Synced,
)
from nswatch.netns import NetnsEnterer
from nswatch.plan import Step, plan
from tests.kernel import wait_for

PROFILE = """
profiles:
  - name: lab
    match: "lab*"
    loopback: up
    veth:
      host_name: "nsw-{id}"
      netns_name: eth0
      pool: 198.18.0.0/17
      prefix: 30
      default_route: true
    enforce: true
"""
HOST = 1


class FakeApplier(Applier):
    """Records the steps it is asked to run; the kernel is never touched."""

    def __init__(self, enterer: NetnsEnterer, lock_path: str | None = None) -> None:
        super().__init__(enterer, lambda name: None, "host", lock_path)
        self.ran: list[Step] = []

    def host_addresses(self, *args: Any, **kwargs: Any) -> list[Any]:
        return []

    def pending(self, steps: Sequence[Step], inode: int | None = None) -> list[Step]:
        return list(steps)

    def run(self, steps: Sequence[Step], inode: int | None = None) -> list[Step]:
        self.ran.extend(steps)
        return list(steps)


def host_model(synced: bool = True) -> Model:
    m = Model()
    m.apply(NamespaceSeen(HOST, ("host",), is_host=True))
    m.apply(LinkNew(HOST, Link(index=1, name="lo", kind="loopback", admin_up=True)))
    m.apply(LinkNew(HOST, Link(index=2, name="uplink", kind="veth", admin_up=True)))
    if synced:
        m.apply(Synced(HOST))
    return m


def add_namespace(m: Model, i: int, *, wired: bool, resolved: bool = True) -> str:
    """Namespace lab{i} (inode 100+i); ``wired``: exactly what the profile asks for."""
    name, inode, hindex = f"lab{i}", 100 + i, 1000 + i
    m.apply(NamespaceSeen(inode, (name,)))
    m.apply(LinkNew(inode, Link(index=1, name="lo", kind="loopback", admin_up=wired)))
    if wired:
        host_ip, ns_ip = f"198.18.{i}.1", f"198.18.{i}.2"
        hname = render_host_name("nsw-{id}", name)
        m.apply(
            LinkNew(
                HOST,
                Link(hindex, hname, "veth", admin_up=True, peer_index=2, peer_netnsid=i),
            )
        )
        m.apply(
            LinkNew(
                inode, Link(2, "eth0", "veth", admin_up=True, peer_index=hindex, peer_netnsid=0)
            )
        )
        if resolved:
            m.apply(NsidLearned(HOST, i, inode))
            m.apply(NsidLearned(inode, 0, HOST))
        m.apply(AddressNew(HOST, Address(hindex, "inet", host_ip, 30)))
        m.apply(AddressNew(inode, Address(2, "inet", ns_ip, 30)))
        m.apply(RouteNew(inode, Route(254, "inet", "unicast", "default", gateway=host_ip, dev=2)))
    m.apply(Synced(inode))
    return name


class Counting:
    """Counts calls to the engine's plan() and clock, by namespace."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.plans: Counter[str] = Counter()
        # Held while the test changes the model the engine's views copy.
        self.lock = threading.Lock()
        self.clock_calls = 0
        self.view_calls = 0

        def counted_plan(profile: Any, netns: str, *args: Any, **kwargs: Any) -> list[Step]:
            self.plans[netns] += 1
            return plan(profile, netns, *args, **kwargs)

        monkeypatch.setattr(nswatch.apply, "plan", counted_plan)

    def clock(self) -> float:
        self.clock_calls += 1
        return time.monotonic()

    def viewer(self, model: Model) -> Callable[[], Model]:
        """Fresh copies, like the daemon's views: never the model the test goes on changing."""

        def view() -> Model:
            self.view_calls += 1
            with self.lock:
                return model.copy()

        return view

    def settle(self) -> None:
        """Wait until no plan was made for 0.4 s."""
        last = -1
        while True:
            now = sum(self.plans.values())
            if now == last:
                return
            last = now
            time.sleep(0.4)


@contextlib.contextmanager
def engine_on(
    model: Model, counting: Counting, config: Config | None = None, lock_path: str | None = None
) -> Iterator[tuple[ApplyEngine, FakeApplier]]:
    enterer = NetnsEnterer()
    applier = FakeApplier(enterer, lock_path)
    engine = ApplyEngine(
        config or parse_config(PROFILE), counting.viewer(model), applier, clock=counting.clock
    )
    engine.start()
    try:
        yield engine, applier
    finally:
        engine.stop()
        enterer.close()


def host_link_changed(m: Model, index: int, admin_up: bool) -> list[Change]:
    host = m.namespaces[HOST]
    link = host.links[index]
    return m.apply(
        LinkNew(
            HOST,
            Link(
                link.index,
                link.name,
                link.kind,
                admin_up=admin_up,
                peer_index=link.peer_index,
                peer_netnsid=link.peer_netnsid,
            ),
        )
    )


def test_host_change_judges_only_the_namespaces_it_touches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host link no profile names changes nothing to judge; a namespace's host end changing re-judges that namespace alone."""
    counting = Counting(monkeypatch)
    m = host_model()
    names = [add_namespace(m, i, wired=True) for i in range(40)]
    with engine_on(m, counting) as (engine, applier):
        engine.ready(m)
        wait_for(lambda: set(counting.plans) == set(names))
        counting.settle()
        counting.plans.clear()
        with counting.lock:
            engine.changes(host_link_changed(m, 2, admin_up=False), None)
            engine.changes(host_link_changed(m, 2, admin_up=True), None)
        counting.settle()
        assert not counting.plans
        with counting.lock:
            engine.changes(host_link_changed(m, 1007, admin_up=False), None)
        wait_for(lambda: counting.plans)
        counting.settle()
        assert set(counting.plans) == {"lab7"}
        assert [s.netns for s in applier.ran] == ["host"]  # the host end put back up


def test_nothing_is_judged_before_the_host_is_synced(monkeypatch: pytest.MonkeyPatch) -> None:
    """A synced namespace waits for the host's first sync: before it, every host end looks missing."""
    counting = Counting(monkeypatch)
    m = host_model(synced=False)
    with engine_on(m, counting) as (engine, applier):
        name = add_namespace(m, 3, wired=False)
        engine.changes(_all_changes(m), None)
        time.sleep(0.6)
        engine.tick(m)
        time.sleep(0.3)
        assert applier.ran == []
        with counting.lock:
            m.apply(Synced(HOST))
            engine.tick(m)
        wait_for(lambda: applier.ran)
        assert {s.netns for s in applier.ran} == {"host", name}
        assert applier.ran[0].op == "create_veth"


def _all_changes(m: Model) -> list[Change]:
    """Replay the model's namespaces as changes (what the daemon reported while building it)."""
    replay = Model()
    out: list[Change] = []
    for ns in m.namespaces.values():
        out += replay.apply(NamespaceSeen(ns.inode, ns.names, is_host=ns.is_host))
    for ns in m.namespaces.values():
        for link in ns.links.values():
            out += replay.apply(LinkNew(ns.inode, link))
    return out


def test_a_restart_recognises_its_own_veth_before_the_peers_are_placed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a restart, a host end and eth0 whose peers are not resolved yet are waited for, never created again."""
    counting = Counting(monkeypatch)
    m = host_model()
    name = add_namespace(m, 4, wired=True, resolved=False)
    with engine_on(m, counting) as (engine, applier):
        engine.ready(m)
        wait_for(lambda: counting.plans[name])
        counting.settle()
        assert applier.ran == []
        assert engine.snapshot().last_error == {}
        with counting.lock:
            changes = m.apply(NsidLearned(HOST, 4, 104))
            changes += m.apply(NsidLearned(104, 0, HOST))
        engine.changes(changes, None)
        wait_for(lambda: counting.plans[name] >= 2)
        counting.settle()
        assert applier.ran == []
        assert engine.snapshot().last_error == {}


def test_idle_engine_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing changing, the worker neither wakes nor reads the clock or the model."""
    counting = Counting(monkeypatch)
    m = host_model()
    for i in range(5):
        add_namespace(m, i, wired=True)
    with engine_on(m, counting) as (engine, _applier):
        engine.ready(m)
        wait_for(lambda: len(counting.plans) == 5)
        counting.settle()
        time.sleep(0.6)
        clock, views = counting.clock_calls, counting.view_calls
        time.sleep(1.5)
        assert (counting.clock_calls, counting.view_calls) == (clock, views)


def test_stop_returns_at_once_while_waiting_for_the_allocation_lock(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Another instance holding the subnet lock does not hold up stop(), and the dropped work logs no failure."""
    counting = Counting(monkeypatch)
    m = host_model()
    add_namespace(m, 1, wired=False)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with structlog.testing.capture_logs() as logs:
            enterer = NetnsEnterer()
            applier = FakeApplier(enterer, lock_path=str(tmp_path))
            engine = ApplyEngine(parse_config(PROFILE), counting.viewer(m), applier)
            engine.start()
            engine.ready(m)
            time.sleep(0.5)
            t0 = time.monotonic()
            engine.stop()
            took = time.monotonic() - t0
            thread_gone = not any(t.name == "nswatch-apply" for t in threading.enumerate())
    finally:
        os.close(fd)
        with contextlib.suppress(NameError):
            enterer.close()
    assert took < 2.0
    assert thread_gone
    assert applier.ran == []
    assert not [e for e in logs if e["log_level"] in ("warning", "error")]


def test_conflicting_host_link_is_reported_and_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host link that holds the host end's name but is not this namespace's veth is never touched: a failure is reported."""
    counting = Counting(monkeypatch)
    m = host_model()
    name = "lab9"
    hname = render_host_name("nsw-{id}", name)
    m.apply(LinkNew(HOST, Link(index=77, name=hname, kind="bridge", admin_up=False)))
    add_namespace(m, 9, wired=False)
    with engine_on(m, counting) as (engine, applier):
        engine.ready(m)
        wait_for(lambda: engine.snapshot().last_error)
        counting.settle()
        assert applier.ran == []
        assert hname in engine.snapshot().last_error[name]


def test_namespaces_no_profile_matches_are_never_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Changes in a namespace the profiles do not match never lead to a plan or a step."""
    counting = Counting(monkeypatch)
    m = host_model()
    m.apply(NamespaceSeen(200, ("other",)))
    changes = m.apply(LinkNew(200, Link(index=1, name="lo", kind="loopback")))
    m.apply(Synced(200))
    with engine_on(m, counting) as (engine, applier):
        engine.ready(m)
        engine.changes(changes, None)
        time.sleep(0.5)
        assert counting.plans["other"] == 0
        assert applier.ran == []


def test_steps_stay_in_their_namespace() -> None:
    """Every planned step is for the namespace itself or the host, and the applier refuses a mix of namespaces."""
    config = parse_config(
        PROFILE
        + """
  - name: br
    match: "ctr*"
    loopback: up
    sysctls: {net.ipv4.ip_forward: 1}
    veth:
      host_name: "nsw-{id}"
      netns_name: eth0
      bridge: {name: nswbr0, address: 198.18.128.1/24}
      default_route: true
"""
    )
    m = host_model()
    m.apply(NamespaceSeen(300, ("ctr1",)))
    m.apply(Synced(300))
    add_namespace(m, 5, wired=False)
    for name in ("lab5", "ctr1"):
        profile = config.profile_for(name)
        assert profile is not None
        steps = plan(profile, name, m)
        assert steps
        assert {s.netns for s in steps} <= {name, "host"}
        assert {s.peer_netns for s in steps} <= {"", name}
    enterer = NetnsEnterer()
    try:
        applier = Applier(enterer, lambda name: None)
        with pytest.raises(ValueError):
            applier.run([Step("link_up", "lab5", "lo"), Step("link_up", "ctr1", "lo")])
    finally:
        enterer.close()


def test_allocation_lock_says_whether_someone_else_held_it(tmp_path: Path) -> None:
    """The lock's stamp tells an applier whether another one handed out subnets since it last let go."""
    enterer = NetnsEnterer()
    try:
        a = Applier(enterer, lambda name: None, lock_path=str(tmp_path))
        b = Applier(enterer, lambda name: None, lock_path=str(tmp_path))
        with a.allocation_lock() as others:
            assert others  # nobody stamped it yet: unknown
        with a.allocation_lock() as others:
            assert not others
        with b.allocation_lock() as others:
            assert others
        with a.allocation_lock() as others:
            assert others
        with a.allocation_lock() as others:
            assert not others
    finally:
        enterer.close()


class CountingDumps(FakeApplier):
    """A fake applier that counts the host address dumps."""

    def __init__(self, enterer: NetnsEnterer, lock_path: str | None) -> None:
        super().__init__(enterer, lock_path)
        self.dumps = 0

    def host_addresses(self, *args: Any, **kwargs: Any) -> list[Any]:
        self.dumps += 1
        return []


def test_new_namespaces_cost_no_host_dump_each(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Namespaces needing subnets are allocated from the model: the kernel's host addresses are read once, not per namespace."""
    counting = Counting(monkeypatch)
    m = host_model()
    names = [add_namespace(m, i, wired=False) for i in range(12)]
    enterer = NetnsEnterer()
    applier = CountingDumps(enterer, str(tmp_path))
    engine = ApplyEngine(parse_config(PROFILE), counting.viewer(m), applier)
    engine.start()
    try:
        engine.ready(m)
        wait_for(lambda: {s.peer_netns for s in applier.ran} >= set(names))
        assert applier.dumps <= 1
        subnets = [s.value for s in applier.ran if s.op == "add_address" and s.netns == "host"]
        assert len(set(subnets)) == len(names)
    finally:
        engine.stop()
        enterer.close()


class FailingFor(FakeApplier):
    """A fake applier on which one namespace's steps fail."""

    def __init__(self, enterer: NetnsEnterer, bad: str) -> None:
        super().__init__(enterer)
        self.bad = bad

    def run(self, steps: Sequence[Step], inode: int | None = None) -> list[Step]:
        if any(s.netns == self.bad or s.peer_netns == self.bad for s in steps):
            raise StepFailed(steps[0], OSError(1, "Operation not permitted"))
        return super().run(steps, inode)


def test_one_failing_namespace_does_not_hold_up_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Namespaces set up together are done even when one of them fails; only that one is failing."""
    counting = Counting(monkeypatch)
    m = host_model()
    names = [add_namespace(m, i, wired=False) for i in range(8)]
    enterer = NetnsEnterer()
    applier = FailingFor(enterer, "lab2")
    engine = ApplyEngine(parse_config(PROFILE), counting.viewer(m), applier)
    engine.start()
    try:
        engine.ready(m)
        others = set(names) - {"lab2"}
        wait_for(lambda: {s.peer_netns for s in applier.ran if s.peer_netns} == others)
        wait_for(lambda: engine.snapshot().last_error)
        assert set(engine.snapshot().last_error) == {"lab2"}
        assert "Operation not permitted" in engine.snapshot().last_error["lab2"]
    finally:
        engine.stop()
        enterer.close()
