"""``nswatch check-config``: print whether a config file is valid, and what is wrong."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from nswatch.config import load as _load
from nswatch.config.model import Config, IPNetwork
from nswatch.config.overlap import validate_against_host
from nswatch.config.problems import ConfigError

__all__ = ["check_config_main", "host_label_warnings"]


def host_label_warnings(config: Config) -> list[str]:
    """Profiles that would match a namespace named like the host label.

    The host label belongs to the host: a namespace file of that name is
    watched as ``<name>@<inode>`` and a profile never applies to the host,
    so such a match is almost certainly a mistake in the pattern.
    """
    label = config.settings.host_label
    return [
        f"profiles[{i}] ({p.name}) matches {label!r}, the host label: the host never gets a"
        f" profile, and a namespace of that name is watched as '{label}@<inode>'"
        for i, p in enumerate(config.profiles)
        if p.matches(label)
    ]


def check_config_main(path: str | None, host_networks: Iterable[IPNetwork] = ()) -> int:
    """0 and "OK: ..." when the file is valid, else 2 and one line per problem on stderr."""
    file = path or _load.DEFAULT_CONFIG_PATH
    try:
        config = _load.load_config(file, required=True)
    except ConfigError as e:
        problems = e.problems
    else:
        problems = validate_against_host(config, host_networks)
        if not problems:
            for warning in host_label_warnings(config):
                print(f"{file}: warning: {warning}", file=sys.stderr)
            n = len(config.profiles)
            print(f"OK: {file} ({n} profile{'' if n == 1 else 's'})")
            return 0
    for problem in problems:
        print(problem, file=sys.stderr)
    return 2
