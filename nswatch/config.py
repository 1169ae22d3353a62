"""The YAML configuration file: loading, validation, profiles.

Everything here is pure except :func:`load_config` (reads one file) and
:func:`check_config_main` (prints).  Validation collects every problem it can
find, each with the file, the line of the offending key and its key path.
Top-level keys starting with ``x-`` are ignored, so they can hold YAML
anchors; ``<<`` merge keys work.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import ipaddress
import math
import os
import re
import string
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple, TypeAlias, TypeVar

import yaml

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AddressSpec",
    "BridgeSpec",
    "Config",
    "ConfigError",
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

DEFAULT_CONFIG_PATH = "/etc/nswatch/nswatch.yaml"
IFNAME_MAX = 15  # IFNAMSIZ (16) minus the NUL
ID_LEN = 8  # hex digits of {id}
HASH_LEN = 4  # hex digits appended to a shortened {netns}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "console")

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface
_T = TypeVar("_T")


# -- public data ---------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config, located by file, line and key path."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The config is invalid; ``problems`` lists everything found."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class BridgeSpec:
    """A host bridge nswatch ensures exists, with its address."""

    name: str
    address: IPInterface


@dataclass(frozen=True)
class VethSpec:
    """A veth pair between the host and the namespace.

    Exactly one topology: point-to-point (``pool`` + ``prefix``: one subnet
    per namespace, host end the first address, namespace end the second) or
    ``bridge`` (host end enslaved, namespace end addressed from its subnet).
    """

    host_name: str
    netns_name: str
    mtu: int | None = None
    pool: IPNetwork | None = None
    prefix: int | None = None
    bridge: BridgeSpec | None = None
    default_route: bool = False

    @property
    def version(self) -> int:
        """The IP version of the addressing (4 or 6)."""
        if self.pool is not None:
            return self.pool.version
        assert self.bridge is not None
        return self.bridge.address.version


@dataclass(frozen=True)
class RouteSpec:
    """A route inside the namespace.

    ``dst`` is ``"default"`` or a normalised CIDR.  A ``"default"`` takes its
    family from ``via`` (an address, or the profile veth's family for
    ``host_end``) and is IPv4 without ``via``; write ``::/0`` for an IPv6
    default route through a device only.  ``via`` ``"host_end"`` means this
    namespace's gateway: the host end of its veth, or the bridge address.
    """

    dst: str
    via: str | None = None
    dev: str | None = None
    metric: int | None = None
    table: int | None = None


@dataclass(frozen=True)
class AddressSpec:
    """An address put verbatim on a link inside the namespace."""

    address: IPInterface
    dev: str


@dataclass(frozen=True)
class Profile:
    """What a namespace whose name matches ``match`` should look like."""

    name: str
    match: str
    loopback: bool | None = None
    sysctls: tuple[tuple[str, str], ...] = ()
    veth: VethSpec | None = None
    addresses: tuple[AddressSpec, ...] = ()
    routes: tuple[RouteSpec, ...] = ()
    enforce: bool = False

    def matches(self, netns: str) -> bool:
        """Whether this profile applies to ``netns``.

        A glob must match the whole name (``fnmatch.fnmatchcase``); a
        ``regex:`` pattern uses ``re.search``, so anchor it (``^...$``) to
        match the whole name.
        """
        if self.match.startswith("regex:"):
            return re.search(self.match[len("regex:") :], netns) is not None
        return fnmatch.fnmatchcase(netns, self.match)


@dataclass(frozen=True)
class Config:
    """The whole configuration; the defaults watch and export, and apply nothing."""

    listen: tuple[str, int] = ("127.0.0.1", 9442)
    netns_dirs: tuple[str, ...] = ("/run/netns",)
    include: str | None = None
    exclude: str | None = None
    host_label: str = "host"
    log_format: str | None = None
    log_level: str = "info"
    netlink_rcvbuf: int = 4 * 1024 * 1024
    reconcile_interval: float = 300.0
    rescan_interval: float = 30.0
    # Link counters are refreshed by a link dump this often (0: never).
    stats_interval: float = 15.0
    profiles: tuple[Profile, ...] = ()
    source: str | None = None
    # Line of each key path in the source, so later checks (against the
    # host) can point at the line too; not part of equality.
    key_lines: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)

    def profile_for(self, netns: str) -> Profile | None:
        """The first profile matching ``netns``, or None."""
        for profile in self.profiles:
            if profile.matches(netns):
                return profile
        return None

    def with_overrides(self, **kw: object) -> Config:
        """A copy with command-line values on top, validated like the file's.

        Values that are None are skipped (an unset flag).  ``listen`` takes
        ``"HOST:PORT"`` or a ``(host, port)`` tuple.  Raises ConfigError
        (file ``<command line>``) or TypeError for an unknown key.
        """
        names = {f.name for f in fields(self)} - {"key_lines"}
        changes: dict[str, Any] = {}
        problems: list[Problem] = []
        for key, value in kw.items():
            if key not in names:
                raise TypeError(f"with_overrides: unknown config key {key!r}")
            if value is None:
                continue
            try:
                changes[key] = _OVERRIDE_CONVERTERS[key](value)
            except _Invalid as e:
                problems.append(Problem("<command line>", None, key, e.message))
        if problems:
            raise ConfigError(problems)
        return replace(self, **changes)


# -- host-side names -----------------------------------------------------------

# Conservative: what `ip`, udev and friends handle without surprises.
_SAFE_CHARS = re.compile(r"[A-Za-z0-9_.\-]")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


class _Template(NamedTuple):
    parts: tuple[tuple[str, str | None], ...]  # (literal, "netns" | "id" | None)
    budget: int  # bytes left for {netns}


def netns_id(netns: str) -> str:
    """The short stable id of a namespace name: 8 hex digits of its BLAKE2b hash."""
    raw = netns.encode("utf-8", "surrogateescape")
    return hashlib.blake2b(raw, digest_size=ID_LEN // 2).hexdigest()


def _parse_template(template: str) -> _Template:
    if not isinstance(template, str) or not template:
        raise _Invalid("must be a non-empty string")
    parts: list[tuple[str, str | None]] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise _Invalid(f"bad template: {e}") from None
    fixed = 0
    seen: list[str] = []
    for literal, name, spec, conv in parsed:
        bad = sorted({c for c in literal if not _SAFE_CHARS.fullmatch(c)})
        if bad:
            raise _Invalid(f"character {bad[0]!r} is not allowed in an interface name")
        fixed += len(literal.encode())
        if name is None:
            parts.append((literal, None))
            continue
        if name not in ("netns", "id"):
            raise _Invalid(f"unknown variable {{{name}}} (use {{netns}} or {{id}})")
        if spec or conv:
            raise _Invalid(f"{{{name}}} takes no format spec or conversion")
        if name == "netns" and "netns" in seen:
            raise _Invalid("{netns} may appear only once")
        seen.append(name)
        if name == "id":
            fixed += ID_LEN
        parts.append((literal, name))
    if not seen:
        raise _Invalid("must contain {id} or {netns} so each namespace gets its own name")
    if fixed > IFNAME_MAX:
        what = "is {} bytes without {{netns}}" if "netns" in seen else "renders to {} bytes"
        raise _Invalid(f"{what.format(fixed)}; interface names are at most {IFNAME_MAX} bytes")
    budget = IFNAME_MAX - fixed
    if "netns" in seen and budget < HASH_LEN + 1:
        raise _Invalid(
            f"leaves {budget} bytes for {{netns}}; needs at least {HASH_LEN + 1} "
            f"(interface names are at most {IFNAME_MAX} bytes)"
        )
    return _Template(tuple(parts), budget)


def _netns_part(netns: str, budget: int) -> str:
    if _SAFE_NAME.fullmatch(netns) and len(netns) <= budget and netns not in (".", ".."):
        return netns
    clean = "".join(c if _SAFE_CHARS.fullmatch(c) else "_" for c in netns)
    return clean[: budget - HASH_LEN] + netns_id(netns)[:HASH_LEN]


def render_host_name(template: str, netns: str) -> str:
    """The host-side veth name for ``netns``: always a valid name of at most 15 bytes.

    ``{id}`` becomes :func:`netns_id` (8 hex digits).  ``{netns}`` becomes the
    name itself when it fits the bytes the rest of the template leaves (B) and
    uses only ``[A-Za-z0-9_.-]``; otherwise its first B-4 characters (others
    replaced by ``_``) followed by the first 4 hex digits of its id, so the
    result stays stable and distinct names rarely collide.  Templates that
    could not always fit (fixed part over 15 bytes, or B < 5 with
    ``{netns}``) are refused at load time; here they raise ValueError.
    """
    try:
        parsed = _parse_template(template)
    except _Invalid as e:
        raise ValueError(f"host_name template {template!r}: {e.message}") from None
    out: list[str] = []
    for literal, name in parsed.parts:
        out.append(literal)
        if name == "id":
            out.append(netns_id(netns))
        elif name == "netns":
            out.append(_netns_part(netns, parsed.budget))
    return "".join(out)


def host_name_pattern(template: str) -> re.Pattern[str]:
    """A regex matching every name :func:`render_host_name` can produce from ``template``."""
    try:
        parsed = _parse_template(template)
    except _Invalid as e:
        raise ValueError(f"host_name template {template!r}: {e.message}") from None
    rx: list[str] = []
    for literal, name in parsed.parts:
        rx.append(re.escape(literal))
        if name == "id":
            rx.append(f"[0-9a-f]{{{ID_LEN}}}")
        elif name == "netns":
            rx.append(f"[A-Za-z0-9_.\\-]{{1,{parsed.budget}}}")
    return re.compile("".join(rx))


# -- host checks ---------------------------------------------------------------


def _networks(config: Config) -> list[tuple[str, IPNetwork, Profile]]:
    out: list[tuple[str, IPNetwork, Profile]] = []
    for i, profile in enumerate(config.profiles):
        veth = profile.veth
        if veth is None:
            continue
        if veth.pool is not None:
            out.append((f"profiles[{i}].veth.pool", veth.pool, profile))
        if veth.bridge is not None:
            net = veth.bridge.address.network
            out.append((f"profiles[{i}].veth.bridge.address", net, profile))
    return out


def is_own_network(config: Config, ifname: str, network: IPNetwork) -> bool:
    """Whether a host address network on ``ifname`` is one nswatch assigned.

    It is ours when it is a subnet carved from a profile's pool (inside the
    pool, with the profile's prefix) on a link whose name the profile's
    ``host_name`` template can render, or the bridge's subnet on that bridge.
    Callers drop such networks before :func:`validate_against_host`.
    """
    for profile in config.profiles:
        veth = profile.veth
        if veth is None:
            continue
        if veth.bridge is not None:
            if ifname == veth.bridge.name and network == veth.bridge.address.network:
                return True
            continue
        pool = veth.pool
        if (
            pool is not None
            and network.version == pool.version
            and network.prefixlen == veth.prefix
            and network.subnet_of(pool)  # type: ignore[arg-type]  # same version checked
            and host_name_pattern(veth.host_name).fullmatch(ifname)
        ):
            return True
    return False


def validate_against_host(config: Config, host_networks: Iterable[IPNetwork]) -> list[Problem]:
    """Pools and bridge subnets overlapping networks already on the host.

    ``host_networks`` are the networks of the host's addresses, without
    those nswatch assigned itself (see :func:`is_own_network`).
    """
    host = sorted(set(host_networks), key=lambda n: (n.version, n))
    problems: list[Problem] = []
    file = config.source or "<config>"
    bridges: set[str] = set()
    for path, net, profile in _networks(config):
        bridge = profile.veth.bridge if profile.veth is not None else None
        if bridge is not None:
            # A bridge shared by several profiles is one subnet: report it once.
            if bridge.name in bridges:
                continue
            bridges.add(bridge.name)
        for other in host:
            if other.version == net.version and net.overlaps(other):
                problems.append(
                    Problem(
                        file,
                        config.key_lines.get(path),
                        path,
                        f"{net} overlaps {other}, already on the host",
                    )
                )
    return problems


# -- value converters (shared by the file and the command line) ----------------


class _Invalid(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _type_name(value: object) -> str:
    if value is None:
        return "empty"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {value!r}"


def _str(value: object, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be {what}, not {_type_name(value)}")
    if not value:
        raise _Invalid(f"must be {what}, not empty")
    if "\n" in value or "\0" in value:
        raise _Invalid("must be a single line")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, not {_type_name(value)}")
    return value


def _int(value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"must be an integer, not {_type_name(value)}")
    if not lo <= value <= hi:
        raise _Invalid(f"must be between {lo} and {hi}")
    return value


def _seconds(value: object, *, zero_ok: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"must be a number of seconds, not {_type_name(value)}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        raise _Invalid("must be a positive number" + (" or 0 (disabled)" if zero_ok else ""))
    return v


def _regex(value: object) -> str:
    pattern = _str(value, "a regular expression")
    try:
        re.compile(pattern)
    except re.error as e:
        raise _Invalid(f"bad regular expression: {e}") from None
    return pattern


def _opt_regex(value: object) -> str | None:
    return None if value is None else _regex(value)


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _listen_host(host: str, v6_only: bool) -> str:
    if v6_only or ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f"{host!r} is not an IPv6 address") from None
        return host
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _Invalid(f"{host!r} is not an IPv4 address") from None
        return host
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise _Invalid(f"{host!r} is not an address or host name")
    return host


def _port(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise _Invalid(f"port {text!r} is not a number")
    return _int(int(text), 0, 65535)


def _listen(value: object) -> tuple[str, int]:
    if isinstance(value, tuple) and len(value) == 2:
        host, port = value
        if not isinstance(host, str) or not host:
            raise _Invalid("host must be a non-empty string")
        return (_listen_host(host, False), _int(port, 0, 65535))
    usage = 'must be "HOST:PORT" or "[IPV6]:PORT"'
    if not isinstance(value, str):
        raise _Invalid(f"{usage}, not {_type_name(value)}")
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1 : end + 2] != ":":
            raise _Invalid(usage)
        return (_listen_host(value[1:end], True), _port(value[end + 2 :]))
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise _Invalid(usage)
    if ":" in host:
        raise _Invalid(f'{usage} (put an IPv6 address in brackets: "[::1]:9442")')
    return (_listen_host(host, False), _port(port))


def _netns_dirs(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise _Invalid(f"must be a list of directories, not {_type_name(value)}")
    out: list[str] = []
    for item in value:
        path = _str(item, "a directory path")
        if not os.path.isabs(path):
            raise _Invalid(f"{path!r} is not an absolute path")
        norm = os.path.normpath(path)
        if norm in out:
            raise _Invalid(f"{path!r} is listed twice")
        out.append(norm)
    return tuple(out)


def _log_level(value: object) -> str:
    level = _str(value, "a log level").lower()
    if level not in LOG_LEVELS:
        raise _Invalid(f"must be one of {', '.join(LOG_LEVELS)}")
    return level


def _log_format(value: object) -> str | None:
    if value is None:
        return None
    fmt = _str(value, "a log format").lower()
    if fmt == "auto":
        return None
    if fmt not in LOG_FORMATS:
        raise _Invalid("must be json, console or auto (json when stderr is not a terminal)")
    return fmt


def _profiles_override(value: object) -> tuple[Profile, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(p, Profile) for p in value):
        raise _Invalid("must be a sequence of Profile")
    return tuple(value)


def _source(value: object) -> str:
    return _str(value, "a path")


_CONVERTERS: dict[str, Callable[[object], object]] = {
    "listen": _listen,
    "netns_dirs": _netns_dirs,
    "include": _opt_regex,
    "exclude": _opt_regex,
    "host_label": lambda v: _str(v, "a label"),
    "log_format": _log_format,
    "log_level": _log_level,
    # Linux takes SO_RCVBUF(FORCE) as a positive C int.
    "netlink_rcvbuf": lambda v: _int(v, 1, 2**31 - 1),
    "reconcile_interval": lambda v: _seconds(v, zero_ok=True),
    "rescan_interval": lambda v: _seconds(v, zero_ok=False),
    "stats_interval": lambda v: _seconds(v, zero_ok=True),
}
_OVERRIDE_CONVERTERS: dict[str, Callable[[object], object]] = {
    **_CONVERTERS,
    "profiles": _profiles_override,
    "source": _source,
}


def _ifname(value: object) -> str:
    """A name the kernel accepts (dev_valid_name)."""
    name = _str(value, "an interface name")
    if len(name.encode("utf-8", "surrogateescape")) > IFNAME_MAX:
        raise _Invalid(f"{name!r} is longer than {IFNAME_MAX} bytes")
    if name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        raise _Invalid(f"{name!r} is not a valid interface name")
    return name


def _template(value: object) -> str:
    template = _str(value, "a name template")
    _parse_template(template)
    return template


def _network(value: object) -> IPNetwork:
    text = _str(value, "a CIDR like 198.18.0.0/16")
    if "/" not in text:
        raise _Invalid(f"{text!r} needs a prefix length, like 198.18.0.0/16")
    try:
        return ipaddress.ip_network(text)
    except ValueError as e:
        raise _Invalid(f"{text!r} is not a valid network: {e}") from None


def _interface(value: object) -> IPInterface:
    text = _str(value, "an address with prefix, like 198.18.128.1/24")
    if "/" not in text:
        raise _Invalid(f"{text!r} needs a prefix length, like 198.18.128.1/24")
    try:
        return ipaddress.ip_interface(text)
    except ValueError as e:
        raise _Invalid(f"{text!r} is not a valid address: {e}") from None


def _usable(iface: IPInterface) -> int:
    """How many addresses of the interface's subnet can be assigned to hosts."""
    net = iface.network
    # The network address (and IPv4 broadcast) is not a host address except
    # in the tiny point-to-point subnets (/31, /32, /127, /128).
    reserved = 2 if net.version == 4 else 1
    if net.prefixlen >= net.max_prefixlen - 1:
        reserved = 0
    return net.num_addresses - reserved


