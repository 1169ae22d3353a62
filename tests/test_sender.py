"""The body sender: a child process sends big bodies from shared memory (nswatch.sender)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from structlog.testing import capture_logs

from nswatch.render_cache import Chunks
from nswatch.sender import CHILD, BodySender, SendFailed, SharedBody, spawn_child
from nswatch.sender_child import SEALS, KeepLimits, Maps
from tests.test_daemon_fake import FakeClock

T = TypeVar("T")


class Pair:
    """A loopback TCP connection: the server end as asyncio leaves it (non-blocking)."""

    def __init__(self, rcvbuf: int | None = None) -> None:
        with socket.create_server(("127.0.0.1", 0)) as ls:
            self.client = socket.socket()
            if rcvbuf is not None:
                self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.client.connect(ls.getsockname())
            self.server, _ = ls.accept()
        self.server.setblocking(False)

    def read(self, n: int, pause: float = 0.0, timeout: float = 20) -> bytes:
        """Read ``n`` bytes (or until EOF) at the client, pausing between reads."""
        got = bytearray()
        self.client.settimeout(timeout)
        while len(got) < n:
            chunk = self.client.recv(1 << 16)
            if not chunk:
                break
            got.extend(chunk)
            if pause:
                time.sleep(pause)
        return bytes(got)

    def close(self) -> None:
        self.client.close()
        self.server.close()


@contextlib.contextmanager
def pairs(n: int, rcvbuf: int | None = None) -> Iterator[list[Pair]]:
    made = [Pair(rcvbuf) for _ in range(n)]
    try:
        yield made
    finally:
        for p in made:
            p.close()


class Reader(threading.Thread):
    def __init__(self, pair: Pair, n: int, pause: float = 0.0) -> None:
        super().__init__()
        self.pair, self.n, self.pause = pair, n, pause
        self.got = b""

    def run(self) -> None:
        self.got = self.pair.read(self.n, self.pause)


def body_of(size: int, parts: int, seed: int) -> Chunks:
    raw = os.urandom(size) if seed < 0 else bytes((i * seed) % 251 for i in range(size))
    step = max(1, size // parts)
    return Chunks(raw[i : i + step] for i in range(0, size, step))


def run(sender: BodySender, body: Callable[[], Awaitable[T]]) -> T:
    """``body()`` on a fresh loop, the sender closed on it afterwards."""

    async def main() -> T:
        try:
            return await body()
        finally:
            sender.close()

    return asyncio.run(main())


def child_sockets(pid: int) -> int:
    """How many sockets the child holds (its control socket is one)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


def child_maps(pid: int) -> int:
    """How many bodies the child has mapped."""
    with open(f"/proc/{pid}/maps") as f:
        return sum("memfd:nswatch-body" in line for line in f)


