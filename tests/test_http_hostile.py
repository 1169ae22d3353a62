"""The HTTP server under hostile load: slow clients, connection floods, slow readers.

Whatever the clients do, a scraper and a health check get through.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import os
import random
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import h11
import pytest
from structlog.testing import capture_logs

from nswatch.http import SEND_HERE_MAX, SERVING_NICE, Api, HttpServer, Limits, send_parts
from nswatch.render_cache import Chunks, json_bytes
from nswatch.sender import BodySender
from nswatch.sender_child import KeepLimits
from nswatch.state import state_json
from tests.bench.bench_metrics import synthetic
from tests.test_http import _model, assert_served_twice

FLOOD = 2000


def _server(limits: Limits | None = None, metrics: Any = None) -> HttpServer:
    api = Api(
        view=_model().copy,
        alive=lambda: True,
        ready=lambda: True,
        metrics=metrics or (lambda accept: (b"# metrics\n", "text/plain; version=0.0.4")),
    )
    srv = HttpServer(("127.0.0.1", 0), api, limits=limits)
    srv.start()
    return srv


@pytest.fixture
def nofile() -> Iterator[None]:
    """Enough file descriptors for a flood's two ends in this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 3 * FLOOD + 1000
    if hard != resource.RLIM_INFINITY and hard < want:
        raise AssertionError(f"fd hard limit {hard} < {want}: cannot run the flood")
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def get(srv: HttpServer, path: str, timeout: float = 5) -> int:
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


class Dribbler:
    """Connections that each send a request head one byte every ``every`` seconds."""

    HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200

    def __init__(self, srv: HttpServer, n: int, every: float) -> None:
        self.socks = [socket.create_connection(srv.address, timeout=5) for _ in range(n)]
        self.every = every
        self.sent = 0
        self.closed_by_server: set[int] = set()
        self.answers: dict[int, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.sent < len(self.HEAD):
            for i, s in enumerate(self.socks):
                if i in self.closed_by_server:
                    continue
                try:
                    s.sendall(self.HEAD[self.sent : self.sent + 1])
                except OSError:
                    self.closed_by_server.add(i)
            self.sent += 1
            self._poll()
            self._stop.wait(self.every)

    def _poll(self) -> None:
        for i, s in enumerate(self.socks):
            if i in self.closed_by_server:
                continue
            s.setblocking(False)
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            finally:
                s.setblocking(True)
            self.answers[i] = self.answers.get(i, b"") + data
            if not data:
                self.closed_by_server.add(i)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.socks:
            s.close()


def test_slow_clients_do_not_lock_out_scrapes_and_health_checks() -> None:
    """100 clients sending a header byte every 3 s do not stop /healthz or /metrics from answering."""
    srv = _server()
    slow = Dribbler(srv, 100, every=3.0)
    try:
        time.sleep(0.5)  # every slow connection is in and has sent a byte
        t_end = time.monotonic() + 7
        answered = 0
        while time.monotonic() < t_end:
            assert get(srv, "/healthz", timeout=3) == 200
            assert get(srv, "/metrics", timeout=3) == 200
            answered += 1
            time.sleep(0.5)
        assert answered >= 10
    finally:
        slow.close()
        srv.stop()


def test_a_request_head_has_a_deadline() -> None:
    """A head that dribbles in is cut off at head_timeout (408, then closed), however steady the drip."""
    srv = _server(Limits(head_timeout=2.0))
    slow = Dribbler(srv, 10, every=0.5)
    try:
        t0 = time.monotonic()
        while len(slow.closed_by_server) < 10 and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        took = time.monotonic() - t0
        assert len(slow.closed_by_server) == 10, "slow heads were never cut off"
        assert took < 5, f"slow heads lasted {took:.1f} s with a 2 s head deadline"
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in slow.answers.values())
    finally:
        slow.close()
        srv.stop()


def test_at_the_cap_the_slowest_give_way() -> None:
    """With every slot held by slow heads, a health check displaces the oldest of them."""
    srv = _server(Limits(max_connections=20))
    slow = Dribbler(srv, 40, every=3.0)
    try:
        time.sleep(0.5)
        for _ in range(5):
            assert get(srv, "/healthz", timeout=3) == 200
        assert len(srv.table.conns) <= 20
        assert srv.table.shed_total >= 20
    finally:
        slow.close()
        srv.stop()


