"""The page and its data over HTTP: served from the package, nothing from elsewhere."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator

import pytest

from nswatch.http import Api, HttpServer
from nswatch.topology import build
from tests.test_topology import model


@pytest.fixture
def server() -> Iterator[HttpServer]:
    m = model()
    srv = HttpServer(("127.0.0.1", 0), Api(view=lambda: m, alive=lambda: True, ready=lambda: True))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def get(srv: HttpServer, path: str, accept: str = "*/*") -> http.client.HTTPResponse:
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("GET", path, headers={"Accept": accept})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def body(srv: HttpServer, path: str, accept: str = "*/*") -> tuple[int, str, bytes]:
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path, headers={"Accept": accept})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def test_browsers_get_the_page_programs_the_endpoints(server: HttpServer) -> None:
    """/ is the page for a browser (Accept: text/html) and the endpoint list for anything else."""
    status, ctype, data = body(server, "/", "text/html,application/xhtml+xml")
    assert status == 200 and ctype.startswith("text/html") and b"ui/app.js" in data
    status, ctype, data = body(server, "/")
    assert ctype == "application/json" and "/api/v1/topology" in json.loads(data)["endpoints"]


def test_page_loads_nothing_from_elsewhere(server: HttpServer) -> None:
    """No asset names another host, and the CSP forbids it should one try."""
    for path in ("/", "/ui/app.js", "/ui/app.css"):
        status, _, data = body(server, path, "text/html")
        assert status == 200, path
        assert not re.search(rb"(src|href)=[\"']?(https?:)?//", data), path
        assert not re.search(rb"(fetch|EventSource|import)\(\s*[\"'`]https?:", data), path
    resp = get(server, "/ui/app.js")
    assert "default-src 'none'" in (resp.getheader("Content-Security-Policy") or "")
    assert resp.getheader("Content-Type", "").startswith("text/javascript")


def test_topology_endpoint_is_the_shared_graph(server: HttpServer) -> None:
    """/api/v1/topology returns exactly what topology.build makes of the view."""
    status, _, data = body(server, "/api/v1/topology")
    assert status == 200 and json.loads(data) == build(model())
