"""Every top-level setting, declared once: its default, type, checks, help and flag.

The field metadata of :class:`Settings` drive the config file's top-level
keys and their validation, the command-line flags of ``run``, ``snapshot``
and ``apply``, and the settings table of the README (:func:`settings_table`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from nswatch import values

__all__ = [
    "DEFAULTS",
    "Setting",
    "Settings",
    "convert",
    "declared",
    "default_text",
    "settings_table",
]

COMMON = ("run", "snapshot", "apply", "graph")
RUN = ("run",)


@dataclass(frozen=True)
class Setting:
    """How one setting is read, checked, documented and (maybe) given on the command line."""

    help: str
    convert: Callable[[object], Any]
    # How the default reads in the docs when its value alone would not say
    # it (None: rendered from the value).
    doc_default: str | None = None
    flag: str | None = None
    commands: tuple[str, ...] = ()
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    # What argparse turns the flag's text into before ``convert`` checks it.
    flag_type: Callable[[str], Any] = str
    repeat: bool = False


_KEY = "nswatch.setting"


def _setting(default: Any, setting: Setting) -> Any:
    return field(default=default, metadata={_KEY: setting})


@dataclass(frozen=True, slots=True)
class Settings:
    """The top-level settings; the defaults watch and export, and apply nothing."""

    listen: tuple[str, int] = _setting(
        ("127.0.0.1", 9442),
        Setting(
            "HTTP address (`/metrics`, `/api/v1/…`, `/healthz`, `/readyz`)",
            values.listen,
            flag="--listen",
            commands=RUN,
            metavar="HOST:PORT",
        ),
    )
    netns_dirs: tuple[str, ...] = _setting(
        ("/run/netns", "/run/docker/netns"),
        Setting(
            "directories of named namespaces (`ip netns`'s and Docker's), repeatable: a flag"
            " replaces the whole list; a directory that does not exist yet is picked up when"
            " it appears",
            values.netns_dirs,
            flag="--netns-dir",
            commands=COMMON,
            metavar="DIR",
            repeat=True,
        ),
    )
    include: str | None = _setting(
        None,
        Setting(
            "watch only namespaces whose name matches this RE2 regex (anywhere in the"
            " name unless anchored); the host is always watched",
            values.opt_regex,
            doc_default="all",
            flag="--include",
            commands=COMMON,
            metavar="REGEX",
        ),
    )
    exclude: str | None = _setting(
        None,
        Setting(
            "never watch namespaces whose name matches this RE2 regex (wins over include)",
            values.opt_regex,
            flag="--exclude",
            commands=COMMON,
            metavar="REGEX",
        ),
    )
    host_label: str = _setting(
        "host",
        Setting(
            "the name the host's own namespace goes by in the model, metrics and profiles",
            lambda v: values.string(v, "a label"),
        ),
    )
    log_format: str | None = _setting(
        None,
        Setting(
            "`json`, `console` or `auto`",
            values.log_format,
            doc_default="`json` off a TTY, `console` on one",
            flag="--log-format",
            commands=RUN,
            choices=values.LOG_FORMATS,
        ),
    )
    log_level: str = _setting(
        "info",
        Setting(
            "least severe level logged",
            values.log_level,
            flag="--log-level",
            commands=RUN,
            choices=values.LOG_LEVELS,
        ),
    )
    netlink_rcvbuf: int = _setting(
        4 * 1024 * 1024,
        Setting(
            "receive buffer of each namespace's netlink socket, in bytes",
            # Linux takes SO_RCVBUF(FORCE) as a positive C int.
            lambda v: values.integer(v, 1, 2**31 - 1),
            flag="--netlink-rcvbuf",
            commands=RUN,
            metavar="BYTES",
            flag_type=int,
        ),
    )
    reconcile_interval: float = _setting(
        300.0,
        Setting(
            "safety-net full comparison, one namespace at a time; at least 10 s, or 0: off",
            lambda v: values.seconds(v, floor=10.0, off=True),
            flag="--reconcile-interval",
            commands=RUN,
            metavar="SECONDS",
            flag_type=float,
        ),
    )
    rescan_interval: float = _setting(
        30.0,
        Setting(
            "how often the namespace directories are listed again (besides inotify); at least 1 s",
            lambda v: values.seconds(v, floor=1.0, off=False),
        ),
    )
    # Link counters come with link messages, which the kernel sends only on
    # state changes; a link dump this often keeps them fresh.
    stats_interval: float = _setting(
        15.0,
        Setting(
            "how often link counters are refreshed by a link dump; at least 1 s, or 0: never",
            lambda v: values.seconds(v, floor=1.0, off=True),
        ),
    )
    stream_history: int = _setting(
        10_000,
        Setting(
            "changes the event stream (`/api/v1/events`) keeps for clients that reconnect"
            " with Last-Event-ID; one asking for older ones is told to resync",
            lambda v: values.integer(v, 1, 10_000_000),
            commands=RUN,
        ),
    )
    procnet_interval: float = _setting(
        30.0,
        Setting(
            "how often each namespace's socket, TCP and conntrack figures are read from its"
            " /proc/net (spread over the interval, off the event loop); at least 5 s, or 0: never",
            lambda v: values.seconds(v, floor=5.0, off=True),
        ),
    )
    metrics_max_objects_per_namespace: int = _setting(
        10_000,
        Setting(
            "at most this many address and route info series per namespace in a scrape (the"
            " rest are counted in `nswatch_network_{addresses,routes}_not_exported`)",
            lambda v: values.integer(v, 1, 10_000_000),
        ),
    )
    discover_processes: bool = _setting(
        True,
        Setting(
            "also watch namespaces no file holds (containers, `unshare -n`,"
            " `PrivateNetwork=yes`), found in /proc and entered through a process inside",
            values.boolean,
            doc_default="on (`false`: off)",
        ),
    )
    web_config_file: str | None = _setting(
        None,
        Setting(
            "Prometheus exporter-toolkit web config file (TLS, basic auth) for the HTTP server",
            values.opt_path,
            doc_default="none (plain HTTP)",
            flag="--web.config.file",
            commands=RUN,
            metavar="FILE",
        ),
    )


DEFAULTS = Settings()


def declared() -> Iterator[tuple[str, Setting]]:
    """(field name, declaration) of every setting, in declaration order."""
    for f in fields(Settings):
        yield f.name, f.metadata[_KEY]


_BY_NAME = dict(declared())


def _show(value: object) -> str:
    """A default as the docs write it."""
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g} s"
    if isinstance(value, int) and value >= 2**20 and value % 2**20 == 0:
        return f"{value // 2**20} MiB"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return f"`{value[0]}:{value[1]}`"
    if isinstance(value, tuple):
        return ", ".join(f"`{v}`" for v in value)
    return f"`{value}`"


def convert(name: str, value: object) -> Any:
    """The checked value of setting ``name``; raises values.Invalid (KeyError: no such setting)."""
    return _BY_NAME[name].convert(value)


def default_text(name: str) -> str:
    """How the default of setting ``name`` reads in the docs."""
    return _BY_NAME[name].doc_default or _show(getattr(DEFAULTS, name))


def settings_table() -> str:
    """The README's table of settings (Markdown), generated from the declaration."""
    rows = [
        "| config key | flag | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, s in declared():
        flag = f"`{s.flag}`" if s.flag else ""
        rows.append(f"| `{name}` | {flag} | {default_text(name)} | {s.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