def test_a_connection_flood_is_survived_and_recovered_from(nofile: None) -> None:
    """During a 2,000-connection flood of dribbled heads health checks and scrapes answer, and within 1 s of its end all is well."""
    srv = _server()
    flood = Dribbler(srv, FLOOD, every=2.0)
    try:
        for _ in range(3):
            assert get(srv, "/healthz", timeout=3) == 200
            assert get(srv, "/metrics", timeout=3) == 200
            time.sleep(1)
        assert len(srv.table.conns) <= srv.limits.max_connections
    finally:
        flood.close()
    t_end = time.monotonic()
    try:
        assert get(srv, "/healthz", timeout=1) == 200
        assert get(srv, "/metrics", timeout=1) == 200
        assert time.monotonic() - t_end < 1.0
    finally:
        srv.stop()


def test_large_renders_do_not_block_other_connections() -> None:
    """While /metrics renders on a worker thread, /healthz is answered."""
    rendering, release = threading.Event(), threading.Event()

    def slow_metrics(accept: str | None) -> tuple[bytes, str]:
        rendering.set()
        release.wait(10)
        return b"# slow\n", "text/plain; version=0.0.4"

    srv = _server(metrics=slow_metrics)
    result: list[int] = []
    scrape = threading.Thread(target=lambda: result.append(get(srv, "/metrics", timeout=15)))
    scrape.start()
    try:
        assert rendering.wait(5)
        assert get(srv, "/healthz", timeout=3) == 200
        assert get(srv, "/readyz", timeout=3) == 200
    finally:
        release.set()
        scrape.join(10)
        srv.stop()
    assert result == [200]


