"""The event stream: every model change, numbered, for ``/api/v1/events``.

The hub is an observer. Its ``changes`` callback runs on the daemon's
event-loop thread and only numbers the changes into a bounded ring and
schedules one wake-up on the HTTP thread (``call_soon_threadsafe``), so no
stream client can slow the daemon. Change *n* the model ever made gets id
*n*, the same count as :attr:`Model.changes_made`, so the state JSON's
``event_id`` tells a client where to resume (list, then watch).

On the HTTP thread each client is a :class:`Subscription`: a cursor into
the ring and a filter. A client first catches up from the ring (batches,
waiting for its socket between them), then is live: each wake-up writes
the new changes to every live client in one pass, each event rendered once
as a Server-Sent Events frame. A client that falls out of the ring, or
whose unread output passes its budget, gets a final ``resync`` event and is
dropped (and counted): it reads ``/api/v1/state`` and resumes from there.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import orjson

from nswatch.logs import change_event, describe_change
from nswatch.model import Change, VethLost, VethResolved
from nswatch.observer import BaseObserver

DEFAULT_HISTORY = 10_000
DEFAULT_CLIENT_BUFFER = 1024 * 1024
DEFAULT_HEARTBEAT = 15.0
# Events one client is handed at a time; between batches it waits for its
# socket to drain, so a resume of thousands of events never floods memory.
BATCH = 256
RETRY_MS = 2000
STATE_PATH = "/api/v1/state"

#: ``?kind=`` values and the change kinds they select.
KINDS = {
    "namespace": "namespace",
    "link": "link",
    "address": "address",
    "route": "route",
    "rule": "rule",
    "veth": "veth_peer",
}


@dataclass(frozen=True, slots=True)
class StreamStats:
    """What the hub counts, for the metrics."""

    clients: int
    dropped_total: int
    resyncs_total: int
    last_id: int
    history: int


class StreamEvent:
    """One numbered change; its SSE frame is rendered once, on the HTTP thread."""

    __slots__ = ("_frame", "change", "id", "reason")

    def __init__(self, id: int, change: Change, reason: str | None) -> None:
        self.id = id
        self.change = change
        self.reason = reason
        self._frame: bytes | None = None

    def data(self) -> dict[str, Any]:
        """The event as JSON-ready data: id, event name and the log fields."""
        out: dict[str, Any] = {"id": self.id, "event": change_event(self.change)}
        out.update(describe_change(self.change))
        if self.reason is not None:
            out["source"] = self.reason
        return out

    def frame(self) -> bytes:
        """The Server-Sent Events frame."""
        if self._frame is None:
            # orjson: a burst of thousands of changes renders in milliseconds, not tenths.
            head = f"id: {self.id}\nevent: {change_event(self.change)}\ndata: ".encode()
            self._frame = head + orjson.dumps(self.data()) + b"\n\n"
        return self._frame


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events a client wants: namespace globs and change kinds (empty: all)."""

    netns: tuple[str, ...] = ()
    kinds: frozenset[str] = frozenset()

    def matches(self, ev: StreamEvent) -> bool:
        """Whether ``ev`` passes; a veth pair passes when either end's namespace does."""
        ch = ev.change
        if self.kinds and ch.kind not in self.kinds:
            return False
        if not self.netns:
            return True
        names = [ch.netns]
        if isinstance(ch, VethResolved | VethLost):
            names.append(ch.pair.b_netns)
        return any(fnmatch.fnmatchcase(n, g) for n in names for g in self.netns)


