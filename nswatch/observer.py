"""What the daemon tells its sinks (logs, metrics, systemd, apply).

Sinks implement :class:`Observer`; :class:`BaseObserver` gives no-op defaults
so each sink overrides only what it cares about. Only the daemon calls these,
always from its event-loop thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from nswatch.model import Change, Model


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
