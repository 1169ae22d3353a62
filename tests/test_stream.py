"""The event stream: numbering, resume, filters, heartbeats and slow consumers (no kernel)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nswatch.http import Api, HttpServer, Limits
from nswatch.logs import describe_change
from nswatch.model import (
    Change,
    Link,
    LinkAdded,
    LinkChanged,
    Model,
    NamespaceAdded,
    Route,
    RouteRemoved,
    VethPair,
    VethResolved,
)
from nswatch.stream import StreamHub, Subscription, parse_request
from nswatch.watch import SseEvent, SseParser, read_events


def link_added(ns: str, index: int, up: bool = True) -> LinkAdded:
    return LinkAdded(ns, 7, Link(index=index, name=f"eth{index}", kind="veth", admin_up=up))


@pytest.fixture
def hub() -> StreamHub:
    return StreamHub(history=100, heartbeat=0.2)


@pytest.fixture
def server(hub: StreamHub) -> Iterator[HttpServer]:
    api = Api(view=Model, alive=lambda: True, ready=lambda: True, events=hub)
    srv = HttpServer(("127.0.0.1", 0), api, limits=Limits(write_timeout=3))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


class Client:
    """A stream client reading events on the test's thread."""

    def __init__(self, srv: HttpServer, path: str = "/api/v1/events", **headers: str) -> None:
        host, port = srv.address
        self.conn = http.client.HTTPConnection(host, port, timeout=5)
        self.conn.request("GET", path, headers=headers)
        self.resp = self.conn.getresponse()
        self.parser = SseParser()
        self.events = read_events(self.resp, self.parser)

    def take(self, n: int) -> list[SseEvent]:
        return [next(self.events) for _ in range(n)]

    def close(self) -> None:
        self.conn.close()


def wait_clients(hub: StreamHub, n: int) -> None:
    deadline = time.monotonic() + 3
    while hub.stats().clients != n:
        assert time.monotonic() < deadline, f"{hub.stats().clients} clients, not {n}"
        time.sleep(0.01)


def test_events_carry_the_log_fields_and_consecutive_ids(
    server: HttpServer, hub: StreamHub
) -> None:
    """Each change is one event named like its log line, with the same fields and the next id."""
    c = Client(server)
    wait_clients(hub, 1)
    assert c.resp.getheader("Content-Type", "").startswith("text/event-stream")
    old = Link(index=3, name="eth3", kind="veth", admin_up=True)
    changes: list[Change] = [
        NamespaceAdded("ns1", 7, ("ns1",)),
        LinkChanged("ns1", 7, old, Link(index=3, name="eth3", kind="veth", admin_up=False)),
        RouteRemoved(
            "ns1", 7, Route(table=254, family="inet", type="unicast", dst="198.18.0.0/24", dev=3)
        ),
    ]
    hub.changes(changes, None)
    got = c.take(3)
    assert [e.id for e in got] == ["1", "2", "3"]
    assert [e.event for e in got] == ["namespace_added", "link_changed", "route_removed"]
    for ev, ch in zip(got, changes, strict=True):
        data = json.loads(ev.data)
        fields = json.loads(json.dumps(describe_change(ch)))
        assert data == {"id": int(ev.id or 0), "event": ev.event, **fields}
    c.close()


def test_resume_with_last_event_id_gets_exactly_what_was_missed(
    server: HttpServer, hub: StreamHub
) -> None:
    """A client reconnecting with Last-Event-ID (or ?since) gets the changes after it, none twice."""
    hub.changes([link_added("a", i) for i in range(1, 11)], None)
    c = Client(server, **{"Last-Event-ID": "4"})
    assert [e.id for e in c.take(6)] == [str(i) for i in range(5, 11)]
    hub.changes([link_added("a", 11)], None)
    assert [e.id for e in c.take(1)] == ["11"]
    c.close()
    c = Client(server, "/api/v1/events?since=9")
    assert [e.id for e in c.take(2)] == ["10", "11"]
    c.close()


