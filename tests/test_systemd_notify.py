"""sd_notify against a real NOTIFY_SOCKET listener (AF_UNIX datagrams), and the watchdog logic."""

from __future__ import annotations

import array
import collections
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nswatch import systemd
from nswatch.daemon import Settings
from nswatch.model import Link, Model, Namespace
from nswatch.observer import BaseObserver
from nswatch.systemd import Notifier, SystemdObserver, notify_address, watchdog_interval
from tests.conftest import require_root, start_daemon, stop_daemon
from tests.kernel import Lab, wait_for


@dataclass
class Message:
    """One datagram as systemd would see it: fields plus the sender's credentials."""

    fields: dict[str, str]
    raw: bytes
    pid: int | None
    uid: int | None


class Listener:
    """A NOTIFY_SOCKET as systemd opens it: datagrams, with SO_PASSCRED.

    Like systemd, it reads its socket promptly (a thread moves datagrams into
    a list every few ms): the kernel queues only a few datagrams per socket
    (net.unix.max_dgram_qlen, 10 here), and a sender may drop what does not fit.
    """

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(address)
        # systemd reads the sender's pid from SCM_CREDENTIALS to tell the main
        # process's messages from others'; check that ours carry it.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.address = address
        self._lock = threading.Lock()
        self._got: collections.deque[Message] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener")
        self._thread.start()

    @property
    def env_value(self) -> str:
        """How systemd would write this address in NOTIFY_SOCKET."""
        return "@" + self.address[1:] if self.address.startswith("\0") else self.address

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self._pump()

    def _pump(self) -> None:
        """Move every datagram the kernel holds into the list."""
        creds_size = struct.calcsize("3i")
        with self._lock:
            while True:
                try:
                    data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds_size))
                except (BlockingIOError, OSError):
                    return
                pid = uid = None
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                        pid, uid, _gid = array.array("i", payload[:creds_size])
                fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
                self._got.append(Message(fields, data, pid, uid))

    def recv(self, timeout: float = 5.0) -> Message:
        """The next datagram; TimeoutError if none comes within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self._pump()
            with self._lock:
                if self._got:
                    return self._got.popleft()
            if time.monotonic() >= deadline:
                raise TimeoutError("no datagram")
            time.sleep(0.002)

    def pending(self) -> list[Message]:
        """Every datagram sent so far and not yet read (without waiting)."""
        self._pump()
        with self._lock:
            out = list(self._got)
            self._got.clear()
        return out

    def next_with(self, key: str, timeout: float = 5.0) -> tuple[Message, list[Message]]:
        """The first datagram carrying ``key``, and the ones before it."""
        before: list[Message] = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if key in msg.fields:
                return msg, before
            before.append(msg)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    """A listener on a socket file."""
    s = Listener(str(tmp_path / "notify"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    """A listener on an abstract socket (what systemd uses for user managers and nspawn)."""
    s = Listener(f"\0nswatch-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        yield s
    finally:
        s.close()


# --- the environment -----------------------------------------------------------------


def test_notify_address_forms() -> None:
    """A path is used as is, '@' means the abstract namespace, anything else is off."""
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@sd/notify"}) == "\0sd/notify"
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": ""}) is None
    assert notify_address({"NOTIFY_SOCKET": "@"}) is None
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    assert notify_address({"NOTIFY_SOCKET": "relative/path"}) is None


def test_watchdog_interval() -> None:
    """Half of WATCHDOG_USEC, only for the process WATCHDOG_PID names (if set)."""
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "-5"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "42"}, pid=42) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "42"}, pid=43) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "x"}, pid=42) is None
    own = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(own) == 0.5


def test_reads_os_environ(monkeypatch: pytest.MonkeyPatch, listener: Listener) -> None:
    """Without an explicit mapping, the process environment is read."""
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier.from_env().ready()
    assert listener.recv().fields == {"READY": "1"}
    assert watchdog_interval() == 2.0
    obs = systemd.observer_for(object())
    assert obs.notifier.address == listener.address
    assert obs.watchdog == 2.0


# --- messages on a real socket -------------------------------------------------------


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_messages_reach_a_real_listener(
    kind: str, listener: Listener, abstract_listener: Listener
) -> None:
    """Every message type arrives as one datagram, with our pid in its credentials."""
    target = listener if kind == "path" else abstract_listener
    n = Notifier.from_env({"NOTIFY_SOCKET": target.env_value})
    assert n.enabled

    assert n.ready("watching 2 namespaces, 3 links")
    msg = target.recv()
    assert msg.raw == b"READY=1\nSTATUS=watching 2 namespaces, 3 links"
    assert msg.pid == os.getpid()
    assert msg.uid == os.getuid()

    assert n.status("syncing")
    assert target.recv().raw == b"STATUS=syncing"

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    msg = target.recv()
    assert list(msg.fields) == ["RELOADING", "MONOTONIC_USEC"]
    assert msg.fields["RELOADING"] == "1"
    # systemd >= 253 matches the reply against the time the reload began, on
    # CLOCK_MONOTONIC in microseconds.
    assert before <= int(msg.fields["MONOTONIC_USEC"]) <= after

    assert n.ready()
    assert target.recv().raw == b"READY=1"
    assert n.watchdog()
    assert target.recv().raw == b"WATCHDOG=1"
    assert n.stopping()
    assert target.recv().raw == b"STOPPING=1"


def test_status_is_one_line(listener: Listener) -> None:
    """A newline in STATUS= would start a new field: it is flattened."""
    n = Notifier(listener.address)
    assert n.status("two\nlines")
    assert listener.recv().raw == b"STATUS=two lines"


def test_from_another_thread(listener: Listener) -> None:
    """Messages sent from another thread still carry the process's pid (the tgid)."""
    n = Notifier(listener.address)
    t = threading.Thread(target=n.watchdog)
    t.start()
    t.join()
    msg = listener.recv()
    assert msg.raw == b"WATCHDOG=1"
    assert msg.pid == os.getpid()


