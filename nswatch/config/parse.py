"""The config file's sections: the top-level settings, each profile, and checks across profiles."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import replace
from typing import Any

from nswatch import settings
from nswatch.config import convert
from nswatch.config.model import (
    AddressSpec,
    BridgeSpec,
    Config,
    IPInterface,
    Profile,
    RouteSpec,
    VethSpec,
)
from nswatch.config.overlap import earliest_overlaps, networks
from nswatch.config.walker import Entry, Walker
from nswatch.config.yamltree import Node
from nswatch.values import boolean, integer, string

__all__ = ["PREFIX_RANGE", "parse_root"]

_SETTING_KEYS = tuple(name for name, _ in settings.declared())
_TOP_KEYS = (*_SETTING_KEYS, "profiles")
_PROFILE_KEYS = ("name", "match", "loopback", "sysctls", "veth", "addresses", "routes", "enforce")
_VETH_KEYS = ("host_name", "netns_name", "mtu", "pool", "prefix", "bridge", "default_route")
_BRIDGE_KEYS = ("name", "address")
_ROUTE_KEYS = ("dst", "via", "dev", "metric", "table")
_ADDRESS_KEYS = ("address", "dev")

# Point-to-point subnets need a network address plus two host addresses, so
# /30 and /126 are the smallest; /8 is the largest that makes sense per namespace.
PREFIX_RANGE = {4: (8, 30), 6: (8, 126)}


def _parse_bridge(w: Walker, entry: Entry, path: str) -> BridgeSpec | None:
    m = w.fields(entry.node, path, entry.line, _BRIDGE_KEYS, ("name", "address"))
    if m is None:
        return None
    name = w.get(m, "name", path, convert.ifname)
    address = w.get(m, "address", path, convert.bridge_address)
    if name is None or address is None:
        return None
    return BridgeSpec(name, address)


def _parse_veth(w: Walker, entry: Entry, path: str) -> VethSpec | None:
    before = len(w.problems)
    m = w.fields(entry.node, path, entry.line, _VETH_KEYS, ("host_name", "netns_name"))
    if m is None:
        return None
    host_name = w.get(m, "host_name", path, convert.template)
    netns_name = w.get(m, "netns_name", path, convert.ifname)
    mtu = w.get(m, "mtu", path, lambda v: integer(v, 68, 65535))
    pool = w.get(m, "pool", path, convert.network)
    prefix = w.get(m, "prefix", path, lambda v: integer(v, 0, 128))
    bridge = _parse_bridge(w, m["bridge"], f"{path}.bridge") if "bridge" in m else None
    default_route = w.get(m, "default_route", path, boolean) or False

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


def _parse_sysctls(w: Walker, entry: Entry, path: str) -> tuple[tuple[str, str], ...]:
    m = w.mapping(entry.node, path, entry.line)
    if m is None:
        return ()
    out: list[tuple[str, str]] = []
    for key, item in m.items():
        sub = f"{path}.{key}"
        w.lines[sub] = item.line
        if not convert.SYSCTL_KEY.fullmatch(key):
            w.add(
                sub,
                item.line,
                "not a per-namespace sysctl: use a dotted net.* name like net.ipv4.ip_forward",
            )
            continue
        value = w.get(m, key, path, convert.sysctl_value)
        if value is not None:
            out.append((key, value))
    return tuple(out)


def _parse_addresses(w: Walker, entry: Entry, path: str) -> tuple[AddressSpec, ...]:
    out: list[AddressSpec] = []
    for i, node in enumerate(w.sequence(entry.node, path, entry.line) or ()):
        sub = f"{path}[{i}]"
        w.lines[sub] = node.line
        m = w.fields(node, sub, node.line, _ADDRESS_KEYS, _ADDRESS_KEYS)
        if m is None:
            continue
        address = w.get(m, "address", sub, convert.interface)
        dev = w.get(m, "dev", sub, convert.ifname)
        if address is not None and dev is not None:
            out.append(AddressSpec(address, dev))
    return tuple(out)


def _dst_version(dst: str) -> int | None:
    return None if dst == "default" else ipaddress.ip_network(dst).version


def _parse_routes(
    w: Walker, entry: Entry, path: str, veth: VethSpec | None, has_veth: bool
) -> tuple[RouteSpec, ...]:
    out: list[RouteSpec] = []
    for i, node in enumerate(w.sequence(entry.node, path, entry.line) or ()):
        sub = f"{path}[{i}]"
        w.lines[sub] = node.line
        before = len(w.problems)
        m = w.fields(node, sub, node.line, _ROUTE_KEYS, ("dst",))
        if m is None:
            continue
        dst = w.get(m, "dst", sub, convert.dst)
        via = w.get(m, "via", sub, convert.via)
        dev = w.get(m, "dev", sub, convert.ifname)
        metric = w.get(m, "metric", sub, lambda v: integer(v, 0, 2**32 - 1))
        table = w.get(m, "table", sub, lambda v: integer(v, 1, 2**32 - 1))
        if "via" not in m and "dev" not in m:
            w.add(sub, node.line, "needs via or dev")
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


def _parse_profile(w: Walker, node: Node, path: str) -> Profile | None:
    line = node.line
    before = len(w.problems)
    m = w.fields(node, path, line, _PROFILE_KEYS, ("name", "match"))
    if m is None:
        return None
    name = w.get(m, "name", path, lambda v: string(v, "a name"))
    if name is not None:
        w.profile_names.append((path, name))
    match = w.get(m, "match", path, convert.match)
    loopback = w.get(m, "loopback", path, convert.loopback)
    sysctls = _parse_sysctls(w, m["sysctls"], f"{path}.sysctls") if "sysctls" in m else ()
    veth = _parse_veth(w, m["veth"], f"{path}.veth") if "veth" in m else None
    addresses = _parse_addresses(w, m["addresses"], f"{path}.addresses") if "addresses" in m else ()
    routes = (
        _parse_routes(w, m["routes"], f"{path}.routes", veth, "veth" in m) if "routes" in m else ()
    )
    enforce = w.get(m, "enforce", path, boolean) or False
    if len(w.problems) > before or name is None or match is None:
        return None
    return Profile(name, match, loopback, sysctls, veth, addresses, routes, enforce)


def _check_profiles(w: Walker, profiles: list[tuple[int, Profile]]) -> None:
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
        # networks() numbers the profiles it was given; map back to file order.
        k = int(path[len("profiles[") : path.index("]")])
        return f"profiles[{index[k]}]" + path[path.index("]") + 1 :]

    bridges: dict[str, tuple[str, IPInterface]] = {}
    checked: list[tuple[str, Any]] = []
    for path, net, p in networks(cfg):
        path = real(path)
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
        checked.append((path, net))
    for i, j in earliest_overlaps([net for _, net in checked]).items():
        path, net = checked[i]
        opath, onet = checked[j]
        w.add(path, w.lines.get(path), f"{net} overlaps {onet} ({opath})")


def parse_root(w: Walker, root: Node, source: str) -> Config:
    """The Config of a file's top-level mapping; problems go to ``w``."""
    m = w.fields(root, "", root.line, _TOP_KEYS)
    if m is None:
        return Config(source=source)
    values: dict[str, Any] = {}
    for key in _SETTING_KEYS:
        if key in m:
            before = len(w.problems)
            value = w.get(m, key, "", functools.partial(settings.convert, key))
            if len(w.problems) == before:
                values[key] = value
    profiles: list[tuple[int, Profile]] = []
    if "profiles" in m:
        entry = m["profiles"]
        for i, node in enumerate(w.sequence(entry.node, "profiles", entry.line) or ()):
            w.lines[f"profiles[{i}]"] = node.line
            profile = _parse_profile(w, node, f"profiles[{i}]")
            if profile is not None:
                profiles.append((i, profile))
    _check_profiles(w, profiles)
    return Config(
        settings=replace(settings.DEFAULTS, **values),
        profiles=tuple(p for _, p in profiles),
        source=source,
    )
