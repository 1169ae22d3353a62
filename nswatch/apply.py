"""Carrying out plan steps against the kernel, and the engine that decides when.

The decision is :mod:`nswatch.plan` (pure); this module only does it: netlink
requests through pyroute2 on a socket opened inside the right namespace, and
sysctl writes from a thread that has entered it. The engine runs on its own
thread so the event loop never waits for the kernel.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nswatch.config import Config, Profile, render_host_name
from nswatch.model import Change, Model
from nswatch.netns import NetnsEnterer
from nswatch.observer import BaseObserver
from nswatch.plan import (
    Addressing,
    AllocationError,
    Step,
    addressing,
    drift,
    existing_subnet,
    p2p_addressing,
    plan,
)
from nswatch.settings import DEFAULTS

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# How long after applying a namespace's steps its drift is not judged.
GRACE = 0.5


class StepFailed(Exception):
    """A step the kernel refused."""

    def __init__(self, step: Step, err: BaseException) -> None:
        super().__init__(f"{step}: {err}")
        self.step = step
        self.err = err


def sysctl_path(key: str) -> str:
    """/proc/sys path of a dotted sysctl name."""
    return "/proc/sys/" + key.replace(".", "/")


class Applier:
    """Runs steps in namespaces found through ``resolve`` (name -> namespace file path)."""

    def __init__(
        self,
        enterer: NetnsEnterer,
        resolve: Callable[[str], str | None],
        host_label: str = DEFAULTS.host_label,
        lock_path: str | None = "/run/netns",
    ) -> None:
        self.enterer = enterer
        self.resolve = resolve
        self.host_label = host_label
        self.lock_path = lock_path

    @contextlib.contextmanager
    def allocation_lock(self) -> Iterator[None]:
        """Hold a lock that every nswatch on this host takes to hand out subnets.

        An flock on the namespace directory itself: it needs no file of its
        own (the directory may be read-only to us), and the kernel drops it
        if the process dies.
        """
        try:
            fd = os.open(self.lock_path or "", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def host_addresses(self) -> list[tuple[str, ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
        """(link name, address) of every host address right now, from the kernel (not the model)."""
        out = []
        with self._ipr(self.host_label) as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            for msg in ipr.get_addr():
                ip = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if ip:
                    iface = ipaddress.ip_interface(f"{ip}/{msg['prefixlen']}")
                    out.append((str(names.get(msg["index"], "")), iface))
        return out

    @contextlib.contextmanager
    def _fd(self, netns: str) -> Iterator[int]:
        if netns == self.host_label:
            fd = self.enterer.home_fd()
        else:
            path = self.resolve(netns)
            if path is None:
                raise FileNotFoundError(f"namespace {netns} is not known")
            fd = self.enterer.open_ns(path)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _ipr(self, netns: str) -> Iterator[Any]:
        if netns == self.host_label:
            ipr = IPRoute()
        else:
            with self._fd(netns) as fd:
                sock = self.enterer.run_in(
                    fd, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0)
                )
            ipr = IPRoute(use_socket=sock)
        try:
            yield ipr
        finally:
            ipr.close()
            if netns != self.host_label:
                sock.close()

    def read_sysctl(self, netns: str, key: str) -> str | None:
        """A sysctl's value inside ``netns`` (None when it does not exist)."""

        def read() -> str | None:
            try:
                with open(sysctl_path(key)) as f:
                    return f.read().strip()
            except FileNotFoundError:
                return None

        with self._fd(netns) as fd:
            return self.enterer.run_in(fd, read)

    def pending(self, steps: Sequence[Step]) -> list[Step]:
        """The steps minus sysctls that already hold their value (the model cannot see those)."""
        out = []
        for step in steps:
            if step.op == "set_sysctl":
                try:
                    if self.read_sysctl(step.netns, step.link) == step.value:
                        continue
                except OSError:
                    pass
            out.append(step)
        return out

    def run(self, steps: Sequence[Step]) -> list[Step]:
        """Do the steps in order; stop at the first failure (later ones depend on it).

        Returns the steps that changed something (a sysctl already at its
        value is skipped).
        """
        done: list[Step] = []
        for step in steps:
            try:
                if self._do(step):
                    done.append(step)
            except (OSError, NetlinkError, ValueError) as e:
                raise StepFailed(step, e) from e
        return done

    def _do(self, step: Step) -> bool:
        if step.op == "set_sysctl":
            return self._sysctl(step)
        with self._ipr(step.netns) as ipr:
            if step.op == "create_bridge":
                ipr.link("add", ifname=step.link, kind="bridge")
            elif step.op == "create_veth":
                mtu = {"mtu": int(step.value)} if step.value else {}
                with self._fd(step.peer_netns) as peer_fd:
                    ipr.link(
                        "add",
                        ifname=step.link,
                        kind="veth",
                        peer={"ifname": step.peer, "net_ns_fd": peer_fd, **mtu},
                        **mtu,
                    )
            elif step.op == "set_mtu":
                ipr.link("set", index=_index(ipr, step.link), mtu=int(step.value))
            elif step.op == "set_master":
                ipr.link("set", index=_index(ipr, step.link), master=_index(ipr, step.value))
            elif step.op == "link_up":
                ipr.link("set", index=_index(ipr, step.link), state="up")
            elif step.op == "add_address":
                ip, _, prefix = step.value.partition("/")
                try:
                    ipr.addr("add", index=_index(ipr, step.link), address=ip, prefixlen=int(prefix))
                except NetlinkError as e:
                    if e.code != 17:  # EEXIST: someone was quicker; that's the goal
                        raise
            elif step.op == "add_route":
                kw: dict[str, Any] = {"dst": step.value}
                if step.via:
                    kw["gateway"] = step.via
                if step.link:
                    kw["oif"] = _index(ipr, step.link)
                if step.metric is not None:
                    kw["priority"] = step.metric
                if step.table is not None:
                    kw["table"] = step.table
                try:
                    ipr.route("add", **kw)
                except NetlinkError as e:
                    if e.code != 17:
                        raise
        return True

    def _sysctl(self, step: Step) -> bool:
        def write() -> bool:
            path = sysctl_path(step.link)
            with open(path) as f:
                if f.read().strip() == step.value:
                    return False
            with open(path, "w") as f:
                f.write(step.value)
            return True

        with self._fd(step.netns) as fd:
            return self.enterer.run_in(fd, write)


