"""Connections the sender's child keeps: it answers their plain GETs of /metrics and the
state itself and hands everything else back to the daemon (nswatch.sender_child,
HttpServer._hand_over)."""

from __future__ import annotations

import array
import json
import socket
import threading
import time
from typing import Any

import pytest

from nswatch.http import Api, HttpServer, Limits
from nswatch.model import NamespaceSeen
from nswatch.sender import SharedBody
from nswatch.sender_child import (
    ASK,
    DOC,
    KEEP,
    KIND_ASK,
    KIND_DOC,
    KIND_KEEP,
    LOAD_HALF_LIFE,
    ROUND,
    STARVED,
    Child,
    KeepLimits,
    _Job,
    _Kept,
    plain_get,
)
from nswatch.webconfig import WebConfig
from tests.test_http import _model
from tests.test_http_hostile import _server
from tests.test_http_security import htpasswd_hash
from tests.test_sender import Pair, body_of, child_sockets

STATE = b"GET /api/v1/state HTTP/1.1\r\nHost: x\r\n\r\n"
METRICS_GZ = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n"


class Client:
    """One connection to the server, reading whole responses."""

    def __init__(self, srv: HttpServer) -> None:
        self.sock = socket.create_connection(srv.address, timeout=10)
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        self.buf += data
        return bool(data)

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-case names), body."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed before a response")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head_only else int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            if not self._fill():
                raise ConnectionError("closed in a body")
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(lines[0].split()[1]), headers, body

    def get(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(request)
        return self.response()

    def closed(self, timeout: float) -> bool:
        """Whether the server closes the connection within ``timeout`` (nothing else sent)."""
        self.sock.settimeout(timeout)
        try:
            return not self._fill()
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def once(srv: HttpServer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """``request`` on a connection of its own that closes after it (never kept)."""
    c = Client(srv)
    try:
        return c.get(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
    finally:
        c.close()


def test_a_kept_connection_gets_from_the_child_what_the_daemon_sends() -> None:
    """After a first state GET the connection is the child's: its next state and /metrics
    GETs are answered from there with the bodies and headers the daemon sends, asking the
    daemon once each, and the child holds the connection."""
    metrics = b"# HELP x y\n" + b"x 1\n" * 50_000
    srv = _server(metrics=lambda accept: (metrics, "text/plain; version=0.0.4"))
    c = Client(srv)
    try:
        first = c.get(STATE)
        kept = [c.get(STATE), c.get(METRICS_GZ), c.get(METRICS_GZ)]
        assert srv.sender.pid is not None
        held = child_sockets(srv.sender.pid)
        plain = [once(srv, STATE), once(srv, METRICS_GZ)]
    finally:
        c.close()
        srv.stop()
    assert first[0] == 200
    assert [r[0] for r in kept] == [200, 200, 200]
    assert kept[0][2] == first[2] == plain[0][2]
    assert kept[1][2] == kept[2][2] == plain[1][2]
    for got, want in ((kept[0], plain[0]), (kept[1], plain[1])):
        assert {k: v for k, v in got[1].items() if k != "date"} == {
            k: v for k, v in want[1].items() if k not in ("date", "connection")
        }
        assert got[1]["date"].endswith(" GMT")
    assert (srv.sender.kept, srv.sender.asked, srv.sender.back) == (1, 3, 0)
    assert held == 2  # its control socket and the kept connection


def test_requests_the_child_does_not_answer_go_back_and_keep_their_order() -> None:
    """Pipelined on a kept connection, a health check, a validator, a HEAD, a GET with a
    body, a query and an HTTP/0.9 line are each answered by the daemon as on any
    connection, in order."""
    srv = _server()
    c = Client(srv)
    try:
        etag = c.get(STATE)[1]["etag"]
        c.sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            + STATE.replace(b"\r\n\r\n", f"\r\nIf-None-Match: {etag}\r\n\r\n".encode())
            + b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            + STATE.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\nhello")
            + b"GET /api/v1/state?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            + STATE
            + b"GET /metrics\r\n\r\n"
        )
        got = [c.response(head_only=i == 2) for i in range(7)]
        closed = c.closed(5)
    finally:
        c.close()
        srv.stop()
    assert [r[0] for r in got] == [200, 304, 200, 200, 200, 200, 400]
    assert got[0][2] == b'{"status":"ok"}\n'
    assert got[3][2] == got[4][2] == got[5][2]
    assert closed
    assert srv.sender.back >= 3


@pytest.mark.parametrize(
    "bad",
    [
        b"GET /api/v1/state HTTP/1.1\r\n\r\n",  # no Host
        b"GET /api/v1/state HTTP/1.1\r\nHost: x\r\nHost : y\r\n\r\n",
        b"GET /api/v1/state HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    ],
)
def test_a_garbled_request_on_a_kept_connection_gets_the_daemons_400(bad: bytes) -> None:
    """What h11 refuses, the child does not answer either: the daemon says 400."""
    srv = _server()
    c = Client(srv)
    try:
        assert c.get(STATE)[0] == 200
        status = c.get(bad)[0]
    finally:
        c.close()
        srv.stop()
    assert status == 400
    assert srv.sender.back == 1


@pytest.mark.parametrize("path", [STATE, METRICS_GZ])
def test_a_reload_that_turns_on_passwords_reaches_kept_connections(path: bytes) -> None:
    """A connection kept before basic auth was configured is refused (401) on its next
    request: the daemon answers no question of the child while a password is needed, so
    the connection comes back to be checked."""
    srv = _server(Limits(metrics_max_age=60))
    c = Client(srv)
    try:
        for _ in range(3):
            assert c.get(path)[0] == 200
        srv.use_web(WebConfig(users={"alice": htpasswd_hash("pw").encode()}))
        status = c.get(path)[0]
    finally:
        c.close()
        srv.stop()
    assert status == 401
    assert srv.sender.back == 1


def test_a_kept_connection_that_stalls_gets_408_and_an_idle_one_is_closed() -> None:
    """The child holds kept connections to the daemon's limits: a request head not
    finished in time goes back to the daemon (which says 408), and a connection idle
    past the keep-alive time is closed."""
    srv = _server(Limits(head_timeout=1.0, idle_timeout=1.5))
    slow, idle = Client(srv), Client(srv)
    try:
        for c in (slow, idle):
            assert c.get(STATE)[0] == 200
        t0 = time.monotonic()
        slow.sock.sendall(b"GET /metr")
        status = slow.response()[0]
        idle_closed = idle.closed(5)
        took = time.monotonic() - t0
    finally:
        slow.close()
        idle.close()
        srv.stop()
    assert status == 408
    assert idle_closed
    assert took < 5


class FakeDaemon:
    """The daemon's end of the child's control socket, the child running on a thread."""

    def __init__(self) -> None:
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.child = Child(theirs, idle=5, keep=KeepLimits(16, 60, 10, 30, 16384))
        self.thread = threading.Thread(target=self.child.run)
        self.thread.start()

    def keep(self, sock: socket.socket) -> None:
        fds = array.array("i", (sock.fileno(),))
        self.ours.sendmsg([KEEP.pack(KIND_KEEP)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])

    def question(self, timeout: float) -> tuple[int, list[bytes]] | None:
        self.ours.settimeout(timeout)
        try:
            data = self.ours.recv(1 << 16)
        except TimeoutError:
            return None
        assert data[:1] == KIND_ASK
        _, number = ASK.unpack_from(data)
        return number, data[ASK.size :].split(b"\0")[:3]

    def answer(self, number: int, head: bytes, body: SharedBody) -> None:
        fds = array.array("i", (body.fd,))
        self.ours.sendmsg(
            [DOC.pack(KIND_DOC, number, body.size), head],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)],
        )

    def close(self) -> None:
        self.ours.close()
        self.thread.join(5)


def test_the_child_asks_once_for_all_the_readers_of_a_document_then_again() -> None:
    """Three kept connections asking for the state while the child's question is
    unanswered share that one question and its answer; a later request asks again (the
    model may have moved)."""
    daemon = FakeDaemon()
    body = body_of(200_000, 3, seed=5)
    shared = SharedBody.of(body)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)
    pairs = [Pair() for _ in range(3)]
    try:
        for p in pairs:
            daemon.keep(p.server)
            p.server.close()
        for p in pairs:
            p.client.sendall(STATE)
        first = daemon.question(5)
        assert first is not None
        assert first[1] == [b"/api/v1/state", b"", b""]
        time.sleep(0.3)
        extra = daemon.question(0.2)
        daemon.answer(first[0], head, shared)
        got = [
            p.read(len(head) + len(b"Date: Sun, 06 Dec 2026 00:00:00 GMT\r\n\r\n") + len(body))
            for p in pairs
        ]
        pairs[0].client.sendall(STATE)
        again = daemon.question(5)
    finally:
        for p in pairs:
            p.client.close()
        daemon.close()
        shared.close()
    assert extra is None
    for g in got:
        h, _, b = g.partition(b"\r\n\r\n")
        assert h.startswith(head + b"Date: ")
        assert b == bytes(body)
    assert again is not None and again[0] != first[0]


