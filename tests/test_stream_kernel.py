"""The event stream against the real kernel: ids line up with the state's event_id, resume works."""

from __future__ import annotations

import http.client
import json
import os
import select
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nswatch.daemon import Daemon, Settings
from nswatch.dirwatch import DirWatcher
from nswatch.http import Api, HttpServer
from nswatch.stream import StreamHub
from nswatch.watch import SseEvent, SseParser, read_events
from tests.conftest import Running, require_root, stop_daemon
from tests.kernel import Lab, ip, wait_for
from tests.test_cli import NSWATCH, free_port

pytestmark = pytest.mark.kernel


@dataclass
class Streaming:
    """A running daemon whose API serves the stream from its hub."""

    running: Running
    hub: StreamHub


def start_streaming(settings: Settings, hub: StreamHub) -> Running:
    """A daemon with the hub among its sinks from the start, and its HTTP API."""
    daemon = Daemon(settings, observers=[hub], dirwatch_factory=DirWatcher)
    api = Api(view=daemon.view, alive=lambda: True, ready=daemon.ready.is_set, events=hub)
    server = HttpServer(("127.0.0.1", 0), api)
    server.start()
    daemon.start()
    running = Running(daemon, server)
    if not daemon.ready.wait(10):
        stop_daemon(running)
        raise AssertionError("daemon did not sync within 10 s")
    return running


@pytest.fixture
def streaming(lab: Lab) -> Iterator[Streaming]:
    """A daemon watching this test's namespaces, with an event stream."""
    require_root()
    hub = StreamHub()
    running = start_streaming(Settings(include=f"^{lab.prefix}", reconcile_interval=0), hub)
    try:
        yield Streaming(running, hub)
    finally:
        stop_daemon(running)


@dataclass
class Reader:
    """Reads a stream on a thread, collecting its events."""

    srv: HttpServer
    headers: dict[str, str] = field(default_factory=dict)
    events: list[SseEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        host, port = self.srv.address
        self.conn = http.client.HTTPConnection(host, port, timeout=30)
        self.conn.request("GET", "/api/v1/events", headers=self.headers)
        self.resp = self.conn.getresponse()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for ev in read_events(self.resp, SseParser()):
                self.events.append(ev)
        except (OSError, ValueError, http.client.HTTPException):
            pass

    def close(self) -> None:
        if self.conn.sock is not None:
            self.conn.sock.shutdown(2)
        self.thread.join(5)
        self.conn.close()


def state_event_id(r: Running) -> int:
    host, port = r.server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/api/v1/state")
    event_id = int(json.loads(conn.getresponse().read())["event_id"])
    conn.close()
    return event_id


def quiet_last_id(reader: Reader, r: Running) -> tuple[int, int]:
    """Wait until the stream and the state agree for a while; (last id streamed, state event_id)."""
    seen: list[tuple[int, int]] = []

    def settled() -> bool:
        last = int(reader.events[-1].id or 0) if reader.events else 0
        seen.append((last, state_event_id(r)))
        return len(seen) >= 5 and len(set(seen[-5:])) == 1

    wait_for(settled, timeout=10, interval=0.1)
    return seen[-1]


def test_stream_ids_line_up_with_state_event_id(lab: Lab, streaming: Streaming) -> None:
    """Once quiet, the last id the stream delivered equals the state's event_id, ids never skip."""
    r = streaming.running
    start = state_event_id(r)
    reader = Reader(r.server, {"Last-Event-ID": str(start)})
    ns = lab.netns("s")
    a, b = lab.name("a"), lab.name("b")
    lab.veth(a, b, b_ns=ns)
    ip("link", "set", a, "up")
    ip("-n", ns, "link", "set", b, "up")
    ip("-n", ns, "addr", "add", "198.18.140.2/24", "dev", b)
    wait_for(lambda: any(e.event == "address_added" for e in reader.events), timeout=5)
    last, event_id = quiet_last_id(reader, r)
    reader.close()
    assert last == event_id
    ids = [int(e.id or 0) for e in reader.events]
    assert ids == list(range(start + 1, last + 1))
    names = {e.event for e in reader.events}
    assert {"namespace_added", "link_added", "veth_peer_resolved", "address_added"} <= names
    resolved = [json.loads(e.data) for e in reader.events if e.event == "veth_peer_resolved"]
    ends = {
        frozenset({(d["netns"], d["link"]), (d["peer_netns"], d["peer_link"])}) for d in resolved
    }
    assert frozenset({(ns, b), ("host", a)}) in ends


def test_reconnect_resumes_without_loss_or_duplicates(lab: Lab, streaming: Streaming) -> None:
    """Changes made while a client was away arrive after it reconnects with Last-Event-ID."""
    r = streaming.running
    first = Reader(r.server)
    ns = lab.netns("r")
    wait_for(lambda: any(e.event == "namespace_added" for e in first.events), timeout=5)
    quiet_last_id(first, r)
    first.close()
    resume_at = first.events[-1].id
    assert resume_at is not None
    a, b = lab.name("a"), lab.name("b")
    lab.veth(a, b, b_ns=ns)
    ip("link", "set", a, "down")
    wait_for(lambda: state_event_id(r) > int(resume_at), timeout=5)
    time.sleep(0.3)
    second = Reader(r.server, {"Last-Event-ID": resume_at})
    last, event_id = quiet_last_id(second, r)
    second.close()
    ids = [int(e.id or 0) for e in first.events + second.events]
    assert ids == list(range(ids[0], event_id + 1)) and last == event_id
    assert any(e.event == "link_added" and json.loads(e.data)["link"] == b for e in second.events)


def test_nswatch_run_serves_the_stream_that_nswatch_watch_follows(lab: Lab, tmp_path: Path) -> None:
    """`nswatch run` streams its changes and `nswatch watch --json` prints them, ids matching event_id."""
    port = free_port()
    cfg = tmp_path / "nswatch.yaml"
    cfg.write_text(f"include: '^{lab.prefix}'\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.Popen(
        [*NSWATCH, "run", "--config", str(cfg), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    watch: subprocess.Popen[str] | None = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(url), timeout=15)
        watch = subprocess.Popen(
            [*NSWATCH, "watch", "--url", url, "--json", "--netns", f"{lab.prefix}*"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        time.sleep(1)  # the watcher has read the state and follows the stream
        ns = lab.netns("w")
        assert watch.stdout is not None
        ready, _, _ = select.select([watch.stdout], [], [], 10)
        assert ready, "nswatch watch printed nothing within 10 s"
        first = json.loads(watch.stdout.readline())
        assert (first["event"], first["netns"]) == ("namespace_added", ns)
        with urllib.request.urlopen(url + "/api/v1/state", timeout=10) as r:
            assert json.load(r)["event_id"] >= first["id"]
    finally:
        for proc in (watch, run):
            if proc is not None:
                proc.terminate()
                proc.wait(10)
                if proc.stdout is not None:
                    proc.stdout.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False
