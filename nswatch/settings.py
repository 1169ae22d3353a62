"""The daemon's settings (placeholder until the one declaration of every setting lands)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Settings:
    """What the daemon needs to know; built from the config file and flags."""

    netns_dirs: tuple[str, ...] = ("/run/netns",)
    include: str | None = None
    exclude: str | None = None
    host_label: str = "host"
    netlink_rcvbuf: int = 4 * 1024 * 1024
    reconcile_interval: float = 300.0
    rescan_interval: float = 30.0
    # Link counters come with link messages, which the kernel sends only on
    # state changes; a link dump this often keeps them fresh (0: never).
    stats_interval: float = 15.0
