"""``nswatch watch``: follow a daemon's event stream, like ``ip monitor`` for every namespace.

List, then watch: the client reads ``/api/v1/state`` once (names of links
by ifindex, veth peers), then the stream from the state's ``event_id``,
and keeps both up to date from the events. After a dropped connection it
resumes with ``Last-Event-ID``; told to ``resync``, it reads the state again.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlencode, urlsplit

DEFAULT_URL = "http://127.0.0.1:9442"


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched Server-Sent Event."""

    id: str | None
    event: str
    data: str


class SseParser:
    """Server-Sent Events, line by line, as the WHATWG spec reads them."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self._id: str | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> SseEvent | None:
        """Take one line (without its end); the event when the line dispatches one."""
        if line == "":
            if self._id is not None:
                self.last_id = self._id
            data, event = self._data, self._event or "message"
            self._data, self._event = [], ""
            if not data:
                return None
            return SseEvent(self.last_id, event, "\n".join(data))
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


def read_events(fp: IO[bytes], parser: SseParser | None = None) -> Iterator[SseEvent]:
    """The events of a stream until it ends."""
    parser = parser or SseParser()
    while True:
        raw = fp.readline()
        if not raw:
            return
        ev = parser.feed(raw.decode("utf-8", "replace").rstrip("\r\n"))
        if ev is not None:
            yield ev


class Names:
    """What a line needs beyond the event: link names by ifindex, veth peers."""

    def __init__(self) -> None:
        self.links: dict[tuple[str, int], str] = {}
        self.peers: dict[tuple[str, str], str] = {}

    def load(self, state: dict[str, Any]) -> None:
        """Start from a state JSON."""
        self.links.clear()
        self.peers.clear()
        for name, ns in state.get("namespaces", {}).items():
            for link in ns.get("links", []):
                self.links[(name, link["index"])] = link["name"]
                peer = link.get("peer")
                if peer:
                    self.peers[(name, link["name"])] = f"{peer['netns']}/{peer['name']}"

    def update(self, ev: dict[str, Any]) -> None:
        """Follow one event."""
        ns, name = ev.get("netns", ""), ev.get("event", "")
        if name in ("link_added", "link_changed"):
            self.links[(ns, ev["ifindex"])] = ev["link"]
        elif name == "link_removed":
            self.links.pop((ns, ev["ifindex"]), None)
            self.peers.pop((ns, ev["link"]), None)
        elif name == "veth_peer_resolved":
            self.peers[(ns, ev["link"])] = f"{ev['peer_netns']}/{ev['peer_link']}"
            self.peers[(ev["peer_netns"], ev["peer_link"])] = f"{ns}/{ev['link']}"
        elif name == "veth_peer_lost":
            self.peers.pop((ns, ev["link"]), None)
            self.peers.pop((ev["peer_netns"], ev["peer_link"]), None)
        elif name == "namespace_removed":
            for key in [k for k in self.links if k[0] == ns]:
                del self.links[key]
            gone = f"{ns}/"
            for end in [k for k, v in self.peers.items() if k[0] == ns or v.startswith(gone)]:
                del self.peers[end]

    def link(self, ns: str, index: int | None) -> str:
        """A link's name, or ``if<index>`` when unknown."""
        if index is None:
            return "?"
        return self.links.get((ns, index), f"if{index}")


def _state(up: bool | None, oper: str | None) -> str:
    if up is False:
        return "DOWN"
    return oper or "UNKNOWN"