def _slow_reader(srv: HttpServer) -> socket.socket:
    """A client that asks for /metrics with a 4 KiB receive buffer and reads nothing yet."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(srv.address)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    return s


def test_slow_readers_are_shed_beyond_the_output_budget() -> None:
    """Clients that ask for large documents and never read them are dropped once the
    documents they hold exceed the budget (each render here is a document of its own)."""
    srv = _server(
        Limits(output_budget=24 << 20, metrics_max_age=0),
        metrics=lambda accept: (b"x" * (16 << 20), "text/plain; version=0.0.4"),
    )
    body = b"x" * (16 << 20)
    stalled = []
    try:
        for _ in range(3):
            stalled.append(_slow_reader(srv))
            time.sleep(0.3)  # rendered and queued, in this order
        host, port = srv.address
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/metrics")
        assert len(conn.getresponse().read()) == len(body)
        conn.close()
        # The oldest stalled readers were dropped: reading them ends early.
        got = []
        for s in stalled:
            s.settimeout(2)
            n = 0
            try:
                while chunk := s.recv(1 << 20):
                    n += len(chunk)
            except (TimeoutError, ConnectionResetError):
                pass
            got.append(n)
        assert got[0] < len(body), got
        assert srv.table.shed_total >= 1
    finally:
        for s in stalled:
            s.close()
        srv.stop()


def test_readers_of_one_shared_document_are_not_shed() -> None:
    """Many readers of one cached document hold it once: six slow readers of the same
    12 MB scrape fit a 24 MB budget, and each gets the whole body (they were shed when
    each reader's unsent share counted as memory of its own)."""
    body = b"y" * (12 << 20)
    srv = _server(
        Limits(output_budget=24 << 20), metrics=lambda accept: (body, "text/plain; version=0.0.4")
    )
    readers: list[socket.socket] = []
    try:
        readers += [_slow_reader(srv) for _ in range(6)]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sum(c.phase == "write" for c in srv.table.conns) == 6:
                break
            time.sleep(0.02)
        assert sum(c.phase == "write" for c in srv.table.conns) == 6
        for s in readers:
            s.settimeout(10)
            got = b""
            while b"\r\n\r\n" not in got:
                got += s.recv(65536)
            _, _, rest = got.partition(b"\r\n\r\n")
            n = len(rest)
            while n < len(body):
                chunk = s.recv(1 << 20)
                assert chunk, f"dropped after {n} of {len(body)} bytes"
                n += len(chunk)
        assert srv.table.shed_total == 0
    finally:
        for s in readers:
            s.close()
        srv.stop()


def test_a_big_body_is_sent_from_the_document_not_copied_into_the_transport() -> None:
    """A 4 MB body waiting on a slow reader sits in no transport buffer (it was copied there
    up to a 1 MiB piece at a time, under the GIL), and the reader still gets all of it, then
    the next response on the same connection."""
    body = b"z" * (4 << 20)
    srv = _server(metrics=lambda accept: (body, "text/plain; version=0.0.4"))
    s = _slow_reader(srv)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(c.phase == "write" for c in srv.table.conns):
            time.sleep(0.02)
        time.sleep(0.3)  # long enough for the socket to fill and a copy to be made
        (conn,) = srv.table.conns
        assert conn.phase == "write" and conn.queued() == 0
        s.settimeout(10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while b'{"status":"ok"}' not in got[-64:]:
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {len(got)} bytes"
            got += chunk
        head, _, rest = got.partition(b"\r\n\r\n")
        assert b"Content-Length: %d" % len(body) in head
        assert rest[: len(body)] == body and b"HTTP/1.1 200" in rest[len(body) :]
    finally:
        s.close()
        srv.stop()


def test_pipelined_big_bodies_to_a_slow_reader_arrive_whole() -> None:
    """A slow reader's two pipelined requests for a body bigger than the socket's buffers
    get both responses whole and in order: the second head goes through the transport, its
    body straight to the socket, on the same connection."""
    body = bytes(range(256)) * (24 << 12)  # 6 MiB: more than the socket's buffers take
    srv = _server(metrics=lambda accept: (body, "text/plain; version=0.0.4"))
    s = _slow_reader(srv)  # its first GET /metrics is under way
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # now read fast
        s.settimeout(10)
        got = b""
        while got.count(body) < 2:
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {len(got)} bytes"
            got += chunk
        assert got.count(b"HTTP/1.1 200") == 2
    finally:
        s.close()
        srv.stop()


class _QueuedTransport:
    """A transport still holding bytes of an earlier write: it sends them on drain()."""

    def __init__(self) -> None:
        self.queued = 100
        self.limits = (16384, 65536)  # (low, high), as asyncio reports them
        self.set_calls: list[tuple[int | None, int | None]] = []

    def get_write_buffer_size(self) -> int:
        return self.queued

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.limits

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.set_calls.append((high, low))
        if high is not None:
            self.limits = (low if low is not None else min(high, self.limits[0]), high)


class _QueuedWriter:
    def __init__(self) -> None:
        self.transport = _QueuedTransport()

    async def drain(self) -> None:
        self.transport.queued = 0


def test_send_parts_sends_every_part_in_order_through_a_full_socket() -> None:
    """Three times more parts than one sendmsg() takes, empty ones among them, through a
    socket that fills hundreds of times: the reader gets exactly their concatenation
    (a send cut inside a part resumes there, not at the part's start or the next one)."""
    rng = random.Random(7)
    sizes = (0, 1, 7, 300, 5000, 70_000)
    parts = [bytes([i % 251]) * rng.choice(sizes) for i in range(3 * 1024)]
    want = b"".join(parts)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    got = bytearray()

    def read() -> None:
        while len(got) < len(want):
            chunk = theirs.recv(rng.choice((1, 100, 65536)))
            if not chunk:
                return
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        asyncio.run(send_parts(ours, Chunks(parts)))
        reader.join(30)
        assert bytes(got) == want
    finally:
        ours.close()
        theirs.close()
        reader.join(5)


@pytest.mark.parametrize("child", [True, False], ids=["by-the-child", "child-cannot-start"])
def test_a_big_state_is_served_as_its_plain_render(child: bool) -> None:
    """A state document above the direct-send size arrives byte for byte as the plain
    render, twice on one connection and to a slow reader too: sent by the sender's child
    from shared memory (the second GET on the connection it keeps: asked for, not handed
    over), or, when the child cannot start, by the HTTP thread part by part from the
    renderer's kept JSON."""

    def cannot(
        fd: int, idle: float, nice: int, keep: KeepLimits | None = None
    ) -> subprocess.Popen[bytes]:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    model = synthetic(400)
    body = json_bytes(state_json(model))
    assert len(body) > SEND_HERE_MAX
    srv = HttpServer(("127.0.0.1", 0), Api(view=model.copy, alive=lambda: True, ready=lambda: True))
    if not child:
        srv.sender = BodySender(idle=10, spawn=cannot)
    srv.start()
    try:
        host, port = srv.address
        assert_served_twice(
            http.client.HTTPConnection(host, port, timeout=10), "/api/v1/state", body
        )
        s = socket.create_connection((host, port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.sendall(b"GET /api/v1/state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(0.3)  # the server's sends meet a full socket
        got = b""
        while chunk := s.recv(1 << 16):
            got += chunk
        s.close()
        assert got.partition(b"\r\n\r\n")[2] == body
        sender = srv.sender
        assert (sender.sent, sender.asked, sender.starts) == ((2, 1, 1) if child else (0, 0, 0))
    finally:
        srv.stop()


def test_a_body_the_socket_takes_at_once_is_sent_by_the_http_thread() -> None:
    """A body under the child's threshold (a /metrics scrape, gzipped: 0.6 MB at 1,000
    namespaces) arrives whole and is sent by the HTTP thread in one system call, neither
    handed to the sender's child (a job, a nicer process's wake-up and an answer per
    scrape) nor copied into shared memory for it (each GET on a connection of its own:
    the child answers a kept connection's next ones from shared memory)."""
    model = synthetic(100)
    body = json_bytes(state_json(model))
    assert 4 * 65536 < len(body) < SEND_HERE_MAX
    srv = HttpServer(("127.0.0.1", 0), Api(view=model.copy, alive=lambda: True, ready=lambda: True))
    srv.start()
    try:
        host, port = srv.address
        for _ in range(2):
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", "/api/v1/state", headers={"Connection": "close"})
            assert conn.getresponse().read() == body
            conn.close()
        assert srv.sender.sent == 0
        # ... nor copied into shared memory for it.
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        assert not [f for f in fds if "nswatch-body" in f]
    finally:
        srv.stop()


def test_a_direct_send_waits_for_the_transport_and_puts_its_limits_back() -> None:
    """A body sent straight to the socket starts only once the transport has sent what it
    held, and the transport's write limits are then as they were (they were put back swapped:
    high and low exchanged, which a real transport refuses with ValueError)."""
    h = h11.Connection(h11.SERVER)
    h.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(h.next_event(), h11.Request)
    body = b"v" * 100_000
    h.send(h11.Response(status_code=200, headers=[("Content-Length", str(len(body)))]))
    writer = _QueuedWriter()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        got = bytearray()

        def read() -> None:
            while len(got) < len(body):
                got.extend(theirs.recv(1 << 16))

        reader = threading.Thread(target=read)
        reader.start()
        asyncio.run(HttpServer._send_body(h, writer, ours, b"", body))  # type: ignore[arg-type]
        reader.join(10)
        assert bytes(got) == body
        assert writer.transport.queued == 0
        assert writer.transport.limits == (16384, 65536)
    finally:
        ours.close()
        theirs.close()


def test_a_big_body_goes_through_the_transport_when_no_descriptor_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of file descriptors (EMFILE), the socket cannot be duplicated for the direct
    send: the body goes through the transport instead and arrives whole."""

    def no_fd(fd: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr("nswatch.http.os.dup", no_fd)
    body = b"w" * (2 << 20)
    srv = _server(metrics=lambda accept: (body, "text/plain; version=0.0.4"))
    try:
        host, port = srv.address
        assert_served_twice(http.client.HTTPConnection(host, port, timeout=10), "/metrics", body)
    finally:
        srv.stop()


def test_a_reader_that_stops_is_dropped_after_write_timeout() -> None:
    """A client that stops reading mid-response is disconnected after write_timeout."""
    body = b"x" * (32 << 20)
    srv = _server(Limits(write_timeout=1.0), metrics=lambda accept: (body, "text/plain"))
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(srv.address)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        t0 = time.monotonic()
        while not any(c.phase == "write" for c in srv.table.conns) and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert srv.table.conns, "the request was never answered"
        t0 = time.monotonic()
        while srv.table.conns and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert not srv.table.conns, "the stalled reader was never dropped"
        assert time.monotonic() - t0 >= 0.5
        s.settimeout(5)
        got = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(1 << 20):
                got += len(chunk)
        assert got < len(body)
    finally:
        s.close()
        srv.stop()


class BlockingView:
    """A view() that counts its calls and blocks until released."""

    def __init__(self) -> None:
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()
        self.model = _model()

    def __call__(self) -> Any:
        self.calls += 1
        self.started.set()
        self.release.wait(10)
        return self.model.copy()


def _blocking_server(view: BlockingView, limits: Limits | None = None) -> HttpServer:
    api = Api(view=view, alive=lambda: True, ready=lambda: True)
    srv = HttpServer(("127.0.0.1", 0), api, limits=limits)
    srv.start()
    return srv


def _send_all(srv: HttpServer, n: int, payload: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(srv.address, timeout=10)
        s.sendall(payload)
        socks.append(s)
    return socks


@pytest.mark.parametrize("accepts", [(b"",), (b"", b"Accept: */*\r\n", b"Accept: text/html\r\n")])
def test_identical_requests_share_one_render(accepts: tuple[bytes, ...]) -> None:
    """Fifty clients asking for the state while it renders get one render's answer between
    them, whatever they accept (the state has one form; a defect: each Accept rendered it anew)."""
    view = BlockingView()
    srv = _blocking_server(view)
    socks: list[socket.socket] = []
    try:
        for i in range(50):
            accept = accepts[i % len(accepts)]
            socks += _send_all(
                srv,
                1,
                b"GET /api/v1/state HTTP/1.1\r\nHost: x\r\n%sConnection: close\r\n\r\n" % accept,
            )
        assert view.started.wait(5)
        t0 = time.monotonic()
        while sum(c.phase == "busy" for c in srv.table.conns) < 50 and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        view.release.set()
        for s in socks:
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 ")
        assert view.calls == 1
    finally:
        view.release.set()
        for s in socks:
            s.close()
        srv.stop()


def test_health_checks_get_in_when_every_slot_waits_for_a_render() -> None:
    """With every connection waiting on a stuck render, a health check still displaces one and is answered."""
    view = BlockingView()
    srv = _blocking_server(view, Limits(max_connections=10))
    socks: list[socket.socket] = []
    try:
        for i in range(10):  # distinct documents: nothing to share
            socks += _send_all(
                srv, 1, b"GET /api/v1/namespaces/n%d HTTP/1.1\r\nHost: x\r\n\r\n" % i
            )
        assert view.started.wait(5)
        t0 = time.monotonic()
        while sum(c.phase == "busy" for c in srv.table.conns) < 10 and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert get(srv, "/healthz", timeout=3) == 200
        assert get(srv, "/readyz", timeout=3) == 200
    finally:
        view.release.set()
        for s in socks:
            s.close()
        srv.stop()


def _serving_threads() -> dict[str, int]:
    """The nice value of every live thread the HTTP server started, by name."""
    return {
        t.name: os.getpriority(os.PRIO_PROCESS, t.native_id)
        for t in threading.enumerate()
        if t.name.startswith("nswatch-http") and t.native_id is not None
    }


def test_serving_threads_run_nicer_than_the_event_loop() -> None:
    """The HTTP loop and the render threads run SERVING_NICE nicer than the thread that
    made the server (the event loop's peer), which keeps its own priority."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    srv = _server()
    try:
        host, port = srv.address
        conn = http.client.HTTPConnection(host, port, timeout=10)
        for path in ("/metrics", "/api/v1/state"):
            conn.request("GET", path)
            assert conn.getresponse().read()
        conn.close()
        nice = _serving_threads()
        assert {"nswatch-http", "nswatch-http-metrics_0", "nswatch-http-render_0"} <= set(nice)
        assert set(nice.values()) == {min(19, mine + SERVING_NICE)}, nice
        assert os.getpriority(os.PRIO_PROCESS, 0) == mine
    finally:
        srv.stop()


def test_a_refused_priority_change_is_said_once_and_serving_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a seccomp filter without setpriority (EPERM), the server serves as before and
    says so once, not once per thread."""

    def refused(which: int, who: int, prio: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr("nswatch.http.os.setpriority", refused)
    with capture_logs() as logs:
        srv = _server()
        try:
            host, port = srv.address
            conn = http.client.HTTPConnection(host, port, timeout=10)
            for path in ("/metrics", "/api/v1/state", "/healthz"):
                conn.request("GET", path)
                resp = conn.getresponse()
                assert resp.status == 200 and resp.read()
            conn.close()
        finally:
            srv.stop()
    said = [e for e in logs if e["event"] == "serving_priority_unchanged"]
    assert len(said) == 1 and said[0]["errno"] == "EPERM"
