"""The configuration as typed, immutable values: settings and profiles."""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeAlias

from nswatch import settings as _settings
from nswatch.config.problems import ConfigError, Problem
from nswatch.patterns import user_regex
from nswatch.settings import Settings
from nswatch.values import Invalid

__all__ = [
    "AddressSpec",
    "BridgeSpec",
    "Config",
    "IPInterface",
    "IPNetwork",
    "Profile",
    "RouteSpec",
    "VethSpec",
]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface


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
        ``regex:`` pattern is RE2 with ``re.search`` semantics, so anchor it
        (``^...$``) to match the whole name.
        """
        if self.match.startswith("regex:"):
            return user_regex(self.match[len("regex:") :]).search(netns)
        return fnmatch.fnmatchcase(netns, self.match)


@dataclass(frozen=True)
class Config:
    """The whole configuration: the top-level settings and the profiles."""

    settings: Settings = _settings.DEFAULTS
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
        """A copy with command-line settings on top, checked like the file's.

        Values that are None are skipped (an unset flag).  ``listen`` takes
        ``"HOST:PORT"`` or a ``(host, port)`` tuple.  Raises ConfigError
        (file ``<command line>``) or TypeError for an unknown setting.
        """
        names = {f.name for f in fields(Settings)}
        changes: dict[str, Any] = {}
        problems: list[Problem] = []
        for key, value in kw.items():
            if key not in names:
                raise TypeError(f"with_overrides: unknown setting {key!r}")
            if value is None:
                continue
            try:
                changes[key] = _settings.convert(key, value)
            except Invalid as e:
                problems.append(Problem("<command line>", None, key, e.message))
        if problems:
            raise ConfigError(problems)
        return replace(self, settings=replace(self.settings, **changes))