async def until(what: Callable[[], bool], timeout: float = 5) -> bool:
    """Whether ``what`` came true within ``timeout``, the loop running meanwhile."""
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def wait_for(what: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_job_sends_head_then_body_and_leaves_the_connection_to_the_daemon() -> None:
    """The client gets the head and then the body byte for byte; once the job is done the
    child holds no copy of the connection, which goes on working for the daemon."""
    sender = BodySender(idle=5)
    body = body_of(3 << 20, 2000, seed=-1)
    shared = SharedBody.of(body)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    with pairs(1) as (p,):
        reader = Reader(p, len(head) + len(body) + 5)
        reader.start()

        async def go() -> tuple[bool, int]:
            assert sender.ready()
            sent = await sender.send(p.server, head, shared)
            assert sender.pid is not None
            held = child_sockets(sender.pid)
            p.server.sendall(b"after")
            return sent, held

        sent, held = run(sender, go)
        reader.join(20)
    assert sent
    assert reader.got == head + bytes(body) + b"after"
    assert held == 1
    assert (sender.sent, sender.failed, sender.starts) == (1, 0, 1)
    shared.close()


def test_slow_readers_of_two_versions_each_get_their_body_whole() -> None:
    """Twelve readers with tiny receive buffers, reading slowly, of two different bodies at
    once: each gets exactly its own."""
    sender = BodySender(idle=5)
    bodies = [body_of(1 << 20, 300, seed=7), body_of((1 << 20) + 12345, 7, seed=11)]
    shared = [SharedBody.of(b) for b in bodies]
    with pairs(12, rcvbuf=4096) as ps:
        readers = [Reader(p, len(bodies[i % 2]), pause=0.001) for i, p in enumerate(ps)]
        for r in readers:
            r.start()

        async def go() -> list[bool]:
            assert sender.ready()
            return await asyncio.gather(
                *(sender.send(p.server, b"", shared[i % 2]) for i, p in enumerate(ps))
            )

        assert all(run(sender, go))
        for r in readers:
            r.join(30)
    for i, r in enumerate(readers):
        assert r.got == bytes(bodies[i % 2]), i
    for s in shared:
        s.close()


def test_a_reader_that_hangs_up_fails_its_own_job_only() -> None:
    """A client that closes mid-body makes its job fail (SendFailed: the daemon then closes
    the connection); a job beside it is sent whole."""
    sender = BodySender(idle=5)
    body = body_of(16 << 20, 50, seed=3)
    shared = SharedBody.of(body)
    with pairs(2, rcvbuf=8192) as (quitter, stayer):
        reader = Reader(stayer, len(body))
        reader.start()

        async def go() -> list[Any]:
            assert sender.ready()
            jobs = [
                sender.send(quitter.server, b"", shared),
                sender.send(stayer.server, b"", shared),
            ]
            tasks = [asyncio.ensure_future(j) for j in jobs]
            await asyncio.sleep(0.2)
            quitter.client.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            quitter.client.close()  # with linger 0: a reset
            return await asyncio.gather(*tasks, return_exceptions=True)

        quit_result, stay_result = run(sender, go)
        reader.join(20)
    assert isinstance(quit_result, SendFailed)
    assert stay_result is True
    assert reader.got == bytes(body)
    assert (sender.sent, sender.failed) == (1, 1)
    shared.close()


def test_a_cancelled_job_shuts_its_connection_and_the_child_lets_go_at_once() -> None:
    """Cancelling the wait (write deadline, shed) shuts the connection down, so a child
    stuck on a reader that never reads gives up now rather than holding the socket."""
    sender = BodySender(idle=5)
    shared = SharedBody.of(body_of(8 << 20, 10, seed=5))
    with pairs(1, rcvbuf=4096) as (p,):

        async def go() -> tuple[int, int]:
            assert sender.ready()
            task = asyncio.ensure_future(sender.send(p.server, b"", shared))
            await asyncio.sleep(0.3)
            assert sender.pid is not None
            during = child_sockets(sender.pid)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            pid = sender.pid
            t0 = time.monotonic()
            while child_sockets(pid) > 1 and time.monotonic() - t0 < 2:
                await asyncio.sleep(0.01)
            return during, child_sockets(pid)

        during, after = run(sender, go)
        assert during == 2
        assert after == 1
        # The client sees the end of the connection after what was sent.
        assert len(p.read(1 << 30, timeout=5)) < 8 << 20
    shared.close()


def test_a_dead_child_fails_its_jobs_and_a_new_one_starts_after_the_backoff() -> None:
    """Killed mid-job, the child's job fails; no job is handed over until the backoff
    (1 s) has passed, then a new child sends."""
    clock = FakeClock()
    sender = BodySender(idle=5, clock=clock)
    body = body_of(4 << 20, 10, seed=9)
    shared = SharedBody.of(body)
    with pairs(2, rcvbuf=4096) as (stuck, later):

        async def go() -> tuple[Any, bool, bool, bool]:
            assert sender.ready()
            task = asyncio.ensure_future(sender.send(stuck.server, b"", shared))
            await asyncio.sleep(0.2)
            assert sender.pid is not None
            os.kill(sender.pid, signal.SIGKILL)
            failed = await asyncio.gather(task, return_exceptions=True)
            clock.now += 0.5
            early = sender.ready()
            clock.now += 1.0
            again = sender.ready()
            reader = Reader(later, len(body))
            reader.start()
            sent = await sender.send(later.server, b"", shared)
            await asyncio.get_running_loop().run_in_executor(None, reader.join, 20)
            assert reader.got == bytes(body)
            return failed[0], early, again, sent

        failed, early, again, sent = run(sender, go)
    assert isinstance(failed, SendFailed)
    assert failed.errno == errno.ECONNABORTED
    assert not early
    assert again and sent
    assert sender.starts == 2
    shared.close()


def test_a_child_that_cannot_start_is_retried_later_with_a_growing_backoff() -> None:
    """When the child cannot be started, ready() says so (bodies are then sent by the HTTP
    thread) and tries again after 1 s, then 2 s."""
    clock = FakeClock()
    calls: list[float] = []

    def broken(
        fd: int, idle: float, nice: int, keep: KeepLimits | None = None
    ) -> subprocess.Popen[bytes]:
        calls.append(clock.now)
        raise OSError(errno.EAGAIN, "no processes left")

    sender = BodySender(idle=5, spawn=broken, clock=clock)

    async def go() -> list[bool]:
        seen = []
        for step in (0, 0.5, 0.6, 1.0, 2.1):
            clock.now += step
            seen.append(sender.ready())
        return seen

    assert run(sender, go) == [False] * 5
    assert [c - 1000 for c in calls] == pytest.approx([0, 1.1, 4.2])


def test_the_child_keeps_only_the_newest_body_mapped_and_none_when_idle() -> None:
    """An older body is unmapped once no job sends it and a newer one came; after the idle
    time the newest is unmapped too."""
    sender = BodySender(idle=0.5)
    bodies = [body_of(300_000, 3, seed=s) for s in (2, 4)]
    shared = [SharedBody.of(b) for b in bodies]
    with pairs(2) as ps:

        async def go() -> tuple[int, int]:
            assert sender.ready()
            for p, s, b in zip(ps, shared, bodies, strict=True):
                reader = Reader(p, len(b))
                reader.start()
                assert await sender.send(p.server, b"", s)
                reader.join(10)
            assert sender.pid is not None
            mapped = child_maps(sender.pid)
            pid = sender.pid
            idle = await asyncio.get_running_loop().run_in_executor(
                None, wait_for, lambda: child_maps(pid) == 0
            )
            return mapped, idle

        mapped, idle = run(sender, go)
    assert mapped == 1
    assert idle
    for s in shared:
        s.close()


def test_a_body_no_job_sends_is_unmapped_at_once_while_another_is_sent() -> None:
    """The body taken last stays mapped after its job only while nothing else is being sent;
    while another body is, one that no job sends is unmapped at once (it held a whole state
    in the peak RSS)."""
    shared = [SharedBody.of(body_of(300_000, 3, seed=s)) for s in (5, 6)]
    maps = Maps()

    def take(s: SharedBody) -> int:
        ino, view = maps.take(s.fd, s.size)
        view.release()  # as a job does before it ends
        return ino

    a = take(shared[0])
    b = take(shared[1])
    maps.done(b)
    assert len(maps) == 1  # only a, still being sent
    b = take(shared[1])
    maps.done(a)
    assert len(maps) == 1  # only b
    maps.done(b)
    assert len(maps) == 1  # b, the last taken, kept for its next reader
    maps.idle()
    assert len(maps) == 0
    for s in shared:
        s.close()


def test_a_shared_body_is_sealed_and_its_descriptor_closes_with_it() -> None:
    """The memfd holds the body, is sealed against writes and resizing (so a mapping of it
    can never fault), and is closed when the SharedBody is dropped."""
    body = body_of(2_500_000, 2500, seed=13)  # more parts than one writev takes
    shared = SharedBody.of(body)
    fd = shared.fd
    assert os.pread(fd, len(body) + 1, 0) == bytes(body)
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"x", 0)
    del shared
    assert not os.path.exists(f"/proc/self/fd/{fd}") or "nswatch-body" not in os.readlink(
        f"/proc/self/fd/{fd}"
    )