@pytest.mark.parametrize(
    ("head", "want"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x", (b"/metrics", "", "", False)),
        (
            b"GET /api/v1/state HTTP/1.1\r\nhost: x\r\nAccept: a/b\r\nAccept-Encoding: gzip\r\n"
            b"Connection: keep-alive, Close\r\nUser-Agent: t",
            (b"/api/v1/state", "a/b", "gzip", True),
        ),
        (b"GET /healthz HTTP/1.1\r\nHost: x", None),
        (b"GET /metrics?x HTTP/1.1\r\nHost: x", None),
        (b"HEAD /metrics HTTP/1.1\r\nHost: x", None),
        (b"GET /metrics HTTP/1.0\r\nHost: x", None),
        (b"GET /metrics HTTP/1.1", None),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic eA==", None),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nIf-None-Match: *", None),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0", None),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: a\r\nAccept: b", None),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded", None),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: upgrade", None),
        (b"GET  /metrics HTTP/1.1\r\nHost: x", None),
    ],
)
def test_the_child_answers_only_plain_document_gets(head: bytes, want: Any) -> None:
    """Only a plain HTTP/1.1 GET of /metrics or the state, with nothing that changes its
    meaning, is answered by the child; anything else is the daemon's."""
    assert plain_get(head) == want