def test_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd every call does nothing and says so."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier.from_env()
    assert not n.enabled
    assert not n.ready("x")
    assert not n.reloading()
    assert not n.watchdog()
    assert not n.stopping()
    obs = systemd.observer_for(object())
    m = _model(1, 1)
    obs.ready(m)
    obs.tick(m)
    obs.reloading()
    obs.reloaded()
    obs.stopping()


def test_gone_listener_is_not_an_error(tmp_path: Path) -> None:
    """A vanished manager socket makes sends fail quietly, never raise."""
    path = str(tmp_path / "gone")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens: ECONNREFUSED
    assert not Notifier(path).ready()
    assert not Notifier(str(tmp_path / "never")).ready()  # ENOENT
    assert not Notifier("\0nswatch-nobody-listens").ready()


def test_busy_manager_never_blocks_pings(tmp_path: Path) -> None:
    """A full queue drops pings and status lines at once; state changes wait, but not forever."""
    path = str(tmp_path / "busy")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as other,
    ):
        manager.bind(path)
        other.setblocking(False)
        with pytest.raises(BlockingIOError):
            for _ in range(100_000):  # until the kernel's queue for it is full
                other.sendto(b"X=1", path)
        n = Notifier(path, send_timeout=0.3)
        started = time.monotonic()
        assert not n.watchdog()
        assert not n.status("busy")
        assert time.monotonic() - started < 0.1
        started = time.monotonic()
        assert not n.ready()
        assert 0.25 <= time.monotonic() - started < 2
        manager.recv(64)  # the manager catches up: room for one
        assert n.ready()


# --- the observer --------------------------------------------------------------------


def _model(namespaces: int, links_each: int, synced: bool = True) -> Model:
    m = Model()
    for i in range(namespaces):
        ns = Namespace(inode=1000 + i, names=(f"ns{i}",), is_host=i == 0, synced=synced)
        for j in range(links_each):
            ns.links[j + 1] = Link(index=j + 1, name=f"l{j}", kind="device")
        m.namespaces[ns.inode] = ns
        m.by_name[ns.name] = ns.inode
    return m


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_status_line() -> None:
    """The one-line summary counts namespaces, links and veth pairs."""
    m = _model(12, 2)
    m.peers[(1000, 1)] = (1001, 1)
    m.peers[(1001, 1)] = (1000, 1)
    assert systemd.status_line(m) == "watching 12 namespaces, 24 links, 1 veth pair"
    assert systemd.status_line(_model(1, 1)) == "watching 1 namespace, 1 link, 0 veth pairs"