def test_the_child_refuses_an_unsealed_body_and_stays_up() -> None:
    """A body that could shrink under the child's mapping is refused (EINVAL), not sent;
    the child goes on with the next job."""
    sender = BodySender(idle=5)
    fd = os.memfd_create("nswatch-body", os.MFD_CLOEXEC)
    os.write(fd, b"y" * 100_000)
    unsealed = SharedBody(fd, 100_000)
    good = SharedBody.of(b"z" * 100_000)
    with pairs(2) as (a, b):

        async def go() -> tuple[Any, bool]:
            assert sender.ready()
            refused = await asyncio.gather(
                sender.send(a.server, b"", unsealed), return_exceptions=True
            )
            reader = Reader(b, 100_000)
            reader.start()
            sent = await sender.send(b.server, b"", good)
            await asyncio.get_running_loop().run_in_executor(None, reader.join, 10)
            assert reader.got == b"z" * 100_000
            return refused[0], sent

        refused, sent = run(sender, go)
    assert isinstance(refused, SendFailed) and refused.errno == errno.EINVAL
    assert sent
    assert sender.starts == 1
    unsealed.close()
    good.close()


def test_the_child_gives_up_root_runs_nicer_and_ends_when_the_sender_closes() -> None:
    """Started by root, the child runs as nobody (it needs no privilege), at the nice value
    asked for (the serving threads'); closing the sender ends it."""
    pids: list[int] = []

    def spawn(
        fd: int, idle: float, nice: int, keep: KeepLimits | None = None
    ) -> subprocess.Popen[bytes]:
        proc = spawn_child(fd, idle, nice, keep)
        pids.append(proc.pid)
        return proc

    nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 3)
    sender = BodySender(idle=5, nice=nice, spawn=spawn)
    shared = SharedBody.of(b"q" * 70_000)
    with pairs(1) as (p,):

        async def go() -> None:
            assert sender.ready()
            reader = Reader(p, 70_000)
            reader.start()
            assert await sender.send(p.server, b"", shared)
            await asyncio.get_running_loop().run_in_executor(None, reader.join, 10)

        uid = None
        child_nice = None

        async def go_and_look() -> None:
            nonlocal uid, child_nice
            await go()
            with open(f"/proc/{pids[0]}/status") as f:
                uid = next(line.split()[1:] for line in f if line.startswith("Uid:"))
            with open(f"/proc/{pids[0]}/stat") as f:
                child_nice = int(f.read().rpartition(")")[2].split()[16])

        run(sender, go_and_look)
    expected = "65534" if os.geteuid() == 0 else str(os.geteuid())
    assert uid == [expected] * 4
    assert child_nice == nice
    assert not os.path.exists(f"/proc/{pids[0]}")
    shared.close()