def format_line(ev: dict[str, Any], names: Names) -> str:
    """One event as a human-readable line, ``ip monitor`` style."""
    ns, name = ev.get("netns", "?"), ev.get("event", "?")
    kind, _, action = name.rpartition("_")
    prefix = f"[{ns}]"
    deleted = "Deleted " if action == "removed" else ""
    if kind == "link":
        peer = names.peers.get((ns, ev["link"]))
        extra = f" (peer {peer})" if peer else ""
        if action == "removed":
            extra += f" ({ev.get('reason')})"
        state = _state(ev.get("admin_up"), ev.get("oper_state"))
        return f"{prefix} {deleted}link {ev['link']} {ev.get('kind')} {state}{extra}"
    if kind == "address":
        dev = names.link(ns, ev.get("ifindex"))
        return f"{prefix} {deleted}addr {ev['address']} dev {dev}"
    if kind == "route":
        via = f" via {ev['gateway']}" if ev.get("gateway") else ""
        dev = f" dev {names.link(ns, ev['ifindex'])}" if "ifindex" in ev else ""
        table = "" if ev.get("table") == "main" else f" table {ev.get('table')}"
        changed = "Changed " if action == "changed" else ""
        return f"{prefix} {deleted}{changed}route {ev['route']}{via}{dev}{table}"
    if kind == "rule":
        sel = " ".join(f"{k} {ev[k]}" for k in ("dst", "iif", "oif", "fwmark") if k in ev)
        what = f"from {ev.get('src', 'all')}" + (f" {sel}" if sel else "")
        target = f"lookup {ev['table']}" if "table" in ev else str(ev.get("action"))
        family = " (inet6)" if ev.get("family") == "inet6" else ""
        return f"{prefix} {deleted}rule {ev.get('priority')}: {what} {target}{family}"
    if kind == "veth_peer":
        other = f"{ev['peer_netns']}/{ev['peer_link']}"
        if action == "resolved":
            return f"{prefix} veth {ev['link']} <-> {other}"
        why = f" ({ev['reason']})" if ev.get("reason") else ""
        return f"{prefix} veth {ev['link']} lost peer {other}{why}"
    if kind == "namespace":
        if action == "renamed":
            return f"{prefix} netns renamed {ev.get('old')} -> {ev.get('new')}"
        return f"{prefix} netns {action}"
    return f"{prefix} {name}"


@dataclass
class Watcher:
    """Follows the stream, reconnecting and resyncing, and prints each event."""

    url: str = DEFAULT_URL
    netns: Sequence[str] = ()
    kinds: Sequence[str] = ()
    as_json: bool = False
    out: Callable[[str], None] = print
    err: Callable[[str], None] = print
    retry: float = 1.0
    timeout: float = 60.0  # no byte (not even a keepalive) for this long: reconnect

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._https = parts.scheme == "https"
        self._base = parts.path.rstrip("/")
        self.names = Names()
        self.last_id: str | None = None

    def _conn(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.timeout)

    def load_state(self) -> None:
        """Read the state: names, peers, and the id to resume after."""
        conn = self._conn()
        try:
            conn.request("GET", f"{self._base}/api/v1/state")
            resp = conn.getresponse()
            if resp.status != 200:
                raise OSError(f"state: HTTP {resp.status}")
            state = json.loads(resp.read())
        finally:
            conn.close()
        self.names.load(state)
        self.last_id = str(state["event_id"])

    def follow_once(self) -> bool:
        """One connection: print events until it ends; False when told to resync."""
        query = [("netns", n) for n in self.netns] + [("kind", k) for k in self.kinds]
        path = f"{self._base}/api/v1/events" + (f"?{urlencode(query)}" if query else "")
        headers = {"Accept": "text/event-stream"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = self.last_id
        conn = self._conn()
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                raise OSError(f"events: HTTP {resp.status} {resp.read()[:200]!r}")
            parser = SseParser()
            for sse in read_events(resp, parser):
                if sse.event == "resync":
                    self.out(self._resync_line(sse.data))
                    return False
                ev = json.loads(sse.data)
                self.names.update(ev)
                self.out(json.dumps(ev) if self.as_json else format_line(ev, self.names))
                self.last_id = sse.id
            if parser.last_id is not None:
                self.last_id = parser.last_id
            return True
        finally:
            conn.close()

    def _resync_line(self, data: str) -> str:
        if self.as_json:
            return json.dumps({"event": "resync", **json.loads(data)})
        return f"# resync: {json.loads(data).get('reason')}; reading the state again"

    def run(self, forever: bool = True) -> None:
        """Follow until interrupted (or, with ``forever`` False, until the first stream ends)."""
        fresh = self.last_id is None  # else resume where it left off
        while True:
            try:
                if fresh:
                    self.load_state()
                    fresh = False
                fresh = not self.follow_once()
                if not forever:
                    return
            except (OSError, http.client.HTTPException, ValueError) as e:
                if not forever:
                    raise
                self.err(f"nswatch watch: {e}; retrying in {self.retry:g}s")
                time.sleep(self.retry)