def parse_request(query: str, last_event_id: str | None) -> tuple[Filter, int | None]:
    """The filter and the id to resume after, from the query and ``Last-Event-ID``.

    Raises ValueError (a 400) for an unknown kind or an id that is not a number.
    """
    params = parse_qs(query, keep_blank_values=False)
    kinds = set()
    for value in params.get("kind", []):
        for k in value.split(","):
            if k not in KINDS:
                raise ValueError(f"unknown kind {k!r}; one of {', '.join(KINDS)}")
            kinds.add(KINDS[k])
    since = last_event_id.strip() if last_event_id else None
    if since is None and params.get("since"):
        since = params["since"][-1]
    after: int | None = None
    if since:
        if not since.isdigit():
            raise ValueError(f"bad event id {since!r}")
        after = int(since)
    return Filter(tuple(params.get("netns", [])), frozenset(kinds)), after


class StreamHub(BaseObserver):
    """Numbers the model's changes and feeds them to stream clients."""

    def __init__(
        self,
        history: int = DEFAULT_HISTORY,
        client_buffer: int = DEFAULT_CLIENT_BUFFER,
        heartbeat: float = DEFAULT_HEARTBEAT,
        first_id: int = 0,
    ) -> None:
        if history < 1:
            raise ValueError("history must hold at least one event")
        self.capacity = history
        self.client_buffer = client_buffer
        self.heartbeat = heartbeat
        self._ring: list[StreamEvent | None] = [None] * history
        # The id of the last change numbered; pass the model's changes_made
        # when the hub joins a daemon that already made changes.
        self._last = first_id
        self._first = first_id  # ids <= this were never in the ring
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kick_pending = False
        self._clients: set[Subscription] = set()
        self.dropped_total = 0
        self.resyncs_total = 0

    # -- the daemon's event-loop thread --

    def changes(self, changes: Sequence[Change], reason: str | None) -> None:
        with self._lock:
            for ch in changes:
                self._last += 1
                self._ring[self._last % self.capacity] = StreamEvent(self._last, ch, reason)
        loop = self._loop
        if loop is not None and not self._kick_pending:
            self._kick_pending = True
            try:
                loop.call_soon_threadsafe(self._notify)
            except RuntimeError:  # the HTTP loop has ended
                self._kick_pending = False

    # -- any thread --

    @property
    def last_id(self) -> int:
        """The id of the newest change."""
        return self._last

    def stats(self) -> StreamStats:
        """Clients now, clients dropped, resyncs sent, newest id, events held."""
        with self._lock:
            held = min(self._last - self._first, self.capacity)
            last = self._last
        return StreamStats(len(self._clients), self.dropped_total, self.resyncs_total, last, held)

    def after(self, cursor: int, limit: int | None = BATCH) -> list[StreamEvent] | None:
        """Up to ``limit`` events after id ``cursor``; None when they are no longer held
        (or ``cursor`` is from the future: another daemon's ids)."""
        with self._lock:
            last = self._last
            oldest = max(self._first, last - self.capacity) + 1
            if cursor > last or cursor + 1 < oldest:
                return None
            end = last if limit is None else min(last, cursor + limit)
            out = [self._ring[i % self.capacity] for i in range(cursor + 1, end + 1)]
        return [ev for ev in out if ev is not None]

    # -- the HTTP thread --

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver to clients on ``loop`` (the HTTP server's, once it runs)."""
        self._loop = loop

    def detach(self) -> None:
        """The HTTP loop is ending: stop waking it."""
        self._loop = None

    def _notify(self) -> None:
        """New changes: write them to every live client, all in this one callback.

        One pass over the clients instead of waking a task per client keeps
        the fan-out to a write per client; each distinct (filter, start)
        renders its bytes once.
        """
        self._kick_pending = False
        live = [c for c in self._clients if c.live and not c.ended]
        if not live:
            return
        low = min(c.cursor for c in live)
        events = self.after(low, limit=None)
        cache: dict[tuple[Filter, int], bytes] = {}
        for c in live:
            if events is not None:
                c.deliver(events[c.cursor - low :], cache)
                continue
            # More changes since the last pass than the history holds (a
            # burst while this thread was starved): whoever missed some resyncs.
            own = self.after(c.cursor, limit=None)
            if own is None:
                c.drop("fell_behind")
            else:
                c.deliver(own, cache)

    def subscribe(self, query: str, last_event_id: str | None) -> Subscription:
        """A new client (ValueError for a bad query)."""
        flt, after = parse_request(query, last_event_id)
        sub = Subscription(
            self, flt, self._last if after is None else after, asked=after is not None
        )
        self._clients.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """The client is gone."""
        self._clients.discard(sub)

    def resync_frame(self, reason: str) -> bytes:
        """The event that tells a client to read the state again (counted)."""
        self.resyncs_total += 1
        body = json.dumps({"reason": reason, "state": STATE_PATH, "last_event_id": self._last})
        return f"event: resync\ndata: {body}\n\n".encode()


Send = Callable[[bytes], bool]
"""Writes bytes to the client; False when its buffer is over the budget."""


class Subscription:
    """One stream client: its filter, how far it got, and how to write to it."""

    def __init__(self, hub: StreamHub, flt: Filter, cursor: int, asked: bool = False) -> None:
        self.hub = hub
        self.filter = flt
        self.cursor = cursor  # the last id considered (sent, or filtered out)
        # Whether the client named where to resume (Last-Event-ID, or ?since=)
        # rather than starting from the newest change.
        self.asked = asked
        self.sent = cursor  # the last id the client was told
        self.live = False  # caught up: the hub writes new changes as they come
        self.ended = False
        self._send: Send | None = None
        self._done: asyncio.Future[None] | None = None

    async def run(
        self, send: Send, drain: Callable[[], Awaitable[None]], gone: asyncio.Future[Any]
    ) -> None:
        """Serve the client until it goes or must resync (then ``ended``).

        First the changes it missed, a batch at a time with ``drain`` between
        (TimeoutError from it: the client is stuck); then live, written by
        the hub, with a keepalive comment every heartbeat.
        """
        hub = self.hub
        self._send = send
        self._done = asyncio.get_running_loop().create_future()
        # The id line makes a reconnect resume from here even before any event.
        send(f"retry: {RETRY_MS}\nid: {self.cursor}\n\n".encode())
        started = False
        while not self.live:
            batch = hub.after(self.cursor)
            if batch is None:
                # A client that named no id started at the newest change: if
                # the history no longer reaches it, a burst outran the client
                # before its first write (the HTTP thread was slow to start
                # it), which is falling behind, not asking for too much.
                if started or not self.asked:
                    self.drop("fell_behind")
                else:  # asked at connect for more than the history holds
                    self.ended = True
                    why = "unknown_id" if self.cursor > hub.last_id else "history_exceeded"
                    send(hub.resync_frame(why))
                return
            started = True
            if not batch:
                self.live = True  # no await since the check: nothing slips between
                break
            self.deliver(batch, {})
            if self.ended:
                return
            try:
                await drain()
            except TimeoutError:
                self.drop("slow_consumer")
                return
        while not self.ended and not gone.done():
            await asyncio.wait([self._done, gone], timeout=hub.heartbeat)
            if not self.ended and not gone.done():
                idline = f"id: {self.cursor}\n" if self.cursor != self.sent else ""
                self.sent = self.cursor
                send(f": keepalive\n{idline}\n".encode())

    def deliver(self, events: list[StreamEvent], cache: dict[tuple[Filter, int], bytes]) -> None:
        """Write ``events`` (those after the cursor) that pass the filter."""
        if not events or self.ended or self._send is None:
            return
        key = (self.filter, events[0].id)
        data = cache.get(key)
        if data is None:
            data = cache[key] = b"".join(ev.frame() for ev in events if self.filter.matches(ev))
        self.cursor = events[-1].id
        if data:
            self.sent = self.cursor
            if not self._send(data):
                self.drop("slow_consumer")

    def drop(self, reason: str) -> None:
        """End this client, which fell behind, with a resync event (counted)."""
        if self.ended:
            return
        self.ended = True
        self.hub.dropped_total += 1
        if self._send is not None:
            self._send(self.hub.resync_frame(reason))
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
