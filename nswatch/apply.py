"""Carrying out plan steps against the kernel, and the engine that decides when.

The decision is :mod:`nswatch.plan` (pure); this module only does it: netlink
requests (:mod:`nswatch.rtrequest`) on a socket opened inside the right namespace, and
sysctl writes from a thread that has entered it. The engine runs on its own
thread so the event loop never waits for the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from nswatch import rtrequest
from nswatch.config import Config, Profile, render_host_name
from nswatch.decode import (
    IFADDRMSG,
    NLMSG_DONE,
    NLMSG_ERROR,
    attrs,
    decode_address,
    dump_request,
    error_code,
    messages,
)
from nswatch.model import (
    AddressAdded,
    AddressChanged,
    AddressRemoved,
    Change,
    Link,
    LinkAdded,
    LinkChanged,
    LinkRemoved,
    Model,
    NamespaceRemoved,
    NamespaceRenamed,
    VethLost,
    VethResolved,
)
from nswatch.netns import NetnsEnterer
from nswatch.observer import BaseObserver
from nswatch.plan import (
    Addressing,
    AllocationError,
    Blocked,
    Lookup,
    Step,
    addressing,
    drift,
    existing_subnet,
    free_subnet,
    p2p_addressing,
    plan,
)
from nswatch.rtrequest import Channel
from nswatch.settings import DEFAULTS

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# The longest drift is not judged after applying a namespace's steps, while
# their results are still arriving in the model (it ends early once the
# model shows them all).
GRACE = 3.0
# Waiting longer than this for the allocation lock is logged.
LOCK_SLOW = 0.25
# Namespaces whose steps run at once (most of a step is waiting for the kernel).
PARALLEL = 4
# The extended attribute of the lock directory each allocating instance stamps.
STAMP = "user.nswatch.allocation"
IFA_LABEL = 3
# When the kernel refused to create a veth the model does not show yet, look
# again this much later (its arrival in the model usually comes first).
RECHECK = 1.0


class StepFailed(Exception):
    """A step the kernel refused."""

    def __init__(self, step: Step, err: BaseException) -> None:
        super().__init__(f"{step}: {err}")
        self.step = step
        self.err = err


class Cancelled(Exception):
    """The engine is stopping: whatever was in flight is dropped, quietly."""


class Gone(Exception):
    """The namespace went away (or its name now holds another one): nothing to do there."""


def sysctl_path(key: str) -> str:
    """/proc/sys path of a dotted sysctl name."""
    return "/proc/sys/" + key.replace(".", "/")


class Applier:
    """Runs steps in namespaces found through ``resolve`` (name -> namespace file path).

    A namespace's steps are only ever carried out on a socket opened in the
    namespace file that still holds the inode the plan was made for.
    """

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
        # Set when the engine stops: runs and lock waits give up at once.
        self.cancelled = threading.Event()
        # The stamp this applier left on the allocation lock last time.
        self._stamp: bytes | None = None
        # Seconds the last allocation waited for another holder of the lock.
        self.lock_waited = 0.0

    @contextlib.contextmanager
    def allocation_lock(self) -> Iterator[bool]:
        """Hold the lock every nswatch on this host takes to hand out subnets.

        An flock on the namespace directory itself: it needs no file of its
        own, and the kernel drops it if the process dies. Waited for in
        short non-blocking tries, so a stop never hangs behind another
        instance's allocation.

        Yields whether another holder may have handed out subnets since this
        applier last let go of the lock: each holder leaves a fresh stamp in
        an extended attribute of the directory (``user.nswatch.allocation``)
        when it lets go, so an unchanged stamp means nobody else did. When
        the stamp cannot be read or written, always True.
        """
        try:
            fd = os.open(self.lock_path or "", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            yield True
            return
        try:
            t0 = time.monotonic()
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self.cancelled.wait(0.01):
                        raise Cancelled() from None
            self.lock_waited = time.monotonic() - t0
            try:
                seen: bytes | None = os.getxattr(fd, STAMP)
            except OSError:
                seen = None
            try:
                yield seen is None or seen != self._stamp
            finally:
                self._stamp = f"{os.getpid()}:{time.time_ns()}".encode()
                try:
                    os.setxattr(fd, STAMP, self._stamp)
                except OSError:
                    self._stamp = None
        finally:
            os.close(fd)

    def host_addresses(self, family: int = 0) -> list[tuple[int, str, Interface]]:
        """(ifindex, label, address) of every host address now, from the kernel (not the model).

        One address dump, no link dump: IPv4 addresses carry their link's
        name as label (IPv6 ones an empty label).
        """
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        out: list[tuple[int, str, Interface]] = []
        try:
            sock.bind((0, 0))
            sock.send(dump_request("address", family, 1))
            while True:
                for msg in messages(sock.recv(1 << 20)):
                    if msg.type == NLMSG_DONE:
                        return out
                    if msg.type == NLMSG_ERROR:
                        code = -error_code(msg)
                        raise OSError(code, os.strerror(code))
                    a = decode_address(msg)
                    if a is None:
                        continue
                    label = attrs(msg.body, IFADDRMSG.size).get(IFA_LABEL, b"")
                    iface = ipaddress.ip_interface(f"{a.address}/{a.prefixlen}")
                    out.append((a.link, label.rstrip(b"\0").decode(errors="replace"), iface))
        finally:
            sock.close()

    def pending(self, steps: Sequence[Step], inode: int | None = None) -> list[Step]:
        """The steps minus sysctls that already hold their value (the model cannot see those)."""
        if not any(step.op == "set_sysctl" for step in steps):
            return list(steps)
        out = []
        with _Handles(self, inode) as h:
            for step in steps:
                if step.op == "set_sysctl":
                    try:
                        if h.read_sysctl(step.netns, step.link) == step.value:
                            continue
                    except OSError:
                        pass
                out.append(step)
        return out

    def read_sysctl(self, netns: str, key: str, inode: int | None = None) -> str | None:
        """A sysctl's value inside ``netns`` (None when it does not exist)."""
        with _Handles(self, inode) as h:
            return h.read_sysctl(netns, key)

    def run(self, steps: Sequence[Step], inode: int | None = None) -> list[Step]:
        """Do the steps in order; stop at the first failure (later ones depend on it).

        ``inode``: the namespace the steps were planned for; a name that now
        holds another namespace raises :class:`Gone`. Every step must be for
        one namespace (and the host). Returns the steps that changed
        something (a sysctl already at its value is skipped).
        """
        names = {s.netns for s in steps} | {s.peer_netns for s in steps if s.peer_netns}
        if len(names - {self.host_label}) > 1:
            raise ValueError(f"steps for more than one namespace: {sorted(names)}")
        done: list[Step] = []
        with _Handles(self, inode) as h:
            for step in steps:
                if self.cancelled.is_set():
                    raise Cancelled()
                try:
                    if h.do(step):
                        done.append(step)
                except (Gone, Cancelled):
                    raise
                except (OSError, ValueError) as e:
                    raise StepFailed(step, e) from e
        return done


