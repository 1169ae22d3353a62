"""``nswatch watch``: SSE parsing, ip-monitor-like lines, resume after a dropped connection."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator

import pytest

from nswatch import cli
from nswatch.http import Api, HttpServer
from nswatch.logs import describe_change
from nswatch.model import (
    Address,
    AddressNew,
    Event,
    Link,
    LinkNew,
    Model,
    NamespaceSeen,
    NsidLearned,
)
from nswatch.stream import StreamEvent, StreamHub
from nswatch.watch import Names, SseParser, Watcher, format_line, read_events

HOST, NS = 1, 2


def test_sse_parser_follows_the_spec() -> None:
    """Comments are skipped, data lines join, an id-only block moves the last id without an event."""
    text = b": hi\nretry: 10\nid: 4\n\nid: 5\nevent: x\ndata: a\ndata: b\n\n: keepalive\nid: 9\n\n"
    parser = SseParser()
    events = list(read_events(io.BytesIO(text), parser))
    assert [(e.id, e.event, e.data) for e in events] == [("5", "x", "a\nb")]
    assert parser.last_id == "9"


class Daemonish:
    """A model and a hub kept in step, as the daemon keeps them."""

    def __init__(self, history: int = 100) -> None:
        self.model = Model()
        self.hub = StreamHub(history=history, heartbeat=60)
        self.lock = threading.Lock()

    def apply(self, *events: Event) -> None:
        for ev in events:
            with self.lock:
                changes = self.model.apply(ev)
            self.hub.changes(changes, None)

    def view(self) -> Model:
        with self.lock:
            return self.model.copy()


def veth(index: int, name: str, peer: int, up: bool = True) -> Link:
    return Link(index, name, "veth", peer_index=peer, peer_netnsid=0, admin_up=up)


def test_lines_name_links_and_veth_peers() -> None:
    """A line says the namespace, the link by name, its state and where its veth peer is."""
    d = Daemonish()
    d.apply(
        NamespaceSeen(HOST, ("host",), is_host=True),
        NamespaceSeen(NS, ("ns1",)),
        LinkNew(HOST, veth(7, "veth-a", 3)),
        LinkNew(NS, veth(3, "veth-b", 7)),
        NsidLearned(NS, 0, HOST),
    )
    from nswatch.state import state_json

    names = Names()
    names.load(state_json(d.view()))
    d.apply(LinkNew(NS, veth(3, "veth-b", 7, up=False)))
    d.apply(AddressNew(NS, Address(3, "inet", "198.18.0.2", 24)))
    held = d.hub.after(d.hub.last_id - 2)
    assert held is not None
    lines = []
    for ev in held:
        data = ev.data()
        names.update(data)
        lines.append(format_line(data, names))
    assert lines == [
        "[ns1] link veth-b veth DOWN (peer host/veth-a)",
        "[ns1] addr 198.18.0.2/24 dev veth-b",
    ]


@contextlib.contextmanager
def serving(d: Daemonish) -> Iterator[HttpServer]:
    """The HTTP API over ``d``, its host namespace seen."""
    d.apply(NamespaceSeen(HOST, ("host",), is_host=True))
    srv = HttpServer(
        ("127.0.0.1", 0),
        Api(view=d.view, alive=lambda: True, ready=lambda: True, events=d.hub),
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def served() -> Iterator[tuple[Daemonish, HttpServer]]:
    d = Daemonish()
    with serving(d) as srv:
        yield d, srv


class Enough(Exception):
    pass


def run_watcher(w: Watcher) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(Enough):
            w.run()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def wait_until(cond: object, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_watch_resumes_after_a_dropped_connection(served: tuple[Daemonish, HttpServer]) -> None:
    """Changes made while the watcher was cut off arrive once it reconnects: none lost, none twice."""
    d, srv = served
    host, port = srv.address
    lines: list[str] = []
    errors: list[str] = []

    def out(line: str) -> None:
        lines.append(line)
        if len(lines) == 6:
            raise Enough

    w = Watcher(f"http://{host}:{port}", as_json=True, out=out, err=errors.append, timeout=0.4)
    w.retry = 0.3
    t = run_watcher(w)
    wait_until(lambda: d.hub.stats().clients == 1)
    d.apply(*(LinkNew(HOST, Link(i, f"l{i}", "device")) for i in range(10, 13)))
    wait_until(lambda: len(lines) == 3)
    wait_until(lambda: errors)  # no byte for 0.4 s: it hung up and waits to retry
    d.apply(*(LinkNew(HOST, Link(i, f"l{i}", "device")) for i in range(13, 16)))
    t.join(5)
    assert not t.is_alive()
    ids = [json.loads(line)["id"] for line in lines]
    first = d.hub.last_id - 5
    assert ids == list(range(first, first + 6))
    assert [json.loads(line)["link"] for line in lines] == [f"l{i}" for i in range(10, 16)]


def test_watch_reads_the_state_again_when_told_to_resync() -> None:
    """Cut off for longer than the history holds, it prints the resync and carries on from the state."""
    d = Daemonish(history=4)
    with serving(d) as srv:
        resync_then_follow(d, srv)


def resync_then_follow(d: Daemonish, srv: HttpServer) -> None:
    host, port = srv.address
    lines: list[str] = []
    w = Watcher(f"http://{host}:{port}", out=lines.append, err=lines.append)
    w.load_state()
    d.apply(*(LinkNew(HOST, Link(i, f"l{i}", "device")) for i in range(10, 20)))

    def out(line: str) -> None:
        lines.append(line)
        if "l20" in line:
            raise Enough

    w.out = out
    t = run_watcher(w)
    wait_until(lambda: any("resync" in line for line in lines))
    wait_until(lambda: d.hub.stats().clients == 1)
    d.apply(LinkNew(HOST, Link(20, "l20", "device", admin_up=True, oper_state="UP")))
    t.join(5)
    assert lines[0].startswith("# resync: history_exceeded")
    assert lines[-1] == "[host] link l20 device UP"


def test_watch_subcommand_flags() -> None:
    """`nswatch watch` takes the daemon's URL, namespace globs, kinds and --json."""
    args = cli.build_parser().parse_args(
        ["watch", "--url", "http://h:1", "--netns", "a*", "--kind", "veth", "--json"]
    )
    assert (args.url, args.netns, args.kind, args.json) == ("http://h:1", ["a*"], ["veth"], True)
    assert cli.build_parser().parse_args(["watch"]).url == "http://127.0.0.1:9442"


