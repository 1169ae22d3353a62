"""Shared fixtures: structlog reset, leak checks, real-kernel labs, a running daemon."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import structlog

from nswatch.daemon import Daemon, Settings
from nswatch.dirwatch import DirWatcher
from nswatch.http import Api, HttpServer
from tests import kernel
from tests.kernel import Lab, require_kernel_mark


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture of the test: note whether it may use root and the kernel."""
    kernel.UNMARKED_TEST[0] = None if item.get_closest_marker("kernel") else item.nodeid


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Fixtures torn down after a test (module-scoped ones too) may clean up the kernel."""
    kernel.UNMARKED_TEST[0] = None


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Each test starts and ends with structlog's defaults."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """A test must end with the threads and file descriptors it started with."""
    threads = set(threading.enumerate())
    fds = _fds()
    yield
    deadline = time.monotonic() + 3
    while True:
        extra_threads = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        # The fd of the listdir itself comes and goes; compare twice.
        extra_fds = _fds() - fds
        if not extra_threads and not extra_fds:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    descr = {fd: os.path.realpath(f"/proc/self/fd/{fd}") for fd in extra_fds if fd > 2}
    extra_fds = {fd for fd in descr if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not extra_threads, f"threads leaked: {extra_threads}"
    assert not extra_fds, f"fds leaked: {descr}"


def require_root() -> None:
    """Real-kernel tests need root and the kernel mark: fail loudly, never skip."""
    require_kernel_mark("root")
    if os.geteuid() != 0:
        pytest.fail("this test needs root (real network namespaces); run the suite as root")


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh prefix for kernel objects, cleaned up whatever the test does."""
    require_root()
    lab = Lab()
    try:
        yield lab
    finally:
        lab.cleanup()


@dataclass
class Running:
    """A daemon on its own thread with its HTTP API on an ephemeral port."""

    daemon: Daemon
    server: HttpServer

    @property
    def url(self) -> str:
        host, port = self.server.address
        return f"http://{host}:{port}"


def start_daemon(settings: Settings, **kw: object) -> Running:
    """Start a daemon plus HTTP server and wait for its first sync."""
    require_kernel_mark("a daemon with real netlink sessions")
    daemon = Daemon(settings, dirwatch_factory=DirWatcher, **kw)  # type: ignore[arg-type]
    api = Api(view=daemon.view, alive=lambda: True, ready=daemon.ready.is_set)
    server = HttpServer(("127.0.0.1", 0), api)
    server.start()
    daemon.start()
    if not daemon.ready.wait(10):
        stop_daemon(Running(daemon, server))
        raise AssertionError("daemon did not sync within 10 s")
    return Running(daemon, server)


def stop_daemon(r: Running) -> None:
    """Stop the daemon and its server; they must stop within 2 s."""
    r.daemon.request_stop()
    if r.daemon.loop_thread is not None:
        r.daemon.loop_thread.join(2)
        assert not r.daemon.loop_thread.is_alive(), "event loop did not stop within 2 s"
    r.server.stop()


@pytest.fixture
def nswatch(lab: Lab) -> Iterator[Running]:
    """A daemon watching only this test's namespaces (plus the host)."""
    require_root()
    running = start_daemon(Settings(include=f"^{lab.prefix}", reconcile_interval=0))
    try:
        yield running
    finally:
        stop_daemon(running)
