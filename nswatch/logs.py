"""Structured logs: structlog set-up and the sink that logs model changes."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import structlog

from nswatch.model import (
    Address,
    AddressAdded,
    AddressChanged,
    AddressRemoved,
    Change,
    Link,
    LinkAdded,
    LinkChanged,
    LinkRemoved,
    Model,
    NamespaceAdded,
    NamespaceRemoved,
    NamespaceRenamed,
    Route,
    RouteAdded,
    RouteChanged,
    RouteRemoved,
    Rule,
    RuleAdded,
    RuleRemoved,
    VethLost,
    VethResolved,
)
from nswatch.observer import BaseObserver, internal_place
from nswatch.state import table_name


class Lines:
    """Where log lines go: each written whole, or a batch of them in one write.

    Every write to the log (stderr: the journal's socket or a pipe) is a
    system call, and CPython lets go of the GIL for each. Under readers the
    render threads always want it, so each write cost the event loop a wait
    for the GIL to come back. A link set down makes five or six lines (the
    link, its address, its routes, its peer), all logged from one batch of
    changes: :meth:`batch` writes them with one call. Other threads' lines
    are written at once; every write holds the lock, so lines never mix.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lock = threading.Lock()
        self._local = threading.local()

    def line(self, message: str) -> None:
        held: list[str] | None = getattr(self._local, "held", None)
        if held is not None:
            held.append(message)
        else:
            self._write(message + "\n")

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """The calling thread's lines meanwhile, written together at the end."""
        if getattr(self._local, "held", None) is not None:
            yield  # within a batch already: the outer one writes
            return
        held: list[str] = []
        self._local.held = held
        try:
            yield
        finally:
            self._local.held = None
            if held:
                held.append("")
                self._write("\n".join(held))

    def _write(self, text: str) -> None:
        with self._lock:
            self.stream.write(text)
            self.stream.flush()


class LinesLogger:
    """structlog's logger over :class:`Lines` (what ``PrintLogger`` is over a file)."""

    def __init__(self, lines: Lines) -> None:
        self._lines = lines

    def msg(self, message: str) -> None:
        self._lines.line(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


_lines: Lines | None = None


@contextlib.contextmanager
def batch() -> Iterator[None]:
    """Lines this thread logs meanwhile go out in one write (see :class:`Lines`)."""
    lines = _lines
    if lines is None:
        yield
        return
    with lines.batch():
        yield


def configure(fmt: str | None = None, level: str = "info", stream: TextIO | None = None) -> None:
    """Set structlog up: JSON lines (default off a TTY) or console, ISO timestamps."""
    global _lines
    stream = stream or sys.stderr
    # A reload configures again: a batch under way finishes on the old one.
    lines = _lines = Lines(stream)
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=lambda *args: LinesLogger(lines),
        cache_logger_on_first_use=False,
    )


def describe_link(link: Link) -> dict[str, Any]:
    """Log fields for a link."""
    return {
        "link": link.name,
        "ifindex": link.index,
        "kind": link.kind,
        "admin_up": link.admin_up,
        "oper_state": link.oper_state,
    }


def describe_address(addr: Address) -> dict[str, Any]:
    """Log fields for an address (the link is given by ifindex)."""
    out: dict[str, Any] = {"address": f"{addr.address}/{addr.prefixlen}", "ifindex": addr.link}
    if addr.flags:
        out["flags"] = list(addr.flags)
    return out


def describe_route(route: Route) -> dict[str, Any]:
    """Log fields for a route."""
    out: dict[str, Any] = {"route": route.dst, "table": table_name(route.table)}
    if route.gateway:
        out["gateway"] = route.gateway
    if route.dev is not None:
        out["ifindex"] = route.dev
    if route.priority is not None:
        out["metric"] = route.priority
    if route.flags:
        out["flags"] = list(route.flags)
    return out


def describe_rule(rule: Rule) -> dict[str, Any]:
    """Log fields for a policy routing rule (what `ip rule` prints, as fields)."""
    out: dict[str, Any] = {"family": rule.family, "priority": rule.priority, "action": rule.action}
    if rule.action == "lookup":
        out["table"] = table_name(rule.table)
    for key in ("src", "dst", "iif", "oif", "fwmark"):
        value = getattr(rule, key)
        if value is not None:
            out[key] = value
    return out


def describe(obj: object) -> dict[str, Any]:
    """Log fields for any model record."""
    if isinstance(obj, Link):
        return describe_link(obj)
    if isinstance(obj, Address):
        return describe_address(obj)
    if isinstance(obj, Route):
        return describe_route(obj)
    return {}


def change_event(ch: Change) -> str:
    """The event name of a change, as logs and the event stream call it."""
    return f"{ch.kind}_{ch.action}"


def describe_change(ch: Change) -> dict[str, Any]:
    """The fields of a change, shared by the logs and the event stream."""
    fields: dict[str, Any] = {"netns": ch.netns}
    match ch:
        case NamespaceAdded():
            fields.update(inode=ch.inode, names=ch.names)
        case NamespaceRemoved():
            # "unwatched": the namespace still exists, nswatch only let go of it.
            fields.update(inode=ch.inode, reason=ch.reason)
        case NamespaceRenamed():
            fields.update(old=ch.old, new=ch.names)
            if ch.old_netns is not None:
                fields["old_netns"] = ch.old_netns
        case VethResolved(pair=pair) | VethLost(pair=pair):
            if isinstance(ch, VethLost) and ch.reason:
                fields["reason"] = ch.reason
            fields.update(link=pair.a_link, peer_netns=pair.b_netns, peer_link=pair.b_link)
        case LinkAdded(link=obj) | AddressAdded(address=obj) | RouteAdded(route=obj):
            fields.update(describe(obj))
        case LinkChanged(link=obj) | AddressChanged(address=obj) | RouteChanged(route=obj):
            fields.update(describe(obj), old=describe(ch.old))
        case LinkRemoved(link=obj, reason=why):
            fields.update(describe(obj), reason=why)
        case RouteRemoved(route=obj) | AddressRemoved(address=obj):
            fields.update(describe(obj))
        case RuleAdded(rule=rule) | RuleRemoved(rule=rule):
            fields.update(describe_rule(rule))
    return fields


class LogObserver(BaseObserver):
    """Logs every model change and every handled error, one event a line."""

    def __init__(self, logger: Any = None) -> None:
        self.log = logger or structlog.get_logger("nswatch")
        self._ready = False
        self._tracebacks: set[str] = set()

    def changes(self, changes: Sequence[Change], reason: str | None) -> None:
        # The first sync of a namespace would print every object it holds;
        # one summary line per namespace is what an operator wants there.
        if reason == "initial":
            return
        with batch():
            for ch in changes:
                self._log_change(ch, reason)

    def _log_change(self, ch: Change, reason: str | None) -> None:
        fields = describe_change(ch)
        if reason is not None:
            fields["source"] = reason
        # A link or route gone may cut traffic: worth a warning.
        if isinstance(ch, LinkRemoved | RouteRemoved):
            self.log.warning(change_event(ch), **fields)
        else:
            self.log.info(change_event(ch), **fields)

    def overrun(self, netns: str) -> None:
        self.log.warning("netlink_overrun", netns=netns)

    def resync(self, netns: str, reason: str) -> None:
        self.log.info("resync", netns=netns, reason=reason)

    def error(self, netns: str | None, where: str, err: BaseException) -> None:
        if internal_place(where, err) is None:
            self.log.warning("error", netns=netns, where=where, error=str(err))
        elif where in self._tracebacks:
            self.log.error("internal_error", netns=netns, where=where, error=repr(err))
        else:
            # A bug the loop survived: its traceback once per place, then a line.
            self._tracebacks.add(where)
            self.log.error(
                "internal_error", netns=netns, where=where, error=repr(err), exc_info=err
            )

    def ready(self, model: Model) -> None:
        self.log.info(
            "synced",
            namespaces=len(model.namespaces),
            links=sum(len(ns.links) for ns in model.namespaces.values()),
        )

    def stopping(self) -> None:
        self.log.info("stopping")