def test_too_old_or_unknown_id_gets_one_resync_event(server: HttpServer, hub: StreamHub) -> None:
    """Asking for changes older than the history (or ids of another run) ends in one resync event."""
    hub.changes([link_added("a", i) for i in range(1, 151)], None)  # history holds 51..150
    c = Client(server, **{"Last-Event-ID": "49"})
    events = list(c.events)
    assert [e.event for e in events] == ["resync"]
    data = json.loads(events[0].data)
    assert data["state"] == "/api/v1/state" and data["last_event_id"] == 150
    assert data["reason"] == "history_exceeded"
    c.close()
    c = Client(server, **{"Last-Event-ID": "50"})  # 51 is still held: no resync
    assert c.take(1)[0].id == "51"
    c.close()
    c = Client(server, **{"Last-Event-ID": "999"})
    assert [json.loads(e.data)["reason"] for e in c.events] == ["unknown_id"]
    c.close()
    assert hub.stats().dropped_total == 0


def test_filters_by_namespace_glob_and_kind(server: HttpServer, hub: StreamHub) -> None:
    """?netns globs (repeatable) and ?kind select events; a veth pair matches on either end."""
    c = Client(server, "/api/v1/events?netns=web-*&netns=db&kind=link&kind=veth")
    wait_clients(hub, 1)
    pair = VethPair((7, 2), (8, 3), "v0", "web-1", "v1")
    hub.changes(
        [
            link_added("web-1", 1),
            link_added("cache", 1),
            link_added("db", 2),
            NamespaceAdded("web-2", 9, ("web-2",)),
            VethResolved("host", 7, pair),
            link_added("web-2", 5),
        ],
        None,
    )
    got = [(e.id, e.event, json.loads(e.data)["netns"]) for e in c.take(4)]
    assert got == [
        ("1", "link_added", "web-1"),
        ("3", "link_added", "db"),
        ("5", "veth_peer_resolved", "host"),
        ("6", "link_added", "web-2"),
    ]
    c.close()


def test_bad_filter_is_a_400(server: HttpServer, hub: StreamHub) -> None:
    """An unknown kind or a non-numeric id is refused, not silently ignored."""
    for path in ("/api/v1/events?kind=bogus", "/api/v1/events?since=x"):
        host, port = server.address
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 400, path
        assert "error" in json.loads(resp.read())
        conn.close()


def test_heartbeat_keeps_the_connection_and_moves_the_id(
    server: HttpServer, hub: StreamHub
) -> None:
    """Idle streams get `: keepalive` comments; events filtered out still advance Last-Event-ID."""
    c = Client(server, "/api/v1/events?netns=nope")
    wait_clients(hub, 1)
    hub.changes([link_added("a", 1), link_added("a", 2)], None)
    lines = []
    while "id: 2" not in lines:
        lines.append(c.resp.readline().decode().rstrip("\n"))
    assert ": keepalive" in lines
    c.close()


def test_a_consumer_that_falls_behind_is_dropped_with_resync(
    server: HttpServer, hub: StreamHub
) -> None:
    """A client that stops reading while changes flood is dropped, told to resync, and counted."""
    host, port = server.address
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_clients(hub, 1)
    t0 = time.monotonic()
    n = 0
    # The kernel's socket buffers take a few MB before the server's own fill up.
    while not hub.stats().dropped_total and time.monotonic() - t0 < 30:
        hub.changes([link_added("a", n + i) for i in range(1000)], None)
        n += 1000
        time.sleep(0.005)
    assert hub.stats().dropped_total == 1
    sock.settimeout(5)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    wait_clients(hub, 0)
    body = data.split(b"\r\n\r\n", 1)[1]
    assert b"event: resync" in body[-4000:], body[-500:]
    assert b'"reason": "fell_behind"' in body or b'"reason": "slow_consumer"' in body


