"""The HTTP API: paths, status codes, and robustness against hostile clients."""

from __future__ import annotations

import email.utils
import http.client
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nswatch import cli
from nswatch.http import Api, HttpServer, http_date
from nswatch.model import Link, LinkNew, Model, NamespaceSeen, Synced


def _model() -> Model:
    m = Model()
    m.apply(NamespaceSeen(1, ("host",), is_host=True))
    m.apply(NamespaceSeen(2, ("lab-1", "alias")))
    m.apply(LinkNew(2, Link(index=1, name="lo", kind="loopback", admin_up=True)))
    m.apply(Synced(1))
    m.apply(Synced(2))
    return m


def assert_served_twice(conn: http.client.HTTPConnection, path: str, body: bytes) -> None:
    """``GET path`` twice on ``conn`` (kept alive), each time answered with ``body`` whole."""
    try:
        for _ in range(2):
            conn.request("GET", path)
            assert conn.getresponse().read() == body
    finally:
        conn.close()


@pytest.fixture
def server() -> Iterator[HttpServer]:
    model = _model()
    ready = {"value": False}
    api = Api(
        view=model.copy,
        alive=lambda: True,
        ready=lambda: ready["value"],
        metrics=lambda accept: (b"# metrics\n", "text/plain; version=0.0.4"),
    )
    srv = HttpServer(("127.0.0.1", 0), api)
    srv.ready_flag = ready  # type: ignore[attr-defined]
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def request(srv: HttpServer, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        data = resp.read()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, json.loads(data) if "json" in ctype and data else data
    finally:
        conn.close()


def test_state_and_namespace_paths(server: HttpServer) -> None:
    """/api/v1/state has the documented top-level fields; a namespace is found by any of its names."""
    status, state = request(server, "GET", "/api/v1/state")
    assert status == 200
    assert set(state) == {"event_id", "synced", "namespaces", "veth_pairs"}
    assert set(state["namespaces"]) == {"host", "lab-1"}
    ns = state["namespaces"]["lab-1"]
    assert {"name", "inode", "links", "addresses", "routes"} <= set(ns)
    status, by_alias = request(server, "GET", "/api/v1/namespaces/alias")
    assert status == 200 and by_alias["name"] == "lab-1"
    status, err = request(server, "GET", "/api/v1/namespaces/nope")
    assert status == 404 and err["error"] == "namespace not found"


def test_health_and_readiness(server: HttpServer) -> None:
    """/healthz is 200 while alive; /readyz is 503 until the first full sync, then 200."""
    assert request(server, "GET", "/healthz")[0] == 200
    assert request(server, "GET", "/readyz")[0] == 503
    server.ready_flag["value"] = True  # type: ignore[attr-defined]
    assert request(server, "GET", "/readyz")[0] == 200


def test_unknown_paths_and_wrong_methods(server: HttpServer) -> None:
    """Unknown paths are 404 and wrong methods on known ones 405, both as JSON."""
    assert request(server, "GET", "/nope")[0] == 404
    status, body = request(server, "POST", "/api/v1/state", body=b"x" * 100)
    assert status == 405 and body["error"] == "method not allowed"
    assert request(server, "DELETE", "/metrics")[0] == 405
    assert request(server, "HEAD", "/healthz")[0] == 200


def _raw(srv: HttpServer, payload: bytes, read: bool = True) -> bytes:
    host, port = srv.address
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(payload)
        if not read:
            s.shutdown(socket.SHUT_WR)
            return b""
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def test_garbage_requests_do_not_hurt(server: HttpServer) -> None:
    """Garbage, huge headers and half-closed connections get errors or nothing, and the server serves on."""
    assert _raw(server, b"\x00\xff garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    huge = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
    assert _raw(server, huge).split(b" ")[1] in (b"400", b"431")
    assert (
        _raw(server, b"BREW /pot HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").split(b" ")[1]
        == b"404"
    )
    for _ in range(20):
        _raw(server, b"GET /metrics HTTP/1.1\r\n", read=False)
    bad_name = b"GET /api/v1/namespaces/%ff%00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert _raw(server, bad_name).split(b" ")[1] == b"404"
    t0 = time.monotonic()
    assert request(server, "GET", "/metrics")[0] == 200
    assert time.monotonic() - t0 < 2


def _responses(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in a byte stream, framed by Content-Length."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        length = next(
            int(v)
            for k, _, v in (ln.partition(b":") for ln in lines[1:])
            if k.lower() == b"content-length"
        )
        out.append((status, rest[:length]))
        raw = rest[length:]
    return out


def test_http09_request_gets_400_with_status_line(server: HttpServer) -> None:
    """An HTTP/0.9 request line (no version) is answered 400 with a status line and JSON, at once."""
    host, port = server.address
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET /healthz\r\n")  # a 0.9 client sends no blank line, and waits
        data = b""
        while chunk := s.recv(65536):  # the server answers and closes without more input
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
    assert "error" in json.loads(data.partition(b"\r\n\r\n")[2])


def test_missing_host_is_400(server: HttpServer) -> None:
    """An HTTP/1.1 request without Host is garbled (RFC 9112 says 400); HTTP/1.0 needs none."""
    assert _raw(server, b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _raw(server, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")


def test_body_on_get_is_not_parsed_as_a_request(server: HttpServer) -> None:
    """A GET's body is read and dropped: a request smuggled in it is never answered."""
    smuggled = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
    payload = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
        + smuggled
        + b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert [status for status, _ in _responses(_raw(server, payload))] == [200, 503]


def test_chunked_body_on_get_is_dropped(server: HttpServer) -> None:
    """A chunked body is read and dropped too, and the connection carries the next request."""
    payload = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nGET /\r\n0\r\n\r\n"
        b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert [status for status, _ in _responses(_raw(server, payload))] == [200, 404]


def test_oversized_body_is_refused(server: HttpServer) -> None:
    """A GET with a body over the limit gets 413; a POST still gets its 405."""
    big = b"x" * (1 << 20)
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big)
    assert _raw(server, head).startswith(b"HTTP/1.1 413 ")
    status, body = request(server, "POST", "/metrics", body=b"x" * 100)
    assert status == 405 and body == {"error": "method not allowed"}


def test_server_header_gives_no_versions(server: HttpServer) -> None:
    """The Server header names nswatch and nothing else (no Python version)."""
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        resp.read()
        assert resp.getheader("Server") == "nswatch"
    finally:
        conn.close()


def test_keep_alive_and_pipelining(server: HttpServer) -> None:
    """Pipelined requests on one connection are answered in order, HEAD with GET's length and no body."""
    payload = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"HEAD /api/v1/state HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /api/v1/state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    raw = _raw(server, payload)
    heads = re.findall(
        rb"HTTP/1\.1 (\d{3}) [^\r]*\r\n(?:[^\r]+\r\n)*?Content-Length: (\d+)\r\n", raw
    )
    assert [status for status, _ in heads] == [b"200", b"200", b"200"]
    assert heads[1][1] == heads[2][1]
    # The HEAD answer carries no body: right after the healthz body comes the GET's head.
    first_body = raw.index(b"\r\n\r\n") + 4 + int(heads[0][1])
    assert raw[first_body:].startswith(b"HTTP/1.1 200 ")
    second_head_end = raw.index(b"\r\n\r\n", first_body) + 4
    assert raw[second_head_end:].startswith(b"HTTP/1.1 200 ")
    assert json.loads(raw.rpartition(b"\r\n\r\n")[2])["synced"] is True


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_connections_send_without_nagle(host: str) -> None:
    """Every accepted connection has TCP_NODELAY: with Nagle on, each small keep-alive
    response (head, then body) waited ~40 ms for the client's delayed ACK (python's
    http.client: 44 ms per /healthz on one connection)."""
    srv = HttpServer((host, 0), Api(view=_model, alive=lambda: True, ready=lambda: True))
    srv.start()
    try:
        conn = http.client.HTTPConnection(*srv.address, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read()
        (served,) = srv.table.conns
        sock = served.writer.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        conn.close()
    finally:
        srv.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_healthz_turns_503_when_the_loop_stalls() -> None:
    """/healthz is 200 while the loop ticked within STALL_AFTER, then 503 {"status": "stalled"} (HEAD too)."""
    clock = FakeClock()
    last_tick = clock.now
    api = Api(
        view=_model().copy,
        alive=lambda: clock() - last_tick < cli.STALL_AFTER,
        ready=lambda: True,
    )
    srv = HttpServer(("127.0.0.1", 0), api)
    srv.start()
    try:
        assert request(srv, "GET", "/healthz") == (200, {"status": "ok"})
        clock.now += cli.STALL_AFTER - 0.1
        assert request(srv, "GET", "/healthz") == (200, {"status": "ok"})
        clock.now += 0.2
        assert request(srv, "GET", "/healthz") == (503, {"status": "stalled"})
        assert request(srv, "HEAD", "/healthz")[0] == 503
        last_tick = clock.now  # the loop turns again
        assert request(srv, "GET", "/healthz") == (200, {"status": "ok"})
    finally:
        srv.stop()


def test_handler_error_is_a_json_500(server: HttpServer) -> None:
    """A handler that raises answers 500 as JSON, and the server answers the next request."""
    api = Api(view=lambda: 1 / 0, alive=lambda: True, ready=lambda: True)  # type: ignore[arg-type, return-value]
    srv = HttpServer(("127.0.0.1", 0), api)
    srv.start()
    try:
        assert request(srv, "GET", "/api/v1/state") == (
            500,
            {"error": "internal error", "detail": "ZeroDivisionError"},
        )
        assert request(srv, "GET", "/healthz")[0] == 200
    finally:
        srv.stop()


def test_readyz_is_503_naming_what_cannot_be_watched() -> None:
    """/readyz stays 503 while a namespace exists that nswatch cannot watch, and says which and why."""
    unwatched = {"ns1": "out_of_fds"}
    api = Api(
        view=_model().copy,
        alive=lambda: True,
        ready=lambda: True,
        unwatched=lambda: dict(unwatched),
    )
    srv = HttpServer(("127.0.0.1", 0), api)
    srv.start()
    try:
        assert request(srv, "GET", "/readyz") == (
            503,
            {"ready": False, "unwatched": {"ns1": "out_of_fds"}},
        )
        unwatched.clear()
        assert request(srv, "GET", "/readyz") == (200, {"ready": True})
    finally:
        srv.stop()


def test_the_date_header_follows_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Date header, made once a second, always shows the current second."""
    for now in (1_800_000_000.2, 1_800_000_000.9, 1_800_000_001.0, 1_800_000_061.5):
        monkeypatch.setattr(time, "time", lambda now=now: now)
        assert http_date() == email.utils.formatdate(int(now), usegmt=True)