def test_a_round_sends_to_those_that_took_least_lately_first_and_stops_at_its_budget() -> None:
    """In one round of the child's loop the writable connections are sent to in order of
    what they took lately (a daemon's one-off job first), until the round's budget is
    spent, except that a body passed over for too long goes first; a connection's past
    load fades with its half-life."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = Child(theirs, idle=5, keep=KeepLimits(16, 60, 10, 30, 16384))
    order: list[str] = []
    kept = {}
    jobs = []
    socks: list[socket.socket] = []
    try:
        now = time.monotonic()
        for name, load in (("heavy", 50e6), ("light", 1e6), ("middle", 8e6), ("one-off", None)):
            sock = socket.socket()  # only its descriptor is used here
            socks.append(sock)
            k = None
            if load is not None:
                k = kept[name] = _Kept(sock, b"", now)
                k.load, k.load_at = load, now
            job = _Job(0, sock, memoryview(b""), memoryview(b""), 0, k)
            child.jobs[-sock.fileno() if k is not None else sock.fileno()] = job
            jobs.append((name, job))
        names = {id(job): name for name, job in jobs}

        def fake_send(job: _Job, fresh: bool = False) -> int:
            order.append(names[id(job)])
            return ROUND // 2

        child._send = fake_send  # type: ignore[method-assign]
        child._send_round([job for _, job in jobs])
        assert order == ["one-off", "light"]
        # One passed over for longer than STARVED goes first, however much it took.
        order.clear()
        jobs[0][1].last -= 2 * STARVED
        child._send_round([job for _, job in jobs])
        assert order == ["heavy", "one-off"]
        later = kept["heavy"].load_at + 3 * LOAD_HALF_LIFE
        assert kept["heavy"].load_now(later) == pytest.approx(50e6 / 8)
    finally:
        child.sel.close()
        for sock in socks:
            sock.close()
        ours.close()
        theirs.close()


def test_a_kept_reader_gets_each_new_version_of_the_state_and_no_stale_one() -> None:
    """The daemon answers the child's questions from the last answer only while that
    answer's document is the current one: after a change, a kept connection's next GET
    shows it."""
    model = _model()
    srv = HttpServer(
        ("127.0.0.1", 0),
        Api(
            view=model.copy,
            alive=lambda: True,
            ready=lambda: True,
            shown_version=lambda: model.shown_version,
        ),
    )
    srv.start()
    c = Client(srv)
    try:
        names = []
        for i in range(3):
            bodies = [json.loads(c.get(STATE)[2]) for _ in range(2)]
            assert bodies[0] == bodies[1]
            names.append(sorted(bodies[0]["namespaces"]))
            model.apply(NamespaceSeen(10 + i, (f"new-{i}",)))
    finally:
        c.close()
        srv.stop()
    assert names == [
        ["host", "lab-1"],
        ["host", "lab-1", "new-0"],
        ["host", "lab-1", "new-0", "new-1"],
    ]
    assert srv.sender.asked == 5