def test_observer_lifecycle(listener: Listener) -> None:
    """Syncing status, READY=1 with a summary, pings at the interval, status on change only."""
    clock = Clock()
    obs = SystemdObserver(Notifier(listener.address), watchdog=2.0, clock=clock)
    m = _model(3, 2, synced=False)
    m.namespaces[1000].synced = True

    obs.tick(m)  # first turn: ping at once, and say we are syncing
    assert [x.raw for x in listener.pending()] == [
        b"WATCHDOG=1",
        b"STATUS=syncing: 1 of 3 namespaces read",
    ]
    clock.now += 0.5
    obs.tick(m)
    assert listener.pending() == []  # neither a ping nor a status is due

    for ns in m.namespaces.values():
        ns.synced = True
    obs.ready(m)
    assert listener.recv().raw == b"READY=1\nSTATUS=watching 3 namespaces, 6 links, 0 veth pairs"

    clock.now += 1.5  # 2 s since the last ping
    obs.tick(m)
    assert [x.raw for x in listener.pending()] == [b"WATCHDOG=1"]  # same summary: no STATUS

    m.namespaces[1003] = Namespace(inode=1003, names=("new",), synced=True)
    clock.now += 1.0
    obs.tick(m)
    assert [x.raw for x in listener.pending()] == [
        b"STATUS=watching 4 namespaces, 6 links, 0 veth pairs"
    ]
    clock.now += 1.0
    obs.tick(m)
    assert [x.raw for x in listener.pending()] == [b"WATCHDOG=1"]

    obs.reloading()
    msg = listener.recv()
    assert msg.fields["RELOADING"] == "1"
    assert "MONOTONIC_USEC" in msg.fields
    assert msg.fields["STATUS"] == "reloading configuration"
    del m.namespaces[1003]
    clock.now += 1.0
    obs.tick(m)  # the status keeps saying "reloading" until it is over
    assert [x.raw for x in listener.pending()] == []
    obs.reloaded()
    assert listener.recv().raw == b"READY=1\nSTATUS=watching 4 namespaces, 6 links, 0 veth pairs"
    clock.now += 1.0
    obs.tick(m)
    assert [x.raw for x in listener.pending()] == [
        b"WATCHDOG=1",
        b"STATUS=watching 3 namespaces, 6 links, 0 veth pairs",
    ]

    obs.stopping()
    assert listener.recv().raw == b"STOPPING=1\nSTATUS=stopping"
    clock.now += 1.0
    m.namespaces.clear()
    obs.tick(m)
    assert listener.pending() == []  # no status after STOPPING=1 (nor a ping due)


def test_no_watchdog_no_pings(listener: Listener) -> None:
    """Without WATCHDOG_USEC the observer never pings."""
    clock = Clock()
    obs = SystemdObserver(Notifier(listener.address), watchdog=None, clock=clock)
    m = _model(1, 1)
    obs.ready(m)
    listener.recv()
    for _ in range(5):
        clock.now += 10
        obs.tick(m)
    assert all("WATCHDOG" not in x.fields for x in listener.pending())


def test_reload_before_ready_sends_nothing(listener: Listener) -> None:
    """A SIGHUP during the first sync must not send READY=1 early."""
    obs = SystemdObserver(Notifier(listener.address), watchdog=None, clock=Clock())
    obs.reloading()
    obs.reloaded()
    assert listener.pending() == []


# --- with the real event loop ----------------------------------------------------------


class Wedge(BaseObserver):
    """An observer that can block the event loop, as a bug or a hung call would."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.release = threading.Event()
        self.blocked = threading.Event()

    def tick(self, model: Model) -> None:
        if self.armed.is_set():
            self.blocked.set()
            self.release.wait(10)


@pytest.fixture
def lab_a() -> Iterator[Lab]:
    """Kernel objects with this file's prefix, removed whatever happens."""
    require_root()
    lab = Lab(prefix=f"nswA{os.getpid() % 0xFFFF:04x}")
    try:
        yield lab
    finally:
        lab.cleanup()


