"""systemd integration: the sd_notify protocol and the service watchdog.

A few lines over an AF_UNIX datagram socket, as sd_notify(3) describes, so
nothing links against libsystemd. Every call is a no-op when NOTIFY_SOCKET is
unset (not started by systemd, or ``Type=`` is not ``notify``).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from nswatch.model import Model
from nswatch.observer import BaseObserver

__all__ = [
    "Notifier",
    "SystemdObserver",
    "notify_address",
    "observer_for",
    "status_line",
    "watchdog_interval",
]


def notify_address(env: Mapping[str, str] | None = None) -> str | None:
    """The socket address from NOTIFY_SOCKET (``@name`` -> abstract), or None."""
    value = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    # Unset, empty, or a transport this client does not speak (vsock:...).
    return None


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if off.

    None too when WATCHDOG_PID names another process: the watchdog then belongs
    to a parent that passed its environment down.
    """
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    want_pid = env.get("WATCHDOG_PID")
    if want_pid:
        try:
            if int(want_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    # Half the timeout, as sd_watchdog_enabled(3) recommends: one late turn
    # of the loop must not cost a restart.
    return usec / 2 / 1_000_000


# A full queue on the manager's socket means it is busy: wait this long for
# a state change (READY=1, RELOADING=1, STOPPING=1) to go through; never wait
# for a ping or a status line, which the next turn of the loop repeats.
SEND_TIMEOUT = 2.0


class Notifier:
    """Sends sd_notify messages; safe from any thread."""

    def __init__(self, address: str | None, send_timeout: float = SEND_TIMEOUT) -> None:
        self.address = address
        self.send_timeout = send_timeout

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for NOTIFY_SOCKET (a no-op one when it is unset)."""
        return cls(notify_address(env))

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self.address is not None

    def send(self, *fields: str, wait: bool = True) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; True if it was delivered.

        With ``wait`` false, a full queue drops the message instead of waiting.
        """
        if self.address is None or not fields:
            return False
        data = "\n".join(f.replace("\n", " ") for f in fields).encode()
        # A fresh socket per message: messages are rare (seconds apart) and
        # no state can go stale across a manager re-exec.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(self.send_timeout if wait else 0.0)
                s.sendto(data, self.address)
        except OSError:
            # The manager went away or the socket is full: never let
            # bookkeeping for systemd take the daemon down.
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (start-up or a reload finished), with an optional STATUS=."""
        return self.send("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        """STATUS= (shown by ``systemctl status``); dropped if the manager is behind."""
        return self.send(f"STATUS={text}", wait=False)

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC=, which systemd >= 253 requires."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1."""
        return self.send("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        """WATCHDOG=1 (keep-alive); dropped if the manager is behind."""
        return self.send("WATCHDOG=1", wait=False)


def _status(text: str | None) -> tuple[str, ...]:
    return () if text is None else (f"STATUS={text}",)


def status_line(model: Model) -> str:
    """A one-line summary such as ``watching 12 namespaces, 40 links, 5 veth pairs``."""
    namespaces = len(model.namespaces)
    links = sum(len(ns.links) for ns in model.namespaces.values())
    pairs = len(model.peers) // 2
    return (
        f"watching {_plural(namespaces, 'namespace')}, {_plural(links, 'link')}, "
        f"{_plural(pairs, 'veth pair')}"
    )


def _syncing_line(model: Model) -> str:
    done = sum(1 for ns in model.namespaces.values() if ns.synced)
    return f"syncing: {done} of {_plural(len(model.namespaces), 'namespace')} read"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class SystemdObserver(BaseObserver):
    """Tells systemd about start-up, reloads, shutdown, and keeps its watchdog fed.

    Watchdog pings come only from :meth:`tick`, which the daemon calls after
    each turn of its event loop: a wedged loop stops the pings and systemd
    restarts the service.
    """

    def __init__(
        self,
        notifier: Notifier,
        watchdog: float | None,
        clock: Callable[[], float] = time.monotonic,
        status_every: float = 1.0,
    ) -> None:
        self.notifier = notifier
        self.watchdog = watchdog
        self.clock = clock
        self.status_every = status_every
        self._lock = threading.Lock()
        self._ready = False
        self._reloading = False
        self._stopping = False
        self._last_ping = -float("inf")
        self._last_status_at = -float("inf")
        self._last_status = ""

    def ready(self, model: Model) -> None:
        line = status_line(model)
        with self._lock:
            self._ready = True
            self._last_status, self._last_status_at = line, self.clock()
            self.notifier.ready(line)

    def tick(self, model: Model) -> None:
        now = self.clock()
        if self.watchdog is not None and now - self._last_ping >= self.watchdog:
            self._last_ping = now
            self.notifier.watchdog()
        if now - self._last_status_at < self.status_every:
            return
        line = status_line(model) if self._ready else _syncing_line(model)
        with self._lock:
            self._last_status_at = now
            # During a reload or shutdown the status says so until it is over.
            if (
                line != self._last_status
                and not (self._reloading or self._stopping)
                and self.notifier.status(line)
            ):
                self._last_status = line

    def stopping(self) -> None:
        with self._lock:
            self._stopping = True
            self.notifier.stopping("stopping")

    def reloading(self) -> None:
        """The configuration is being re-read (SIGHUP)."""
        with self._lock:
            # Before the first READY=1 systemd still waits for start-up; a
            # reload then is no state change of its own.
            if self._ready:
                self._reloading = True
                self.notifier.reloading("reloading configuration")

    def reloaded(self) -> None:
        """The reload is over, whether the new configuration was taken or not."""
        with self._lock:
            if self._reloading:
                self._reloading = False
                self.notifier.ready(self._last_status or None)


def observer_for(daemon: object, env: Mapping[str, str] | None = None) -> SystemdObserver:
    """The observer ``nswatch run`` adds to its daemon (inert outside systemd)."""
    del daemon  # everything needed arrives through the callbacks
    return SystemdObserver(Notifier.from_env(env), watchdog_interval(env))