def _index(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise ValueError(f"no link {name}")
    return int(found[0])


# --- the engine -----------------------------------------------------------------


@dataclass
class ApplyStats:
    """What the engine did, for metrics (read under the engine's lock)."""

    applied: dict[tuple[str, str], int] = field(default_factory=dict)  # (profile, result) -> n
    drift: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (netns, profile, kind)
    last_error: dict[str, str] = field(default_factory=dict)  # netns -> error


class ApplyEngine(BaseObserver):
    """Applies profiles to matching namespaces and tracks drift, on its own thread.

    Every namespace that matches a profile is set up once when it first
    appears (or at start); after that, any change in it or on the host is a
    reason to compare again. Missing objects are drift: reported always,
    repaired only when the profile says ``enforce: true``.
    """

    def __init__(
        self,
        config: Config,
        view: Callable[[], Model],
        applier: Applier,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.view = view
        self.applier = applier
        self._use(config)
        self.clock = clock
        self.log = structlog.get_logger("nswatch.apply")
        self.stats = ApplyStats()
        self.lock = threading.Lock()
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._seen: set[str] = set()
        self._failures: dict[str, tuple[int, float]] = {}
        # Subnets and bridge addresses handed out but maybe not yet visible in
        # the model: two namespaces appearing together must not share one.
        self._reserved: dict[str, Addressing] = {}
        # After applying, drift is not judged until the model has caught up.
        self._grace: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._dirty: set[str] = set()
        self._dirty_lock = threading.Lock()

    # -- observer side (event-loop thread): only enqueue --

    def changes(self, changes: Sequence[Change], reason: str | None) -> None:
        names: set[str] = set()
        host_changed = False
        for ch in changes:
            if ch.kind == "namespace" and ch.action == "removed":
                self._forget(ch.netns)
                continue
            if ch.netns == self.config.settings.host_label:
                host_changed = True
            else:
                names.add(ch.netns)
        if host_changed:
            with self.lock:
                names.update(self._seen)
        for n in names:
            if self.config.profile_for(n) is not None:
                self._mark(n)

    def ready(self, model: Model) -> None:
        for ns in model.namespaces.values():
            if not ns.is_host and self.config.profile_for(ns.name) is not None:
                self._mark(ns.name)

    def _mark(self, name: str) -> None:
        with self._dirty_lock:
            if name in self._dirty:
                return
            self._dirty.add(name)
        self._queue.put(name)

    def _forget(self, name: str) -> None:
        with self.lock:
            self._seen.discard(name)
            self._reserved.pop(name, None)
            self._failures.pop(name, None)
            for key in [k for k in self.stats.drift if k[0] == name]:
                del self.stats.drift[key]
            self.stats.last_error.pop(name, None)

    # -- worker thread --

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._run, name="nswatch-apply", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(5)
            self._thread = None

    def stopping(self) -> None:
        self.stop()

    def _use(self, config: Config) -> None:
        # The plans name the host by the config's label and the applier
        # enters the host for that label: both must follow the one config.
        self.config = config
        self.applier.host_label = config.settings.host_label

    def reload(self, config: Config) -> None:
        """Use a new config (after SIGHUP); every namespace is compared again."""
        self._use(config)
        with self.lock:
            seen = list(self._seen)
        for name in seen:
            self._mark(name)

    def _run(self) -> None:
        while True:
            try:
                name = self._queue.get(timeout=GRACE)
            except queue.Empty:
                self._recheck_after_grace()
                continue
            if name is None:
                return
            with self._dirty_lock:
                self._dirty.discard(name)
            try:
                self.evaluate(name)
            except Exception as e:  # the worker must outlive any one namespace
                self.log.warning("apply_error", netns=name, error=str(e))

    def evaluate(self, name: str) -> list[Step]:
        """Compare ``name`` with its profile; apply when due. Returns the steps done."""
        profile = self.config.profile_for(name)
        ns = self.view().get(name)
        if profile is None or ns is None or not ns.synced:
            return []
        with self._allocation(profile, name) as (taken, mine):
            return self._evaluate(profile, name, self.view(), taken, mine)

    def once(self, name: str, *, dry_run: bool) -> tuple[Profile | None, list[Step], str | None]:
        """For ``nswatch apply``: (profile, the steps for ``name`` now, error), done unless dry."""
        profile = self.config.profile_for(name)
        if profile is None or self.view().get(name) is None:
            return profile, [], None
        with self._allocation(profile, name) as (taken, mine):
            model = self.view()
            try:
                addr = self._addressing(profile, name, model, taken, mine)
            except AllocationError as e:
                return profile, [], str(e)
            steps = self.applier.pending(
                plan(profile, name, model, self.config.settings.host_label, addr)
            )
            if not dry_run and steps:
                try:
                    self.applier.run(steps)
                except StepFailed as e:
                    return profile, steps, str(e)
            return profile, steps, None

    @contextlib.contextmanager
    def _allocation(
        self, profile: Profile, name: str
    ) -> Iterator[tuple[list[Network], Network | None]]:
        """(subnets other namespaces hold, the one the kernel shows as ``name``'s), under the lock.

        Another nswatch may be handing out subnets of the same pool right
        now, faster than our model hears of it: allocate under a host-wide
        lock, against the kernel's addresses of this very moment.
        """
        veth = profile.veth
        if veth is None or veth.pool is None or veth.prefix is None:
            yield [], None
            return
        pool, prefix = veth.pool, veth.prefix
        hname = render_host_name(veth.host_name, name)
        with self.applier.allocation_lock():
            taken: list[Network] = []
            mine: Network | None = None
            for ifname, iface in self.applier.host_addresses():
                if iface.version != pool.version or iface.ip not in pool:
                    continue
                net = ipaddress.ip_network(f"{iface.ip}/{prefix}", strict=False)
                if ifname == hname:
                    mine = net
                else:
                    taken.append(net)
            yield taken, mine

    def _addressing(
        self, profile: Profile, name: str, model: Model, taken: list[Network], mine: Network | None
    ) -> Addressing:
        """The namespace's addresses, never one another namespace holds or was given."""
        with self.lock:
            own = self._reserved.get(name)
            others = [a for n, a in self._reserved.items() if n != name]
        held = existing_subnet(profile, name, model, self.config.settings.host_label)
        if mine is not None:
            # The kernel says this namespace's host end already has its
            # subnet (perhaps from another nswatch, faster than our model).
            addr = p2p_addressing(mine)
        elif own is not None and (held is None or (own.host and own.host.network == held)):
            # What we handed this namespace before stays its own, even
            # while the model has not caught up with our steps yet.
            addr = own
        else:
            addr = addressing(
                profile,
                name,
                model,
                self.config.settings.host_label,
                reserved=[*taken, *(a.host.network for a in others if a.host is not None)],
                reserved_ips=[str(a.netns.ip) for a in others if a.netns is not None],
            )
        with self.lock:
            self._reserved[name] = addr
        return addr

    def _evaluate(
        self,
        profile: Profile,
        name: str,
        model: Model,
        taken: list[Network],
        mine: Network | None = None,
    ) -> list[Step]:
        with self.lock:
            first = name not in self._seen
        try:
            addr = self._addressing(profile, name, model, taken, mine)
            steps = self.applier.pending(
                plan(profile, name, model, self.config.settings.host_label, addr)
            )
        except AllocationError as e:
            self._record(profile, name, [], error=str(e))
            return []
        missing = drift(steps)
        if not first and self.clock() < self._grace.get(name, 0.0):
            # Our own steps are still arriving in the model: what looks
            # missing now is most likely in flight. Look again after.
            return []
        self._grace.pop(name, None)
        with self.lock:
            before = {k: self.stats.drift.get((name, profile.name, k)) for k in missing}
            for kind, n in missing.items():
                # A namespace seen for the first time is being set up, not drifting.
                self.stats.drift[(name, profile.name, kind)] = 0 if first else n
        if first or profile.enforce:
            if not steps or self._backing_off(name):
                if not steps:
                    with self.lock:
                        self._seen.add(name)
                return []
            return self._apply(profile, name, steps, first)
        if any(missing.values()) and before != missing:
            self.log.warning(
                "drift", netns=name, profile=profile.name, missing=[str(s) for s in steps]
            )
        return []

    def _recheck_after_grace(self) -> None:
        now = self.clock()
        for name, until in list(self._grace.items()):
            if now >= until:
                del self._grace[name]
                self._mark(name)

    def _backing_off(self, name: str) -> bool:
        fails, last = self._failures.get(name, (0, 0.0))
        # Retry a failing namespace after 1, 2, 4 ... up to 60 s: a profile
        # that cannot apply must not spin against the kernel.
        return fails > 0 and self.clock() - last < min(60.0, 2.0 ** (fails - 1))

    def _apply(self, profile: Profile, name: str, steps: list[Step], first: bool) -> list[Step]:
        try:
            done = self.applier.run(steps)
        except StepFailed as e:
            fails = self._failures.get(name, (0, 0.0))[0] + 1
            self._failures[name] = (fails, self.clock())
            self._record(profile, name, [], error=str(e))
            return []
        self._failures.pop(name, None)
        with self.lock:
            self._seen.add(name)
        if done:
            self._grace[name] = self.clock() + GRACE
        self._record(profile, name, done)
        if done:
            self.log.info(
                "applied" if first else "repaired",
                netns=name,
                profile=profile.name,
                steps=[str(s) for s in done],
            )
        return done

    def _record(
        self, profile: Profile, name: str, done: list[Step], error: str | None = None
    ) -> None:
        result = "failure" if error else "success"
        with self.lock:
            key = (profile.name, result)
            self.stats.applied[key] = self.stats.applied.get(key, 0) + 1
            if error:
                self.stats.last_error[name] = error
            else:
                self.stats.last_error.pop(name, None)
        if error:
            self.log.warning("apply_failed", netns=name, profile=profile.name, error=error)

    def snapshot(self) -> ApplyStats:
        """A copy of the counters and drift gauges."""
        with self.lock:
            return ApplyStats(
                dict(self.stats.applied), dict(self.stats.drift), dict(self.stats.last_error)
            )
