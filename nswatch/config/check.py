"""``nswatch check-config``: print whether a config file is valid, and what is wrong."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from nswatch.config import load as _load
from nswatch.config.model import IPNetwork
from nswatch.config.overlap import validate_against_host
from nswatch.config.problems import ConfigError

__all__ = ["check_config_main"]


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
            n = len(config.profiles)
            print(f"OK: {file} ({n} profile{'' if n == 1 else 's'})")
            return 0
    for problem in problems:
        print(problem, file=sys.stderr)
    return 2
