"""The YAML configuration file: loading, validation, profiles.

Everything here is pure except :func:`load_config` (reads one file) and
:func:`check_config_main` (prints).  Validation collects every problem it can
find, each with the file, the line of the offending key and its key path.
Top-level keys starting with ``x-`` are ignored, so they can hold YAML
anchors; ``<<`` merge keys work.  The top-level settings are declared in
:mod:`nswatch.settings`.
"""

from nswatch.config.check import check_config_main
from nswatch.config.load import DEFAULT_CONFIG_PATH, MAX_FILE_BYTES, load_config, parse_config
from nswatch.config.model import (
    AddressSpec,
    BridgeSpec,
    Config,
    IPInterface,
    IPNetwork,
    Profile,
    RouteSpec,
    VethSpec,
)
from nswatch.config.names import host_name_pattern, netns_id, render_host_name
from nswatch.config.overlap import is_own_network, validate_against_host
from nswatch.config.problems import ConfigError, Problem

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MAX_FILE_BYTES",
    "AddressSpec",
    "BridgeSpec",
    "Config",
    "ConfigError",
    "IPInterface",
    "IPNetwork",
    "Problem",
    "Profile",
    "RouteSpec",
    "VethSpec",
    "check_config_main",
    "host_name_pattern",
    "is_own_network",
    "load_config",
    "netns_id",
    "parse_config",
    "render_host_name",
    "validate_against_host",
]
