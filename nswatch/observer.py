"""What the daemon tells its sinks (logs, metrics, systemd, apply).

Sinks implement :class:`Observer`; :class:`BaseObserver` gives no-op defaults
so each sink overrides only what it cares about. Only the daemon calls these,
always from its event-loop thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

from nswatch.model import Change, Model

# Where an unexpected exception was caught, by the part that caught it: the
# labels of nswatch_internal_errors_total (bounded, and exported at 0).
INTERNAL_ERROR_PLACES = ("inbox", "netlink_session", "observer", "rescan", "timer")


def internal_place(where: str, err: BaseException) -> str | None:
    """The place of an unexpected error (a bug), or None for the kernel's or a file's.

    Kernel and file-system errors are OSErrors and are part of normal
    operation (a namespace vanishing mid-call); anything else is a bug that
    the loop survived.
    """
    if isinstance(err, OSError):
        return None
    place = where.split(":", 1)[0]
    return place if place in INTERNAL_ERROR_PLACES else "other"


class Observer(Protocol):
    """The daemon's callbacks; all run on the event-loop thread."""

    def changes(self, changes: Sequence[Change], reason: str | None) -> None:
        """The model changed. ``reason`` is the dump's reason for changes a dump found."""

    def netlink_events(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Notifications read, counted by (type, action)."""

    def overrun(self, netns: str) -> None:
        """The kernel dropped notifications for ``netns`` (ENOBUFS)."""

    def resync(self, netns: str, reason: str) -> None:
        """A fresh dump of ``netns`` was started for ``reason``."""

    def error(self, netns: str | None, where: str, err: BaseException) -> None:
        """An error from the kernel or the file system, handled."""

    def processed(self, seconds: float, wall_time: float) -> None:
        """One batch went from socket read to model update in ``seconds``."""

    def ready(self, model: Model) -> None:
        """Every namespace had its first full sync (called once)."""

    def tick(self, model: Model) -> None:
        """The event loop made a full turn (at least once a second)."""

    def stopping(self) -> None:
        """The daemon is shutting down."""


class BaseObserver:
    """No-op implementations of every :class:`Observer` callback."""

    def changes(self, changes: Sequence[Change], reason: str | None) -> None:
        return None

    def netlink_events(self, counts: Mapping[tuple[str, str], int]) -> None:
        return None

    def overrun(self, netns: str) -> None:
        return None

    def resync(self, netns: str, reason: str) -> None:
        return None

    def error(self, netns: str | None, where: str, err: BaseException) -> None:
        return None

    def processed(self, seconds: float, wall_time: float) -> None:
        return None

    def ready(self, model: Model) -> None:
        return None

    def tick(self, model: Model) -> None:
        return None

    def stopping(self) -> None:
        return None


class Fanout:
    """Passes each callback to every observer in turn; one that raises does not stop the rest.

    A sink's bug is reported to the others through :meth:`Observer.error`
    (where ``observer:<class>.<callback>``), so it is logged and counted,
    and the event loop carries on.
    """

    def __init__(self, observers: Sequence[Observer] = ()) -> None:
        self._observers: list[Observer] = list(observers) or [BaseObserver()]

    def append(self, observer: Observer) -> None:
        """Add a sink (before the loop starts)."""
        self._observers.append(observer)

    def __iter__(self) -> Iterator[Observer]:
        return iter(list(self._observers))

    def _each(self, name: str, call: Callable[[Observer], object]) -> None:
        for o in self._observers:
            try:
                call(o)
            except Exception as e:
                self._failed(o, name, e)

    def _failed(self, failed: Observer, name: str, err: BaseException) -> None:
        where = f"observer:{type(failed).__name__}.{name}"
        for o in self._observers:
            if o is failed:
                continue
            # An error sink that fails too has nobody left to tell.
            with contextlib.suppress(Exception):
                o.error(None, where, err)

    def changes(self, changes: Sequence[Change], reason: str | None) -> None:
        self._each("changes", lambda o: o.changes(changes, reason))

    def netlink_events(self, counts: Mapping[tuple[str, str], int]) -> None:
        self._each("netlink_events", lambda o: o.netlink_events(counts))

    def overrun(self, netns: str) -> None:
        self._each("overrun", lambda o: o.overrun(netns))

    def resync(self, netns: str, reason: str) -> None:
        self._each("resync", lambda o: o.resync(netns, reason))

    def error(self, netns: str | None, where: str, err: BaseException) -> None:
        for o in self._observers:
            with contextlib.suppress(Exception):
                o.error(netns, where, err)

    def processed(self, seconds: float, wall_time: float) -> None:
        self._each("processed", lambda o: o.processed(seconds, wall_time))

    def ready(self, model: Model) -> None:
        self._each("ready", lambda o: o.ready(model))

    def tick(self, model: Model) -> None:
        self._each("tick", lambda o: o.tick(model))

    def stopping(self) -> None:
        self._each("stopping", lambda o: o.stopping())