@pytest.mark.kernel
def test_daemon_ready_and_watchdog_follow_the_loop(lab_a: Lab, listener: Listener) -> None:
    """READY=1 comes after the first full sync and counts it; pings stop while the loop is wedged."""
    ns = lab_a.netns("n1")
    lab_a.veth(lab_a.name("h"), lab_a.name("p"), None, ns)
    wedge = Wedge()
    obs = SystemdObserver(Notifier(listener.address), watchdog=0.1)
    running = start_daemon(
        Settings(include=f"^{lab_a.prefix}", reconcile_interval=0), observers=[wedge, obs]
    )
    try:
        daemon = running.daemon
        ready, before = listener.next_with("READY")
        assert daemon.ready.is_set()
        assert all(
            m.fields.get("STATUS", "").startswith("syncing") for m in before if "STATUS" in m.fields
        )
        # Host + our namespace; the pair is resolved by the time READY=1 is sent.
        view = daemon.view()
        assert ready.fields["STATUS"] == systemd.status_line(view)
        assert ready.fields["STATUS"].startswith("watching 2 namespaces, ")
        assert len(view.peers) >= 2
        assert ready.pid == os.getpid()

        # The loop turns at least twice a second: pings keep coming.
        pings = [m for m in _collect(listener, 1.5) if "WATCHDOG" in m.fields]
        assert len(pings) >= 2

        wedge.armed.set()
        assert wedge.blocked.wait(5)
        listener.pending()  # a ping may have been sent just before the wedge
        stalled = [m for m in _collect(listener, 1.5) if "WATCHDOG" in m.fields]
        assert stalled == []  # a wedged loop starves the watchdog: systemd would restart us

        wedge.armed.clear()
        wedge.release.set()
        wait_for(lambda: any("WATCHDOG" in m.fields for m in _collect(listener, 0.3)), 5)
    finally:
        wedge.armed.clear()
        wedge.release.set()
        stop_daemon(running)
    stopping, _ = listener.next_with("STOPPING")
    assert stopping.fields["STOPPING"] == "1"


def _collect(listener: Listener, seconds: float) -> list[Message]:
    out: list[Message] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            out.append(listener.recv(left))
        except TimeoutError:
            break
    return out


# --- nswatch run, as systemd would start it ------------------------------------------


@pytest.mark.kernel
def test_nswatch_run_speaks_sd_notify(tmp_path: Path, listener: Listener) -> None:
    """`nswatch run` with NOTIFY_SOCKET: READY=1 once ready, pings, RELOADING=1/READY=1 on SIGHUP, STOPPING=1."""
    require_root()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "NOTIFY_SOCKET": listener.env_value,
        "WATCHDOG_USEC": "1000000",  # pings every 0.5 s
    }
    env.pop("WATCHDOG_PID", None)
    log = open(tmp_path / "nswatch.log", "wb")  # noqa: SIM115 (the child keeps it)
    with log:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "nswatch"),
                "run",
                "--listen",
                f"127.0.0.1:{port}",
                "--include",
                "^nswA-no-such-namespace$",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        ready, before = listener.next_with("READY", timeout=30)
        assert ready.pid == proc.pid
        assert ready.fields["STATUS"].startswith("watching 1 namespace, ")
        assert all(m.fields.keys() <= {"WATCHDOG", "STATUS"} for m in before)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            assert r.status == 200  # READY=1 came after readiness, never before

        pings = [m for m in _collect(listener, 1.6) if "WATCHDOG" in m.fields]
        assert 2 <= len(pings) <= 5
        assert all(m.pid == proc.pid for m in pings)

        sent = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)
        reloading, _ = listener.next_with("RELOADING", timeout=10)
        assert int(reloading.fields["MONOTONIC_USEC"]) >= sent
        again, between = listener.next_with("READY", timeout=10)
        assert again.fields["STATUS"].startswith("watching 1 namespace, ")
        assert all("READY" not in m.fields for m in between)

        proc.send_signal(signal.SIGTERM)
        stopping, _ = listener.next_with("STOPPING", timeout=10)
        assert stopping.pid == proc.pid
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