def _bridge_address(value: object) -> IPInterface:
    iface = _interface(value)
    net = iface.network
    if iface.ip == net.network_address and net.prefixlen < net.max_prefixlen - 1:
        raise _Invalid(f"{iface} is the subnet's network address")
    if (
        net.version == 4
        and iface.ip == net.broadcast_address
        and net.prefixlen < net.max_prefixlen - 1
    ):
        raise _Invalid(f"{iface} is the subnet's broadcast address")
    if _usable(iface) < 2:
        raise _Invalid(f"subnet {net} has no address left for a namespace")
    return iface


def _dst(value: object) -> str:
    text = _str(value, '"default" or a CIDR')
    if text == "default":
        return text
    try:
        # A bare address is a host route; a CIDR must not have host bits.
        return str(ipaddress.ip_network(text))
    except ValueError as e:
        raise _Invalid(f'{text!r} is not "default" or a valid CIDR: {e}') from None


def _via(value: object) -> str:
    text = _str(value, 'an address or "host_end"')
    if text == "host_end":
        return text
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise _Invalid(f'{text!r} is not an address or "host_end"') from None


def _loopback(value: object) -> bool | None:
    # YAML 1.1 reads on/off/yes/no as booleans; take those too.
    if value is None or isinstance(value, bool):
        return value
    if value in ("up", "down"):
        return value == "up"
    raise _Invalid(f"must be up or down, not {_type_name(value)}")


