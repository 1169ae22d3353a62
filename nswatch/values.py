"""Converters for plain setting values, shared by the config file and the command line.

Each takes the value as YAML or argparse gave it and returns the typed
value, or raises :class:`Invalid` with a message that completes
"KEY: ...".
"""

from __future__ import annotations

import ipaddress
import math
import os
import re

from nswatch.patterns import PatternError, user_regex

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "Invalid",
    "boolean",
    "integer",
    "listen",
    "log_format",
    "log_level",
    "netns_dirs",
    "opt_path",
    "opt_regex",
    "regex",
    "seconds",
    "string",
    "type_name",
]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "console")


class Invalid(Exception):
    """A value that does not convert; ``message`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def type_name(value: object) -> str:
    """How a value reads in a message ("empty", "a list", "int 5")."""
    if value is None:
        return "empty"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {value!r}"


def string(value: object, what: str = "a string") -> str:
    """A non-empty single-line string."""
    if not isinstance(value, str):
        raise Invalid(f"must be {what}, not {type_name(value)}")
    if not value:
        raise Invalid(f"must be {what}, not empty")
    if "\n" in value or "\0" in value:
        raise Invalid("must be a single line")
    return value


def boolean(value: object) -> bool:
    """true or false."""
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, not {type_name(value)}")
    return value


def integer(value: object, lo: int, hi: int) -> int:
    """An integer in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"must be an integer, not {type_name(value)}")
    if not lo <= value <= hi:
        raise Invalid(f"must be between {lo} and {hi}")
    return value


def seconds(value: object, *, floor: float, off: bool) -> float:
    """A number of seconds of at least ``floor``, or 0 (disabled) when ``off``.

    The floor keeps a typo like ``0.000001`` from spinning a core.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"must be a number of seconds, not {type_name(value)}")
    v = float(value)
    if v == 0 and off:
        return v
    if not math.isfinite(v) or v < floor:
        unit = "second" if floor == 1 else "seconds"
        raise Invalid(f"must be at least {floor:g} {unit}" + (" or 0 (disabled)" if off else ""))
    return v


def regex(value: object) -> str:
    """A pattern RE2 compiles (so that it always matches in linear time)."""
    pattern = string(value, "a regular expression")
    try:
        user_regex(pattern)
    except PatternError as e:
        raise Invalid(f"bad regular expression: {e}") from None
    return pattern


def opt_regex(value: object) -> str | None:
    """A pattern, or nothing."""
    return None if value is None else regex(value)


def opt_path(value: object) -> str | None:
    """A file path, or nothing."""
    return None if value is None else string(value, "a file path")


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _listen_host(host: str, v6_only: bool) -> str:
    if v6_only or ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise Invalid(f"{host!r} is not an IPv6 address") from None
        return host
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise Invalid(f"{host!r} is not an IPv4 address") from None
        return host
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise Invalid(f"{host!r} is not an address or host name")
    return host


def _port(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise Invalid(f"port {text!r} is not a number")
    return integer(int(text), 0, 65535)


def listen(value: object) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"[IPV6]:PORT"`` or a (host, port) tuple."""
    if isinstance(value, tuple) and len(value) == 2:
        host, port = value
        if not isinstance(host, str) or not host:
            raise Invalid("host must be a non-empty string")
        return (_listen_host(host, False), integer(port, 0, 65535))
    usage = 'must be "HOST:PORT" or "[IPV6]:PORT"'
    if not isinstance(value, str):
        raise Invalid(f"{usage}, not {type_name(value)}")
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1 : end + 2] != ":":
            raise Invalid(usage)
        return (_listen_host(value[1:end], True), _port(value[end + 2 :]))
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise Invalid(usage)
    if ":" in host:
        raise Invalid(f'{usage} (put an IPv6 address in brackets: "[::1]:9442")')
    return (_listen_host(host, False), _port(port))


def netns_dirs(value: object) -> tuple[str, ...]:
    """A list of distinct absolute directories, normalised."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise Invalid(f"must be a list of directories, not {type_name(value)}")
    out: list[str] = []
    for item in value:
        path = string(item, "a directory path")
        if not os.path.isabs(path):
            raise Invalid(f"{path!r} is not an absolute path")
        norm = os.path.normpath(path)
        if norm in out:
            raise Invalid(f"{path!r} is listed twice")
        out.append(norm)
    return tuple(out)


def log_level(value: object) -> str:
    """One of LOG_LEVELS, any case."""
    level = string(value, "a log level").lower()
    if level not in LOG_LEVELS:
        raise Invalid(f"must be one of {', '.join(LOG_LEVELS)}")
    return level


def log_format(value: object) -> str | None:
    """json, console, or auto/nothing (None: json when stderr is not a terminal)."""
    if value is None:
        return None
    fmt = string(value, "a log format").lower()
    if fmt == "auto":
        return None
    if fmt not in LOG_FORMATS:
        raise Invalid("must be json, console or auto (json when stderr is not a terminal)")
    return fmt