def _same_for_plans(old: Link, new: Link) -> bool:
    """Whether a link change leaves everything a plan looks at as it was (carrier, counters)."""
    return (old.name, old.kind, old.admin_up, old.mtu, old.master) == (
        new.name,
        new.kind,
        new.admin_up,
        new.mtu,
        new.master,
    ) and (old.peer_index, old.peer_netnsid) == (new.peer_index, new.peer_netnsid)


class _Handles:
    """The sockets and fds one run needs, each opened once and closed at the end."""

    def __init__(self, applier: Applier, inode: int | None) -> None:
        self.a = applier
        self.inode = inode
        self._fds: dict[str, int] = {}
        self._channels: dict[str, Channel] = {}
        self._index: dict[tuple[str, str], int] = {}

    def __enter__(self) -> _Handles:
        return self

    def __exit__(self, *exc: object) -> None:
        for channel in self._channels.values():
            channel.sock.close()
        for fd in self._fds.values():
            os.close(fd)

    def fd(self, netns: str) -> int:
        fd = self._fds.get(netns)
        if fd is not None:
            return fd
        if netns == self.a.host_label:
            fd = self.a.enterer.home_fd()
        else:
            path = self.a.resolve(netns)
            if path is None:
                raise Gone(f"namespace {netns} is not known")
            try:
                fd = self.a.enterer.open_ns(path, self.inode)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ESTALE):
                    raise Gone(f"namespace {netns}: {e}") from e
                raise
        self._fds[netns] = fd
        return fd

    def channel(self, netns: str) -> Channel:
        channel = self._channels.get(netns)
        if channel is None:
            if netns == self.a.host_label:
                sock = Channel.new_socket()
            else:
                sock = self.a.enterer.run_in(self.fd(netns), Channel.new_socket)
            channel = self._channels[netns] = Channel(sock)
        return channel

    def index(self, netns: str, name: str) -> int:
        key = (netns, name)
        found = self._index.get(key)
        if found is None:
            found = self.channel(netns).link_index(name)
            if found is None:
                raise ValueError(f"no link {name}")
            self._index[key] = found
        return found

    def read_sysctl(self, netns: str, key: str) -> str | None:
        def read() -> str | None:
            try:
                with open(sysctl_path(key)) as f:
                    return f.read().strip()
            except FileNotFoundError:
                return None

        return self.a.enterer.run_in(self.fd(netns), read)

    def do(self, step: Step) -> bool:
        if step.op == "set_sysctl":
            return self._sysctl(step)
        ch = self.channel(step.netns)
        seq = ch.next_seq()
        if step.op == "create_bridge":
            ch.call(rtrequest.create_bridge(seq, step.link))
        elif step.op == "create_veth":
            mtu = int(step.value) if step.value else None
            peer_fd = self.fd(step.peer_netns)
            ch.call(rtrequest.create_veth(seq, step.link, step.peer, peer_fd, mtu))
        elif step.op == "set_mtu":
            ch.call(rtrequest.set_link(seq, self.index(step.netns, step.link), mtu=int(step.value)))
        elif step.op == "set_master":
            index = self.index(step.netns, step.link)
            master = self.index(step.netns, step.value)
            ch.call(rtrequest.set_link(seq, index, master=master))
        elif step.op == "link_up":
            ch.call(rtrequest.set_link(seq, self.index(step.netns, step.link), up=True))
        elif step.op == "add_address":
            index = self.index(step.netns, step.link)
            try:
                ch.call(rtrequest.add_address(seq, index, step.value))
            except OSError as e:
                if e.errno != errno.EEXIST:  # someone was quicker; that's the goal
                    raise
        elif step.op == "add_route":
            oif = self.index(step.netns, step.link) if step.link else None
            request = rtrequest.add_route(
                seq, step.value, gateway=step.via, oif=oif, metric=step.metric, table=step.table
            )
            try:
                ch.call(request)
            except OSError as e:
                if e.errno != errno.EEXIST:
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

        return self.a.enterer.run_in(self.fd(step.netns), write)


