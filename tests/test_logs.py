"""Structured logs: one JSON object a line with the documented fields."""

from __future__ import annotations

import io
import json
from datetime import datetime

from nswatch import logs
from nswatch.model import (
    Address,
    AddressNew,
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