def test_the_child_says_it_holds_no_privilege() -> None:
    """The child's first message says whether it gave up its privileges (started by root: it
    became nobody or dropped its capabilities), and nothing is logged when it did."""
    sender = BodySender(idle=5)
    with capture_logs() as logs:

        async def go() -> bool | None:
            assert sender.ready()
            assert await until(lambda: sender.privileged is not None)
            return sender.privileged

        assert run(sender, go) is False
    assert not [e for e in logs if e["event"] == "http_sender_privileged"]


@pytest.mark.kernel
def test_a_child_that_keeps_its_capabilities_is_reported_once() -> None:
    """When setresuid and capset are both refused (a seccomp filter), the daemon says so once
    with the child's user, however often the child is started again."""
    script = (
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('c', {str(CHILD)!r})\n"
        "c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)\n"
        "def refused(*args): raise PermissionError(1, 'refused')\n"
        "os.setgroups = os.setresgid = os.setresuid = refused\n"
        "c.drop_capabilities = lambda: False\n"
        "sys.exit(c.main())\n"
    )

    def spawn(
        fd: int, idle: float, nice: int, keep: KeepLimits | None = None
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", script, str(fd), repr(idle), str(nice)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
        )

    clock = FakeClock()
    sender = BodySender(idle=5, spawn=spawn, clock=clock)
    with capture_logs() as logs:

        async def go() -> list[bool | None]:
            seen = []
            for _ in range(2):
                clock.now += 60
                assert sender.ready()
                assert await until(lambda: sender.privileged is not None)
                seen.append(sender.privileged)
                assert sender.pid is not None
                os.kill(sender.pid, signal.SIGKILL)
                assert await until(lambda: sender.pid is None)
            return seen

        seen = run(sender, go)
    said = [e for e in logs if e["event"] == "http_sender_privileged"]
    assert seen == [True, True]
    assert len(said) == 1
    assert said[0]["euid"] == 0 and said[0]["log_level"] == "warning"


def test_dropping_capabilities_leaves_none_and_an_exec_brings_none_back() -> None:
    """What the child does when it cannot become nobody (under the unit): afterwards it holds
    no capability, and a program it execs holds none either (uid 0 would regain the
    bounding set's on exec without no_new_privs)."""
    script = (
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('c', {str(CHILD)!r})\n"
        "c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)\n"
        "assert c.drop_capabilities()\n"
        "sys.stdout.write(open('/proc/self/status').read()); sys.stdout.flush()\n"
        "os.execv('/bin/cat', ['cat', '/proc/self/status'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    sets = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("CapPrm:")]
    assert sets == ["0000000000000000"] * 2
    for key in ("CapEff:", "CapInh:", "CapAmb:"):
        assert all(
            int(line.split()[1], 16) == 0
            for line in out.stdout.splitlines()
            if line.startswith(key)
        )


def test_the_child_ends_when_the_daemon_is_killed() -> None:
    """A daemon killed with SIGKILL leaves no sender behind: the child reads end-of-file on
    its control socket and exits by itself."""
    script = (
        "import asyncio, sys\n"
        "from nswatch.sender import BodySender\n"
        "s = BodySender(idle=5)\n"
        "assert s.start()\n"
        "print(s.pid, flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    daemon = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=root, text=True
    )
    try:
        assert daemon.stdout is not None
        child = int(daemon.stdout.readline())
        assert os.path.exists(f"/proc/{child}")
        daemon.kill()
        daemon.wait(10)

        def gone() -> bool:
            try:
                with open(f"/proc/{child}/stat") as f:
                    return f.read().rpartition(")")[2].split()[0] == "Z"
            except FileNotFoundError:
                return True

        assert wait_for(gone, timeout=5)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        if daemon.stdout is not None:
            daemon.stdout.close()
