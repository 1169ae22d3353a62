"""The HTTP API: paths, status codes, and robustness against hostile clients."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nswatch.http import Api, HttpServer
from nswatch.model import Link, LinkNew, Model, NamespaceSeen, Synced


def _model() -> Model:
    m = Model()
    m.apply(NamespaceSeen(1, ("host",), is_host=True))
    m.apply(NamespaceSeen(2, ("lab-1", "alias")))
    m.apply(LinkNew(2, Link(index=1, name="lo", kind="loopback", admin_up=True)))
    m.apply(Synced(1))
    m.apply(Synced(2))
    return m


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
    assert set(state) == {"synced", "namespaces", "veth_pairs"}
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
    assert _raw(server, b"BREW /pot HTTP/1.1\r\n\r\n").split(b" ")[1] in (b"501", b"404")
    for _ in range(20):
        _raw(server, b"GET /metrics HTTP/1.1\r\n", read=False)
    bad_name = b"GET /api/v1/namespaces/%ff%00 HTTP/1.1\r\nConnection: close\r\n\r\n"
    assert _raw(server, bad_name).split(b" ")[1] == b"404"
    t0 = time.monotonic()
    assert request(server, "GET", "/metrics")[0] == 200
    assert time.monotonic() - t0 < 2