def test_event_data_is_the_log_fields() -> None:
    """What the stream sends is describe_change plus id and event name, nothing invented."""
    ch = LinkNew(HOST, Link(3, "x", "device"))
    m = Model()
    m.apply(NamespaceSeen(HOST, ("host",), is_host=True))
    (change,) = m.apply(ch)
    ev = StreamEvent(2, change, "initial")
    assert ev.data() == {"id": 2, "event": "link_added", "source": "initial"} | describe_change(
        change
    )


def test_rule_lines_read_like_ip_rule() -> None:
    """A rule line reads like `ip rule` and says when it is IPv6, so the two families differ."""
    names = Names()
    v4 = {"event": "rule_added", "netns": "n", "family": "inet", "priority": 0, "action": "lookup"}
    v6 = v4 | {"family": "inet6", "table": "local"}
    sel = v4 | {"event": "rule_removed", "priority": 100, "src": "198.18.0.2/32", "fwmark": 7}
    sel["table"] = "100"
    assert format_line(v4 | {"table": "local"}, names) == "[n] rule 0: from all lookup local"
    assert format_line(v6, names) == "[n] rule 0: from all lookup local (inet6)"
    assert format_line(sel, names) == "[n] Deleted rule 100: from 198.18.0.2/32 fwmark 7 lookup 100"


def test_a_lost_peer_is_forgotten_on_both_ends() -> None:
    """Once a pair is lost (its namespace deleted), neither end's line names the old peer."""
    names = Names()
    resolved = {"event": "veth_peer_resolved", "netns": "ns1", "link": "b"}
    names.update(resolved | {"peer_netns": "host", "peer_link": "a"})
    link = {"event": "link_changed", "netns": "host", "link": "a", "ifindex": 5, "kind": "veth"}
    assert format_line(link | {"admin_up": True, "oper_state": "UP"}, names).endswith(
        "(peer ns1/b)"
    )
    names.update(
        {
            "event": "veth_peer_lost",
            "netns": "ns1",
            "link": "b",
            "peer_netns": "host",
            "peer_link": "a",
        }
    )
    assert format_line(link | {"admin_up": False}, names) == "[host] link a veth DOWN"
    names.update(resolved | {"peer_netns": "host", "peer_link": "a"})
    names.update({"event": "namespace_removed", "netns": "ns1"})
    assert names.peers == {}