_SYSCTL_KEY = re.compile(r"net(\.[A-Za-z0-9_\-/@+]+){2,}")


def _sysctl_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and "\n" not in value:
        return value
    raise _Invalid(f"must be an integer or a string, not {_type_name(value)}")


# -- YAML nodes ----------------------------------------------------------------


class _Entry(NamedTuple):
    line: int  # of the key
    node: yaml.Node


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


class _Walker:
    """Turns a composed YAML tree into typed values, recording problems."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []
        self.lines: dict[str, int] = {}
        # (path, name) of every profile with a readable name, valid or not,
        # so duplicate names are reported even next to other problems.
        self.profile_names: list[tuple[str, str]] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def add(self, path: str, line: int | None, message: str) -> None:
        self.problems.append(Problem(self.file, line, path, message))

    def scalar(self, node: yaml.Node) -> object:
        """The plain value of a node; lists of scalars become lists."""
        if isinstance(node, yaml.SequenceNode):
            return [self.scalar(n) if isinstance(n, yaml.ScalarNode) else {} for n in node.value]
        if isinstance(node, yaml.MappingNode):
            return {}
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            raise _Invalid(f"unreadable value: {getattr(e, 'problem', e)}") from None

    def _pairs(
        self, node: yaml.MappingNode, path: str, depth: int
    ) -> list[tuple[yaml.Node, yaml.Node, bool]]:
        explicit: list[tuple[yaml.Node, yaml.Node, bool]] = []
        merged: list[tuple[yaml.Node, yaml.Node, bool]] = []
        for key, value in node.value:
            if key.tag != _MERGE_TAG:
                explicit.append((key, value, False))
                continue
            sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
            for src in sources:
                if not isinstance(src, yaml.MappingNode) or depth > 20:
                    self.add(path, _line(key), "<< must merge a mapping or a list of mappings")
                    continue
                merged.extend((k, v, True) for k, v, _ in self._pairs(src, path, depth + 1))
        return explicit + merged

    def mapping(self, node: yaml.Node, path: str, line: int) -> dict[str, _Entry] | None:
        """The keys of a mapping node; duplicate and non-string keys are problems."""
        if not isinstance(node, yaml.MappingNode):
            self.add(path, line, f"must be a mapping, not {self._kind(node)}")
            return None
        out: dict[str, _Entry] = {}
        explicit_lines: dict[str, int] = {}
        for key, value, merged in self._pairs(node, path, 0):
            try:
                name = self.scalar(key) if isinstance(key, yaml.ScalarNode) else None
            except _Invalid:
                name = None
            if not isinstance(name, str):
                self.add(path, _line(key), f"keys must be strings, not {self._kind(key)}")
                continue
            if merged:
                # Keys written out win over merged ones; earlier merges win.
                out.setdefault(name, _Entry(_line(key), value))
                continue
            if name in explicit_lines:
                sub = f"{path}.{name}" if path else name
                self.add(sub, _line(key), f"duplicate key (first on line {explicit_lines[name]})")
                continue
            explicit_lines[name] = _line(key)
            out[name] = _Entry(_line(key), value)
        return out

    def fields(
        self,
        node: yaml.Node,
        path: str,
        line: int,
        allowed: tuple[str, ...],
        required: tuple[str, ...] = (),
    ) -> dict[str, _Entry] | None:
        """A mapping with a fixed set of keys: unknown and missing ones are problems."""
        m = self.mapping(node, path, line)
        if m is None:
            return None
        for key, entry in m.items():
            sub = f"{path}.{key}" if path else key
            self.lines[sub] = entry.line
            if not path and key.startswith("x-"):
                continue  # top-level x-* keys hold YAML anchors, as in Compose files
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.add(sub, entry.line, f"unknown key{hint}")
        for key in required:
            if key not in m:
                self.add(f"{path}.{key}" if path else key, line, "is required")
        return {k: v for k, v in m.items() if k in allowed}

    def sequence(self, node: yaml.Node, path: str, line: int) -> list[yaml.Node] | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.add(path, line, f"must be a list, not {self._kind(node)}")
            return None
        return list(node.value)

    def get(
        self,
        m: Mapping[str, _Entry],
        key: str,
        path: str,
        conv: Callable[[object], _T],
    ) -> _T | None:
        """The converted value of ``m[key]``; None when absent or invalid."""
        entry = m.get(key)
        if entry is None:
            return None
        sub = f"{path}.{key}" if path else key
        try:
            return conv(self.scalar(entry.node))
        except _Invalid as e:
            self.add(sub, entry.line, e.message)
            return None

    @staticmethod
    def _kind(node: yaml.Node) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        return f"{node.value!r}" if node.value else "empty"


# -- the schema ----------------------------------------------------------------

_TOP_KEYS = (*_CONVERTERS, "profiles")
_PROFILE_KEYS = ("name", "match", "loopback", "sysctls", "veth", "addresses", "routes", "enforce")
_VETH_KEYS = ("host_name", "netns_name", "mtu", "pool", "prefix", "bridge", "default_route")
_BRIDGE_KEYS = ("name", "address")
_ROUTE_KEYS = ("dst", "via", "dev", "metric", "table")
_ADDRESS_KEYS = ("address", "dev")

# Point-to-point subnets need a network address plus two host addresses, so
# /30 and /126 are the smallest; /8 is the largest that makes sense per namespace.
PREFIX_RANGE = {4: (8, 30), 6: (8, 126)}


def _match(value: object) -> str:
    pattern = _str(value, 'a glob or "regex:PATTERN"')
    if pattern.startswith("regex:"):
        if pattern == "regex:":
            raise _Invalid('"regex:" needs a pattern after it')
        try:
            re.compile(pattern[len("regex:") :])
        except re.error as e:
            raise _Invalid(f"bad regular expression: {e}") from None
    return pattern


def _parse_bridge(w: _Walker, entry: _Entry, path: str) -> BridgeSpec | None:
    m = w.fields(entry.node, path, entry.line, _BRIDGE_KEYS, ("name", "address"))
    if m is None:
        return None
    name = w.get(m, "name", path, _ifname)
    address = w.get(m, "address", path, _bridge_address)
    if name is None or address is None:
        return None
    return BridgeSpec(name, address)


def _parse_veth(w: _Walker, entry: _Entry, path: str) -> VethSpec | None:
    before = len(w.problems)
    m = w.fields(entry.node, path, entry.line, _VETH_KEYS, ("host_name", "netns_name"))
    if m is None:
        return None
    host_name = w.get(m, "host_name", path, _template)
    netns_name = w.get(m, "netns_name", path, _ifname)
    mtu = w.get(m, "mtu", path, lambda v: _int(v, 68, 65535))
    pool = w.get(m, "pool", path, _network)
    prefix = w.get(m, "prefix", path, lambda v: _int(v, 0, 128))
    bridge = _parse_bridge(w, m["bridge"], f"{path}.bridge") if "bridge" in m else None
    default_route = w.get(m, "default_route", path, _bool) or False

    if "bridge" in m and ("pool" in m or "prefix" in m):
        w.add(f"{path}.bridge", m["bridge"].line, "use either pool and prefix, or bridge, not both")
    elif "bridge" not in m:
        if "pool" not in m and "prefix" not in m:
            w.add(path, entry.line, "needs either pool and prefix, or bridge")
        elif "prefix" not in m:
            w.add(f"{path}.prefix", m["pool"].line, "is required with pool")
        elif "pool" not in m:
            w.add(f"{path}.pool", m["prefix"].line, "is required with prefix")

    if prefix is not None:
        lo, hi = PREFIX_RANGE[pool.version if pool is not None else 4]
        if not lo <= prefix <= hi:
            w.add(f"{path}.prefix", m["prefix"].line, f"must be between {lo} and {hi}")
        elif pool is not None and prefix < pool.prefixlen:
            w.add(f"{path}.pool", m["pool"].line, f"{pool} is too small for one /{prefix} subnet")

    family = pool.version if pool is not None else bridge.address.version if bridge else None
    if mtu is not None and family == 6 and mtu < 1280:
        w.add(f"{path}.mtu", m["mtu"].line, "must be at least 1280 for IPv6")

    if len(w.problems) > before or host_name is None or netns_name is None:
        return None
    return VethSpec(host_name, netns_name, mtu, pool, prefix, bridge, default_route)


def _parse_sysctls(w: _Walker, entry: _Entry, path: str) -> tuple[tuple[str, str], ...]:
    m = w.mapping(entry.node, path, entry.line)
    if m is None:
        return ()
    out: list[tuple[str, str]] = []
    for key, item in m.items():
        sub = f"{path}.{key}"
        w.lines[sub] = item.line
        if not _SYSCTL_KEY.fullmatch(key):
            w.add(
                sub,
                item.line,
                "not a per-namespace sysctl: use a dotted net.* name like net.ipv4.ip_forward",
            )
            continue
        value = w.get(m, key, path, _sysctl_value)
        if value is not None:
            out.append((key, value))
    return tuple(out)


def _parse_addresses(w: _Walker, entry: _Entry, path: str) -> tuple[AddressSpec, ...]:
    out: list[AddressSpec] = []
    for i, node in enumerate(w.sequence(entry.node, path, entry.line) or ()):
        sub = f"{path}[{i}]"
        w.lines[sub] = _line(node)
        m = w.fields(node, sub, _line(node), _ADDRESS_KEYS, _ADDRESS_KEYS)
        if m is None:
            continue
        address = w.get(m, "address", sub, _interface)
        dev = w.get(m, "dev", sub, _ifname)
        if address is not None and dev is not None:
            out.append(AddressSpec(address, dev))
    return tuple(out)


def _dst_version(dst: str) -> int | None:
    return None if dst == "default" else ipaddress.ip_network(dst).version


def _parse_routes(
    w: _Walker, entry: _Entry, path: str, veth: VethSpec | None, has_veth: bool
) -> tuple[RouteSpec, ...]:
    out: list[RouteSpec] = []
    for i, node in enumerate(w.sequence(entry.node, path, entry.line) or ()):
        sub = f"{path}[{i}]"
        w.lines[sub] = _line(node)
        before = len(w.problems)
        m = w.fields(node, sub, _line(node), _ROUTE_KEYS, ("dst",))
        if m is None:
            continue
        dst = w.get(m, "dst", sub, _dst)
        via = w.get(m, "via", sub, _via)
        dev = w.get(m, "dev", sub, _ifname)
        metric = w.get(m, "metric", sub, lambda v: _int(v, 0, 2**32 - 1))
        table = w.get(m, "table", sub, lambda v: _int(v, 1, 2**32 - 1))
        if "via" not in m and "dev" not in m:
            w.add(sub, _line(node), "needs via or dev")
        if dst is not None and via is not None:
            want = _dst_version(dst)
            if via == "host_end":
                if not has_veth:
                    w.add(f"{sub}.via", m["via"].line, "host_end needs a veth in this profile")
                elif veth is not None and want is not None and want != veth.version:
                    w.add(
                        f"{sub}.via",
                        m["via"].line,
                        f"host_end is IPv{veth.version} but dst is IPv{want}",
                    )
            else:
                have = ipaddress.ip_address(via).version
                if want is not None and want != have:
                    w.add(f"{sub}.via", m["via"].line, f"must be an IPv{want} address like dst")
        if len(w.problems) == before and dst is not None:
            out.append(RouteSpec(dst, via, dev, metric, table))
    return tuple(out)


def _parse_profile(w: _Walker, node: yaml.Node, path: str) -> Profile | None:
    line = _line(node)
    before = len(w.problems)
    m = w.fields(node, path, line, _PROFILE_KEYS, ("name", "match"))
    if m is None:
        return None
    name = w.get(m, "name", path, lambda v: _str(v, "a name"))
    if name is not None:
        w.profile_names.append((path, name))
    match = w.get(m, "match", path, _match)
    loopback = w.get(m, "loopback", path, _loopback)
    sysctls = _parse_sysctls(w, m["sysctls"], f"{path}.sysctls") if "sysctls" in m else ()
    veth = _parse_veth(w, m["veth"], f"{path}.veth") if "veth" in m else None
    addresses = _parse_addresses(w, m["addresses"], f"{path}.addresses") if "addresses" in m else ()
    routes = (
        _parse_routes(w, m["routes"], f"{path}.routes", veth, "veth" in m) if "routes" in m else ()
    )
    enforce = w.get(m, "enforce", path, _bool) or False
    if len(w.problems) > before or name is None or match is None:
        return None
    return Profile(name, match, loopback, sysctls, veth, addresses, routes, enforce)


def _check_profiles(w: _Walker, profiles: list[tuple[int, Profile]]) -> None:
    """Checks across profiles: unique names, one address per bridge, no overlaps."""
    names: dict[str, str] = {}
    for path, name in w.profile_names:
        if name in names:
            w.add(
                f"{path}.name",
                w.lines.get(f"{path}.name"),
                f"duplicate profile name {name!r} (also {names[name]})",
            )
        else:
            names[name] = path
    cfg = Config(profiles=tuple(p for _, p in profiles))
    index = [i for i, _ in profiles]

    def real(path: str) -> str:
        # _networks numbers the profiles it was given; map back to file order.
        k = int(path[len("profiles[") : path.index("]")])
        return f"profiles[{index[k]}]" + path[path.index("]") + 1 :]

    nets = [(real(path), net, p) for path, net, p in _networks(cfg)]
    bridges: dict[str, tuple[str, IPInterface]] = {}
    seen: list[tuple[str, IPNetwork]] = []
    for path, net, p in nets:
        pb = p.veth.bridge if p.veth is not None else None
        if pb is not None and pb.name in bridges:
            # A bridge shared by profiles must agree with its first
            # definition, which alone takes part in the overlap checks.
            first_path, first_address = bridges[pb.name]
            if first_address != pb.address:
                msg = f"bridge {pb.name} already has address {first_address} ({first_path})"
                w.add(path, w.lines.get(path), msg)
            continue
        if pb is not None:
            bridges[pb.name] = (path, pb.address)
        for opath, onet in seen:
            if net.version == onet.version and net.overlaps(onet):
                w.add(path, w.lines.get(path), f"{net} overlaps {onet} ({opath})")
        seen.append((path, net))


def _parse_root(w: _Walker, root: yaml.Node, source: str) -> Config:
    m = w.fields(root, "", _line(root), _TOP_KEYS)
    if m is None:
        return Config(source=source)
    values: dict[str, Any] = {}
    for key, conv in _CONVERTERS.items():
        if key in m:
            before = len(w.problems)
            value = w.get(m, key, "", conv)
            if len(w.problems) == before:
                values[key] = value
    profiles: list[tuple[int, Profile]] = []
    if "profiles" in m:
        entry = m["profiles"]
        for i, node in enumerate(w.sequence(entry.node, "profiles", entry.line) or ()):
            w.lines[f"profiles[{i}]"] = _line(node)
            profile = _parse_profile(w, node, f"profiles[{i}]")
            if profile is not None:
                profiles.append((i, profile))
    _check_profiles(w, profiles)
    return replace(
        Config(source=source),
        profiles=tuple(p for _, p in profiles),
        **values,
    )


# -- entry points --------------------------------------------------------------


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.line is not None, p.line or 0))


def parse_config(text: str, *, source: str = "<string>") -> Config:
    """The Config in ``text``; raises ConfigError listing every problem."""
    w = _Walker(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = int(mark.line) + 1 if mark is not None else None
        what = ": ".join(s for s in (e.context, e.problem) if s)
        raise ConfigError([Problem(source, line, "", f"invalid YAML: {what}")]) from None
    except yaml.YAMLError as e:
        raise ConfigError([Problem(source, None, "", f"invalid YAML: {e}")]) from None
    if root is None:
        return Config(source=source)
    if isinstance(root, yaml.ScalarNode) and root.tag == "tag:yaml.org,2002:null":
        return Config(source=source)
    config = _parse_root(w, root, source)
    if w.problems:
        raise ConfigError(_sorted(w.problems))
    return replace(config, key_lines=dict(w.lines))


def load_config(path: str | None, *, required: bool = False) -> Config:
    """The Config in the file at ``path`` (None: the default file).

    A missing file gives the defaults when it is the default file (``path``
    None or DEFAULT_CONFIG_PATH) and ``required`` is false; any other
    missing or unreadable file raises ConfigError, as do invalid contents.
    """
    file = path or DEFAULT_CONFIG_PATH
    try:
        with open(file, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if file == DEFAULT_CONFIG_PATH and not required:
            return Config()
        raise ConfigError([Problem(file, None, "", "no such file")]) from None
    except OSError as e:
        raise ConfigError([Problem(file, None, "", f"cannot read: {e.strerror or e}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError([Problem(file, line, "", "not UTF-8 text")]) from None
    return parse_config(text, source=file)


def check_config_main(path: str | None, host_networks: Iterable[IPNetwork] = ()) -> int:
    """``nswatch check-config [FILE]``: 0 and "OK: ..." when valid, else 2 and the problems."""
    file = path or DEFAULT_CONFIG_PATH
    try:
        config = load_config(file, required=True)
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
