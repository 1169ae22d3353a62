"""Converters for the values inside profiles (names, networks, routes, sysctls, matches).

Like :mod:`nswatch.values`, each returns the typed value or raises Invalid
with a message that completes "KEY: ...".
"""

from __future__ import annotations

import ipaddress
import re

from nswatch.config.model import IPInterface, IPNetwork
from nswatch.config.names import IFNAME_MAX, parse_template
from nswatch.values import Invalid, regex, string, type_name

__all__ = [
    "SYSCTL_KEY",
    "bridge_address",
    "dst",
    "ifname",
    "interface",
    "loopback",
    "match",
    "network",
    "sysctl_value",
    "template",
    "via",
]


def ifname(value: object) -> str:
    """A name the kernel accepts (dev_valid_name)."""
    name = string(value, "an interface name")
    if len(name.encode("utf-8", "surrogateescape")) > IFNAME_MAX:
        raise Invalid(f"{name!r} is longer than {IFNAME_MAX} bytes")
    if name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        raise Invalid(f"{name!r} is not a valid interface name")
    return name


def template(value: object) -> str:
    """A ``host_name`` template that always renders a valid name."""
    text = string(value, "a name template")
    parse_template(text)
    return text


def network(value: object) -> IPNetwork:
    """A CIDR without host bits."""
    text = string(value, "a CIDR like 198.18.0.0/16")
    if "/" not in text:
        raise Invalid(f"{text!r} needs a prefix length, like 198.18.0.0/16")
    try:
        return ipaddress.ip_network(text)
    except ValueError as e:
        raise Invalid(f"{text!r} is not a valid network: {e}") from None


def interface(value: object) -> IPInterface:
    """An address with its prefix length."""
    text = string(value, "an address with prefix, like 198.18.128.1/24")
    if "/" not in text:
        raise Invalid(f"{text!r} needs a prefix length, like 198.18.128.1/24")
    try:
        return ipaddress.ip_interface(text)
    except ValueError as e:
        raise Invalid(f"{text!r} is not a valid address: {e}") from None


def _usable(iface: IPInterface) -> int:
    """How many addresses of the interface's subnet can be assigned to hosts."""
    net = iface.network
    # The network address (and IPv4 broadcast) is not a host address except
    # in the tiny point-to-point subnets (/31, /32, /127, /128).
    reserved = 2 if net.version == 4 else 1
    if net.prefixlen >= net.max_prefixlen - 1:
        reserved = 0
    return net.num_addresses - reserved


def bridge_address(value: object) -> IPInterface:
    """A bridge's address: a host address of a subnet with room for namespaces."""
    iface = interface(value)
    net = iface.network
    if iface.ip == net.network_address and net.prefixlen < net.max_prefixlen - 1:
        raise Invalid(f"{iface} is the subnet's network address")
    if (
        net.version == 4
        and iface.ip == net.broadcast_address
        and net.prefixlen < net.max_prefixlen - 1
    ):
        raise Invalid(f"{iface} is the subnet's broadcast address")
    if _usable(iface) < 2:
        raise Invalid(f"subnet {net} has no address left for a namespace")
    return iface


def dst(value: object) -> str:
    """A route destination: "default" or a normalised CIDR."""
    text = string(value, '"default" or a CIDR')
    if text == "default":
        return text
    try:
        # A bare address is a host route; a CIDR must not have host bits.
        return str(ipaddress.ip_network(text))
    except ValueError as e:
        raise Invalid(f'{text!r} is not "default" or a valid CIDR: {e}') from None


def via(value: object) -> str:
    """A gateway: an address or "host_end"."""
    text = string(value, 'an address or "host_end"')
    if text == "host_end":
        return text
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise Invalid(f'{text!r} is not an address or "host_end"') from None


def loopback(value: object) -> bool | None:
    """up/down (or a YAML boolean)."""
    # YAML 1.1 reads on/off/yes/no as booleans; take those too.
    if value is None or isinstance(value, bool):
        return value
    if value in ("up", "down"):
        return value == "up"
    raise Invalid(f"must be up or down, not {type_name(value)}")


SYSCTL_KEY = re.compile(r"net(\.[A-Za-z0-9_\-/@+]+){2,}")


def sysctl_value(value: object) -> str:
    """A sysctl value as written to /proc/sys."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and "\n" not in value:
        return value
    raise Invalid(f"must be an integer or a string, not {type_name(value)}")


def match(value: object) -> str:
    """A profile's ``match``: a glob, or ``regex:`` and an RE2 pattern."""
    pattern = string(value, 'a glob or "regex:PATTERN"')
    if pattern.startswith("regex:"):
        if pattern == "regex:":
            raise Invalid('"regex:" needs a pattern after it')
        regex(pattern[len("regex:") :])
    return pattern
