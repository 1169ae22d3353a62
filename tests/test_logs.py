"""Structured logs: one JSON object a line with the documented fields."""

from __future__ import annotations

import io
import json
import threading
from datetime import datetime

import structlog

from nswatch import logs
from nswatch.model import (
    Address,
    AddressNew,
    Event,
    Link,
    LinkDel,
    LinkNew,
    Model,
    NamespaceSeen,
    Route,
    RouteNew,
)


def _lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_changes_are_json_lines_with_fields() -> None:
    """Link, address and route changes log `event`, `netns`, the object, `level` and an ISO timestamp."""
    buf = io.StringIO()
    logs.configure("json", "info", stream=buf)
    obs = logs.LogObserver()
    m = Model()
    obs.changes(m.apply(NamespaceSeen(2, ("lab",))), "event")
    obs.changes(m.apply(LinkNew(2, Link(index=3, name="eth0", kind="veth"))), None)
    obs.changes(m.apply(AddressNew(2, Address(3, "inet", "198.18.0.2", 30))), None)
    obs.changes(
        m.apply(RouteNew(2, Route(254, "inet", "unicast", "default", gateway="198.18.0.1"))), None
    )
    obs.changes(m.apply(LinkDel(2, 3)), None)
    lines = _lines(buf)
    events = [line["event"] for line in lines]
    assert events == [
        "namespace_added",
        "link_added",
        "address_added",
        "route_added",
        "link_removed",
    ]
    for line in lines:
        assert line["netns"] == "lab"
        assert line["level"] in ("info", "warning")
        datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00"))
    assert lines[1]["link"] == "eth0"
    assert lines[2]["address"] == "198.18.0.2/30"
    assert lines[3]["route"] == "default" and lines[3]["gateway"] == "198.18.0.1"
    assert lines[4]["reason"] == "deleted" and lines[4]["level"] == "warning"


def test_initial_sync_is_summarised_not_listed() -> None:
    """The first dump of a namespace does not log every object it holds."""
    buf = io.StringIO()
    logs.configure("json", "info", stream=buf)
    obs = logs.LogObserver()
    m = Model()
    m.apply(NamespaceSeen(2, ("lab",)))
    obs.changes(m.apply(LinkNew(2, Link(index=3, name="eth0", kind="veth"))), "initial")
    assert _lines(buf) == []


def test_level_filters() -> None:
    """--log-level warning hides info events."""
    buf = io.StringIO()
    logs.configure("json", "warning", stream=buf)
    obs = logs.LogObserver()
    obs.resync("lab", "overrun")
    obs.overrun("lab")
    assert [line["event"] for line in _lines(buf)] == ["netlink_overrun"]


def test_a_bug_is_logged_with_its_traceback_once_and_a_kernel_error_is_a_warning() -> None:
    """An unexpected exception logs internal_error with a traceback the first time per place, a line after; an OSError is a plain warning."""
    buf = io.StringIO()
    logs.configure("json", "info", stream=buf)
    obs = logs.LogObserver()
    try:
        raise ValueError("boom")
    except ValueError as e:
        err = e
    obs.error(None, "timer:rescan", err)
    obs.error(None, "timer:rescan", err)
    obs.error("ns1", "open_namespace", FileNotFoundError(2, "gone"))
    first, second, kernel = _lines(buf)
    assert first["event"] == "internal_error" and first["level"] == "error"
    assert "Traceback" in str(first["exception"]) and "boom" in str(first["exception"])
    assert second["event"] == "internal_error" and "exception" not in second
    assert kernel["event"] == "error" and kernel["level"] == "warning" and "exception" not in kernel


class Writes(io.StringIO):
    """A log stream that counts its writes (each one a system call on a real stderr)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def test_a_batch_of_changes_is_written_at_once_and_other_lines_one_by_one() -> None:
    """A link set down logs its link, address and routes from one batch of changes in one
    write (each write lets go of the GIL the event loop needs back); lines outside a batch
    are written one write each, every write whole lines."""
    stream = Writes()
    logs.configure("json", "info", stream=stream)
    obs = logs.LogObserver()
    m = Model()
    m.apply(NamespaceSeen(2, ("lab",)))
    link = Link(index=3, name="eth0", kind="veth")
    events: list[Event] = [
        LinkNew(2, link),
        AddressNew(2, Address(3, "inet", "198.18.0.2", 30)),
        RouteNew(2, Route(254, "inet", "unicast", "198.18.0.0/30", dev=3)),
    ]
    obs.changes([ch for ev in events for ch in m.apply(ev)], None)
    assert len(stream.writes) == 1
    assert [line["event"] for line in _lines(stream)] == [
        "link_added",
        "address_added",
        "route_added",
    ]
    obs.resync("lab", "overrun")
    obs.overrun("lab")
    assert len(stream.writes) == 3
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in stream.writes[1:])
    assert len(_lines(stream)) == 5


def test_lines_of_other_threads_are_not_held_by_a_batch() -> None:
    """A batch holds only its own thread's lines: another thread's line, logged meanwhile,
    is written at once and whole."""
    stream = Writes()
    logs.configure("json", "info", stream=stream)
    log = structlog.get_logger("nswatch")
    with logs.batch():
        log.info("held_one")
        t = threading.Thread(target=lambda: log.info("from_another_thread"))
        t.start()
        t.join()
        assert [line["event"] for line in _lines(stream)] == ["from_another_thread"]
        log.info("held_two")
    assert [line["event"] for line in _lines(stream)] == [
        "from_another_thread",
        "held_one",
        "held_two",
    ]
    assert len(stream.writes) == 2