def test_observer_callback_returns_without_an_http_loop() -> None:
    """Without a server attached the hub still numbers changes (ids stay aligned with the model)."""
    hub = StreamHub(history=3)
    hub.changes([link_added("a", i) for i in range(5)], None)
    assert hub.last_id == 5
    held = hub.after(2)
    assert held is not None and [e.id for e in held] == [3, 4, 5]
    assert hub.after(1) is None


@pytest.mark.parametrize(
    ("query", "header", "expect"),
    [
        ("", None, ((), frozenset(), None)),
        ("kind=veth,rule&since=3", None, ((), frozenset({"veth_peer", "rule"}), 3)),
        ("since=3", "8", ((), frozenset(), 8)),
        ("netns=a&netns=b*", None, (("a", "b*"), frozenset(), None)),
    ],
)
def test_request_parsing(query: str, header: str | None, expect: tuple[Any, ...]) -> None:
    """Last-Event-ID wins over ?since; kinds may be comma-separated; veth means veth_peer."""
    flt, since = parse_request(query, header)
    assert (flt.netns, flt.kinds, since) == expect


def test_veth_peer_fields_name_both_ends() -> None:
    """A resolved pair's event says the link and where its peer is, like the log line."""
    pair = VethPair((1, 2), (3, 4), "veth-a", "nstest", "veth-b")
    fields = describe_change(VethResolved("host", 1, pair))
    assert fields == {
        "netns": "host",
        "link": "veth-a",
        "peer_netns": "nstest",
        "peer_link": "veth-b",
    }


def test_a_burst_past_the_history_drops_only_the_clients_it_overtook() -> None:
    """When one wake-up finds more changes than the history holds, only clients that missed some resync."""
    hub = StreamHub(history=5)
    hub.changes([link_added("a", i) for i in range(3)], None)
    ahead, behind = hub.subscribe("", "3"), hub.subscribe("", "0")
    got: dict[str, list[bytes]] = {"ahead": [], "behind": []}

    def sender(name: str) -> Callable[[bytes], bool]:
        def send(data: bytes) -> bool:
            got[name].append(data)
            return True

        return send

    for name, sub in (("ahead", ahead), ("behind", behind)):
        sub.live = True  # as run() leaves a caught-up client
        sub._send = sender(name)
    hub.changes([link_added("a", i) for i in range(3, 6)], None)  # holds 2..6 now
    hub._notify()
    assert [ev.split(b"\n")[0] for ev in b"".join(got["ahead"]).split(b"\n\n") if ev] == [
        b"id: 4",
        b"id: 5",
        b"id: 6",
    ]
    assert not ahead.ended and behind.ended and hub.stats().dropped_total == 1
    assert b'"reason": "fell_behind"' in got["behind"][-1]


def test_a_client_a_burst_outran_before_its_first_write_is_dropped_as_fallen_behind() -> None:
    """A client that named no id starts at the newest change; a burst past the history before
    the HTTP thread first serves it (a slow machine) is falling behind: counted as dropped,
    with a fell_behind resync (it was told history_exceeded, as if it had asked for an old id,
    and not counted)."""
    hub = StreamHub(history=5)
    fresh, old = hub.subscribe("", None), hub.subscribe("", "0")
    hub.changes([link_added("a", i) for i in range(7)], None)  # holds 3..7 now
    got: dict[str, list[bytes]] = {"fresh": [], "old": []}

    async def serve(name: str, sub: Subscription) -> None:
        def send(data: bytes) -> bool:
            got[name].append(data)
            return True

        async def drain() -> None:
            return None

        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await sub.run(send, drain, gone)

    async def both() -> None:
        await serve("fresh", fresh)
        await serve("old", old)

    asyncio.run(both())
    assert fresh.ended and old.ended
    assert b'"reason": "fell_behind"' in got["fresh"][-1]
    assert b'"reason": "history_exceeded"' in got["old"][-1]
    assert hub.stats().dropped_total == 1
    assert hub.stats().resyncs_total == 2