# --- the engine -----------------------------------------------------------------


@dataclass
class ApplyStats:
    """What the engine did, for metrics (read under the engine's lock)."""

    applied: dict[tuple[str, str], int] = field(default_factory=dict)  # (profile, result) -> n
    drift: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (netns, profile, kind)
    last_error: dict[str, str] = field(default_factory=dict)  # netns -> error
    # Namespaces compared with their profile (one plan each), since start.
    evaluations: int = 0


@dataclass
class _Todo:
    profile: Profile
    name: str
    inode: int


@dataclass
class _Job:
    item: _Todo
    steps: list[Step]
    first: bool


class ApplyEngine(BaseObserver):
    """Applies profiles to matching namespaces and tracks drift, on its own thread.

    Every namespace that matches a profile is set up once when it first
    appears (or at start); after that, a change that can affect it is a
    reason to compare again: a change inside it, or on the host a change of
    its veth's host end or its bridge. Missing objects are drift: reported
    always, repaired only when the profile says ``enforce: true``.

    The event-loop side only maps changes to namespace names; the worker
    takes every name marked since its last turn as one batch, judged on one
    shared view of the model. With nothing marked and no timer due it
    blocks. ``view`` must return immutable snapshots such as
    :meth:`nswatch.daemon.Daemon.view` (a namespace object is reused only
    while unchanged): indexes built over one are kept for the next.
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
        # Guards stats, _seen and _reserved (read by metrics and reload).
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # Between the event loop and the worker: names to judge, names
        # waiting for their (or the host's) first sync, names gone.
        self._cond = threading.Condition()
        self._dirty: set[str] = set()
        self._working = False
        self._unsynced: set[str] = set()
        self._gone: set[str] = set()
        # The event loop's map from host links to the namespaces they serve.
        self._index_lock = threading.Lock()
        self._host_ifnames: dict[int, str] = {}
        self._owners: dict[str, set[str]] = {}
        self._serves: dict[str, tuple[str, ...]] = {}  # netns -> host link names it uses
        # The worker's own state.
        self._seen: set[str] = set()
        self._reserved: dict[str, Addressing] = {}
        self._failures: dict[str, tuple[int, float]] = {}
        # After applying, drift is not judged until the model shows the
        # steps' results, or GRACE has passed.
        self._grace: dict[str, float] = {}
        self._timers: dict[str, float] = {}
        self._lookup: Lookup | None = None
        self._conflicts: dict[str, str] = {}

    @property
    def host_label(self) -> str:
        """The host namespace's name in the model."""
        return self.config.settings.host_label

    def _use(self, config: Config) -> None:
        # The plans name the host by the config's label and the applier
        # enters the host for that label: both must follow the one config.
        self.config = config
        self.applier.host_label = config.settings.host_label

    # -- observer side (event-loop thread): map changes to names, no I/O --

    def changes(self, changes: Sequence[Change], reason: str | None) -> None:
        host = self.host_label
        names: set[str] = set()
        with self._index_lock:
            for ch in changes:
                if isinstance(ch, NamespaceRemoved):
                    self._unregister(ch.netns)
                    self._gone.add(ch.netns)
                    continue
                if isinstance(ch, LinkChanged) and _same_for_plans(ch.old, ch.link):
                    continue
                if isinstance(ch, NamespaceRenamed) and ch.old and ch.old[0] != ch.netns:
                    self._unregister(ch.old[0])
                    self._gone.add(ch.old[0])
                if ch.netns != host:
                    names.add(ch.netns)
                else:
                    names |= self._host_touches(ch)
            names = {n for n in names if self._register(n)}
        if names or self._gone:
            with self._cond:
                self._dirty |= names
                self._cond.notify()

    def _host_touches(self, ch: Change) -> set[str]:
        """The namespaces a change on the host can affect: whose host end or bridge it names.

        Profiles put nothing else on the host (no routes there), so no
        other host change can make a namespace drift.
        """
        touched: set[str] = set()
        if isinstance(ch, LinkAdded | LinkRemoved | LinkChanged):
            if isinstance(ch, LinkRemoved):
                self._host_ifnames.pop(ch.link.index, None)
            else:
                self._host_ifnames[ch.link.index] = ch.link.name
            touched |= self._owners.get(ch.link.name, set())
            if isinstance(ch, LinkChanged):
                touched |= self._owners.get(ch.old.name, set())
        elif isinstance(ch, AddressAdded | AddressRemoved | AddressChanged):
            if ch.address.scope == "link":
                return touched  # the kernel's own IPv6 link-local addresses
            ifname = self._host_ifnames.get(ch.address.link)
            if ifname is not None:
                touched |= self._owners.get(ifname, set())
        elif isinstance(ch, VethResolved | VethLost):
            touched |= self._owners.get(ch.pair.a_link, set())
            touched.add(ch.pair.b_netns)
        return touched

    def _register(self, name: str) -> bool:
        """Index ``name``'s host links; False when no profile matches it (under _index_lock)."""
        if name == self.host_label:
            return False
        if name in self._serves:
            return True
        profile = self.config.profile_for(name)
        if profile is None:
            return False
        serves: list[str] = []
        if profile.veth is not None:
            serves.append(render_host_name(profile.veth.host_name, name))
            if profile.veth.bridge is not None:
                serves.append(profile.veth.bridge.name)
        for ifname in serves:
            self._owners.setdefault(ifname, set()).add(name)
        self._serves[name] = tuple(serves)
        return True

    def _unregister(self, name: str) -> None:
        for ifname in self._serves.pop(name, ()):
            owners = self._owners.get(ifname)
            if owners is not None:
                owners.discard(name)
                if not owners:
                    del self._owners[ifname]

    def ready(self, model: Model) -> None:
        host = model.get(self.host_label)
        with self._index_lock:
            if host is not None:
                self._host_ifnames = {i: link.name for i, link in host.links.items()}
            names = {
                ns.name
                for ns in model.namespaces.values()
                if not ns.is_host and self._register(ns.name)
            }
        with self._cond:
            self._dirty |= names
            self._cond.notify()

    def tick(self, model: Model) -> None:
        # The model says nothing when a namespace's first sync completes
        # without changes: look at the waiting ones here (on the loop's
        # thread, so the live model may be read). Costs nothing when none wait.
        if not self._unsynced:
            return
        host = model.get(self.host_label)
        if host is None or not host.synced:
            return
        with self._cond:
            done = set()
            for name in self._unsynced:
                ns = model.get(name)
                if ns is None or ns.synced:
                    done.add(name)
            if done:
                self._unsynced -= done
                self._dirty |= done
                self._cond.notify()

    def stopping(self) -> None:
        self.stop()

    # -- lifecycle --

    def start(self) -> None:
        """Start the worker thread."""
        self._stopping.clear()
        self.applier.cancelled.clear()
        self._thread = threading.Thread(target=self._run, name="nswatch-apply", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.5) -> None:
        """Stop the worker thread: whatever is in flight is dropped between two steps."""
        self._stopping.set()
        self.applier.cancelled.set()
        with self._cond:
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def reload(self, config: Config) -> None:
        """Use a new config (after SIGHUP); every namespace is compared again."""
        self._use(config)
        with self._index_lock:
            names = list(self._serves)
            self._serves.clear()
            self._owners.clear()
            marked = {n for n in names if self._register(n)}
        with self._cond:
            self._dirty |= marked
            self._cond.notify()

    # -- worker thread --

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._dirty and not self._gone and not self._stopping.is_set():
                    wait = self._next_timer()
                    if wait is not None and wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stopping.is_set():
                    return
                names, self._dirty = self._dirty, set()
                gone, self._gone = self._gone, set()
                self._unsynced -= gone
                self._working = True
            try:
                for name in gone:
                    self._forget(name)
                names |= self._due()
                self._batch(names - gone)
            except Cancelled:
                return
            except Exception as e:  # the worker must outlive any one batch
                self.log.warning("apply_error", error=str(e))
            finally:
                with self._cond:
                    self._working = False

    def idle(self) -> bool:
        """True when nothing is marked, in hand, or waiting out a grace (any thread)."""
        with self._cond:
            return not (self._dirty or self._gone or self._working or self._grace or self._timers)

    def _next_timer(self) -> float | None:
        if not self._timers:
            return None
        return min(self._timers.values()) - self.clock()

    def _due(self) -> set[str]:
        if not self._timers:
            return set()
        now = self.clock()
        due = {n for n, t in self._timers.items() if t <= now}
        for n in due:
            del self._timers[n]
        return due

    def _later(self, name: str, when: float) -> None:
        self._timers[name] = min(when, self._timers.get(name, when))

    def _forget(self, name: str) -> None:
        self._failures.pop(name, None)
        self._grace.pop(name, None)
        self._timers.pop(name, None)
        self._conflicts.pop(name, None)
        with self.lock:
            self._seen.discard(name)
            self._reserved.pop(name, None)
            for key in [k for k in self.stats.drift if k[0] == name]:
                del self.stats.drift[key]
            self.stats.last_error.pop(name, None)

    def _wait_for_sync(self, names: Iterable[str]) -> None:
        with self._cond:
            self._unsynced.update(names)

    def _batch(self, names: set[str]) -> None:
        """Judge ``names`` on one view; allocate every new subnet of the batch under one lock."""
        if not names:
            return
        view = self.view()
        look = Lookup(view, self.host_label, self._lookup)
        self._lookup = look
        if look.host is None or not look.host.synced:
            # Before the host is synced every host end looks missing.
            self._wait_for_sync(names)
            return
        todo: list[_Todo] = []
        for name in sorted(names):
            profile = self.config.profile_for(name)
            ns = view.get(name)
            if profile is None or ns is None:
                continue
            if not ns.synced:
                self._wait_for_sync([name])
                continue
            todo.append(_Todo(profile, name, ns.inode))
        allocate: list[_Todo] = []
        jobs: list[_Job] = []
        for item in todo:
            if self._stopping.is_set():
                raise Cancelled()
            try:
                addr = self._known_addressing(item, view, look)
            except AllocationError as e:
                self._record(item.profile, item.name, [], error=str(e))
                continue
            if addr is None:
                allocate.append(item)
            elif job := self._judge(item, view, look, addr):
                jobs.append(job)
        self._carry_out(jobs)
        if allocate:
            # Held until the new subnets are on the host ends.
            with self.applier.allocation_lock() as others:
                if self.applier.lock_waited > LOCK_SLOW:
                    # Another nswatch on this host held it: say why we were late.
                    self.log.info(
                        "allocation_lock_waited",
                        seconds=round(self.applier.lock_waited, 3),
                        namespaces=len(allocate),
                    )
                jobs = []
                for item, got in self._allocate(allocate, view, look, others):
                    if not isinstance(got, Addressing):
                        self._record(item.profile, item.name, [], error=str(got))
                    elif job := self._judge(item, view, look, got):
                        jobs.append(job)
                self._carry_out(jobs)

    def _known_addressing(self, item: _Todo, view: Model, look: Lookup) -> Addressing | None:
        """The namespace's addresses when they need no new subnet; None when one must be allocated.

        Raises AllocationError when a bridge subnet is full.
        """
        profile, name = item.profile, item.name
        veth = profile.veth
        if veth is None or veth.pool is None or veth.prefix is None:
            # No pool: nothing to allocate across instances (bridge
            # addresses live inside the namespaces).
            others = self._reserved_others(name)
            addr = addressing(
                profile,
                name,
                view,
                self.host_label,
                reserved_ips=[str(a.netns.ip) for a in others if a.netns is not None],
                lookup=look,
            )
            with self.lock:
                self._reserved[name] = addr
            return addr
        held = existing_subnet(profile, name, view, self.host_label, look)
        if held is not None:
            addr = p2p_addressing(held)
            with self.lock:
                self._reserved[name] = addr
            return addr
        with self.lock:
            own = self._reserved.get(name)
        if own is not None and name in self._grace:
            # Handed out a moment ago; the model has not shown it yet.
            return own
        return None

    def _reserved_others(self, name: str) -> list[Addressing]:
        with self.lock:
            return [a for n, a in self._reserved.items() if n != name]

    def _allocate(
        self, items: list[_Todo], view: Model, look: Lookup, others: bool
    ) -> list[tuple[_Todo, Addressing | Exception]]:
        """Subnets for namespaces that hold none, under the host-wide lock (the caller's).

        The model is current for everything this instance did (with
        ``_reserved`` for what it has not shown yet). Another nswatch may
        have handed out subnets of the same pool faster than our model hears
        of them: when the lock says someone else held it since our last
        allocation (``others``), one address dump of the host, for the whole
        batch, shows what they added. Every holder adds its host ends'
        addresses before it lets go, so nothing is missed.
        """
        out: list[tuple[_Todo, Addressing | Exception]] = []
        kernel = self.applier.host_addresses() if others else []
        used: dict[tuple[Network, int], set[Network]] = {}
        for item in items:
            veth = item.profile.veth
            assert veth is not None and veth.pool is not None and veth.prefix is not None
            pool, prefix = veth.pool, veth.prefix
            hname = render_host_name(veth.host_name, item.name)
            hlink = look.link(look.host, hname)
            hindex = hlink.index if hlink is not None else None
            mine: Network | None = None
            taken: set[Network] = set()
            for ifindex, label, iface in kernel:
                if iface.version != pool.version or iface.ip not in pool:
                    continue
                net = ipaddress.ip_network(f"{iface.ip}/{prefix}", strict=False)
                if ifindex == hindex or label == hname:
                    mine = net
                else:
                    taken.add(net)
            if mine is not None:
                # Another instance set this namespace up a moment ago.
                addr = p2p_addressing(mine)
            else:
                key = (pool, prefix)
                if key not in used:
                    used[key] = look.pool_used(pool, prefix)
                with self.lock:
                    own = self._reserved.get(item.name)
                    held = {
                        a.host.network
                        for n, a in self._reserved.items()
                        if n != item.name and a.host is not None
                    }
                busy = used[key] | taken | held
                if own is not None and own.host is not None and own.host.network not in busy:
                    # What this namespace was given before stays its own.
                    addr = own
                else:
                    try:
                        addr = p2p_addressing(free_subnet(pool, prefix, item.name, busy))
                    except AllocationError as e:
                        out.append((item, e))
                        continue
            if addr.host is not None:
                used.setdefault((pool, prefix), set()).add(addr.host.network)
            with self.lock:
                self._reserved[item.name] = addr
            out.append((item, addr))
        return out

    def _judge(self, item: _Todo, view: Model, look: Lookup, addr: Addressing) -> _Job | None:
        """Compare one namespace with its profile: the steps to apply now, if any."""
        profile, name = item.profile, item.name
        with self.lock:
            self.stats.evaluations += 1
            first = name not in self._seen
        try:
            planned = plan(profile, name, view, self.host_label, addr, look)
        except Blocked as e:
            if not e.pending:
                self._conflict(profile, name, str(e))
            return None
        self._conflicts.pop(name, None)
        until = self._grace.get(name)
        if until is not None:
            if any(s.op != "set_sysctl" for s in planned) and self.clock() < until:
                # Our own steps are still arriving in the model: what looks
                # missing now is most likely in flight. Look again after.
                return None
            del self._grace[name]
            self._timers.pop(name, None)
        try:
            steps = self.applier.pending(planned, item.inode)
        except Gone:
            return None
        missing = drift(steps)
        with self.lock:
            before = {k: self.stats.drift.get((name, profile.name, k)) for k in missing}
            for kind, n in missing.items():
                # A namespace seen for the first time is being set up, not drifting.
                self.stats.drift[(name, profile.name, kind)] = 0 if first else n
        if first or profile.enforce:
            if not steps:
                with self.lock:
                    self._seen.add(name)
                    self.stats.last_error.pop(name, None)
                self._failures.pop(name, None)
                return None
            if self._backing_off(name):
                return None
            return _Job(item, steps, first)
        if any(missing.values()) and before != missing:
            self.log.warning(
                "drift", netns=name, profile=profile.name, missing=[str(s) for s in steps]
            )
        return None

    def _conflict(self, profile: Profile, name: str, reason: str) -> None:
        """The veth's names are held by objects nswatch did not make: report, touch nothing."""
        if self._conflicts.get(name) == reason:
            return
        self._conflicts[name] = reason
        self._record(profile, name, [], error=reason)

    def _backing_off(self, name: str) -> bool:
        fails, last = self._failures.get(name, (0, 0.0))
        if fails == 0:
            return False
        # Retry a failing namespace after 1, 2, 4 ... up to 60 s: a profile
        # that cannot apply must not spin against the kernel.
        retry = last + min(60.0, 2.0 ** (fails - 1))
        if self.clock() < retry:
            self._later(name, retry)
            return True
        return False

    def _carry_out(self, jobs: list[_Job]) -> None:
        """Run the jobs' steps, several namespaces at once; then note what came of each.

        Most of a step's time is the kernel's (and waiting for its locks),
        so a few namespaces go in parallel, as a shell would run several
        `ip -batch` jobs; everything the engine keeps is updated on its own
        thread afterwards.
        """
        if len(jobs) <= 1:
            outcomes = [self._attempt(job) for job in jobs]
        else:
            with ThreadPoolExecutor(PARALLEL, thread_name_prefix="nswatch-apply-run") as pool:
                outcomes = list(pool.map(self._attempt, jobs))
        for job, outcome in zip(jobs, outcomes, strict=True):
            self._finish(job, outcome)

    def _attempt(self, job: _Job) -> list[Step] | StepFailed | Gone | Cancelled:
        try:
            return self.applier.run(job.steps, job.item.inode)
        except (StepFailed, Gone, Cancelled) as e:
            return e

    def _finish(self, job: _Job, outcome: list[Step] | StepFailed | Gone | Cancelled) -> None:
        profile, name = job.item.profile, job.item.name
        if isinstance(outcome, Cancelled):
            raise outcome
        if isinstance(outcome, Gone):
            return  # the namespace went; its removal is on its way
        if isinstance(outcome, StepFailed):
            e = outcome
            if (
                e.step.op == "create_veth"
                and isinstance(e.err, OSError)
                and e.err.errno == errno.EEXIST
            ):
                # Our model has not seen the pair yet (another instance, or
                # our own earlier run): look again once it has.
                self._later(name, self.clock() + RECHECK)
                return
            fails = self._failures.get(name, (0, 0.0))[0] + 1
            now = self.clock()
            self._failures[name] = (fails, now)
            self._later(name, now + min(60.0, 2.0 ** (fails - 1)))
            self._record(profile, name, [], error=str(e))
            return
        done = outcome
        self._failures.pop(name, None)
        with self.lock:
            self._seen.add(name)
        if done:
            until = self.clock() + GRACE
            self._grace[name] = until
            self._later(name, until)
        self._record(profile, name, done)
        if done:
            self.log.info(
                "applied" if job.first else "repaired",
                netns=name,
                profile=profile.name,
                steps=[str(s) for s in done],
            )

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

    # -- one-shot (``nswatch apply``), on the caller's thread --

    def once(self, name: str, *, dry_run: bool) -> tuple[Profile | None, list[Step], str | None]:
        """For ``nswatch apply``: (profile, the steps for ``name`` now, error), done unless dry."""
        profile = self.config.profile_for(name)
        view = self.view()
        ns = view.get(name)
        if profile is None or ns is None:
            return profile, [], None
        item = _Todo(profile, name, ns.inode)
        look = Lookup(view, self.host_label)
        try:
            addr = self._known_addressing(item, view, look)
            if addr is not None:
                return profile, *self._once(item, view, look, addr, dry_run)
            with self.applier.allocation_lock() as others:
                [(_, got)] = self._allocate([item], view, look, others)
                if isinstance(got, Exception):
                    return profile, [], str(got)
                return profile, *self._once(item, view, look, got, dry_run)
        except (Blocked, AllocationError) as e:
            return profile, [], str(e)

    def _once(
        self, item: _Todo, view: Model, look: Lookup, addr: Addressing, dry_run: bool
    ) -> tuple[list[Step], str | None]:
        steps = self.applier.pending(
            plan(item.profile, item.name, view, self.host_label, addr, look), item.inode
        )
        if not dry_run and steps:
            try:
                self.applier.run(steps, item.inode)
            except StepFailed as e:
                return steps, str(e)
            except Gone as e:
                return steps, str(e)
        return steps, None

    def snapshot(self) -> ApplyStats:
        """A copy of the counters and drift gauges."""
        with self.lock:
            return ApplyStats(
                dict(self.stats.applied),
                dict(self.stats.drift),
                dict(self.stats.last_error),
                self.stats.evaluations,
            )
