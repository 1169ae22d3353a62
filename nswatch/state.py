"""The model as JSON-ready data (``/api/v1/state``, ``nswatch snapshot --json``)."""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any

from nswatch.model import Address, Link, Model, Namespace, Route, Rule

TABLE_NAMES = {253: "default", 254: "main", 255: "local"}
# IFF_* bits as `ip link` names them (RUNNING too, which `ip` folds into NO-CARRIER).
LINK_FLAGS = (
    (0x1, "UP"),
    (0x2, "BROADCAST"),
    (0x4, "DEBUG"),
    (0x8, "LOOPBACK"),
    (0x10, "POINTOPOINT"),
    (0x20, "NOTRAILERS"),
    (0x40, "RUNNING"),
    (0x80, "NOARP"),
    (0x100, "PROMISC"),
    (0x200, "ALLMULTI"),
    (0x400, "MASTER"),
    (0x800, "SLAVE"),
    (0x1000, "MULTICAST"),
    (0x2000, "PORTSEL"),
    (0x4000, "AUTOMEDIA"),
    (0x8000, "DYNAMIC"),
    (0x10000, "LOWER_UP"),
    (0x20000, "DORMANT"),
    (0x40000, "ECHO"),
)


def table_name(table: int) -> str:
    """The routing table as `ip` names it: main, local, default, or its number."""
    return TABLE_NAMES.get(table, str(table))


def link_flags(flags: int) -> list[str]:
    """ifi_flags as names."""
    return [name for bit, name in LINK_FLAGS if flags & bit]


def link_json(model: Model, ns: Namespace, link: Link) -> dict[str, Any]:
    """One link; ``peer`` is null while the veth peer is unresolved."""
    out: dict[str, Any] = {
        "index": link.index,
        "name": link.name,
        "kind": link.kind,
        "mac": link.mac,
        "mtu": link.mtu,
        "admin_up": link.admin_up,
        "oper_state": link.oper_state,
        "master": ns.link_name(link.master),
    }
    if link.kind == "veth":
        peer = model.peer_of(ns.inode, link.index)
        out["peer"] = (
            {"netns": peer.netns, "index": peer.index, "name": peer.name} if peer else None
        )
        out["peer_index"] = link.peer_index
        out["peer_netnsid"] = link.peer_netnsid
    else:
        out["peer"] = None
    parent = model.parent_of(ns.inode, link.index)
    out["parent"] = (
        {"netns": parent.netns, "index": parent.index, "name": parent.name} if parent else None
    )
    if link.parent_index is not None:
        out["parent_index"] = link.parent_index
        out["parent_netnsid"] = link.parent_netnsid
    out.update(
        {
            "carrier": link.carrier,
            "carrier_changes": link.carrier_changes,
            "carrier_up_count": link.carrier_up_count,
            "carrier_down_count": link.carrier_down_count,
            "txqlen": link.txqlen,
            "flags": link_flags(link.flags),
            "promiscuity": link.promiscuity,
            "ifalias": link.ifalias,
            "broadcast": link.broadcast,
        }
    )
    return out


# Every field of a Link that link_json shows (besides what link_refs
# finds): two links alike in these give the same JSON. The counters
# (``stats``), refreshed every few seconds, are not among them.
LINK_SHOWN = attrgetter(
    "index",
    "name",
    "kind",
    "mac",
    "mtu",
    "admin_up",
    "oper_state",
    "master",
    "peer_index",
    "peer_netnsid",
    "parent_index",
    "parent_netnsid",
    "carrier",
    "carrier_changes",
    "carrier_up_count",
    "carrier_down_count",
    "txqlen",
    "flags",
    "promiscuity",
    "ifalias",
    "broadcast",
)


def address_json(ns: Namespace, addr: Address) -> dict[str, Any]:
    """One address; ``link`` is the link's name."""
    return {
        "link": ns.link_name(addr.link),
        "ifindex": addr.link,
        "family": addr.family,
        "address": addr.address,
        "prefixlen": addr.prefixlen,
        "scope": addr.scope,
        "flags": list(addr.flags),
        # Seconds left when the kernel last reported the address; null: forever.
        "preferred_lft": addr.preferred_lft,
        "valid_lft": addr.valid_lft,
    }


def route_json(ns: Namespace, route: Route) -> dict[str, Any]:
    """One route; ``dev`` is the output link's name, ``table`` as `ip` names it."""
    return {
        "table": table_name(route.table),
        "family": route.family,
        "type": route.type,
        "dst": route.dst,
        "gateway": route.gateway,
        "dev": ns.link_name(route.dev),
        "protocol": route.protocol,
        "scope": route.scope,
        "priority": route.priority,
        "prefsrc": route.prefsrc,
        "flags": list(route.flags),
        "nexthops": [
            {
                "gateway": nh.gateway,
                "dev": ns.link_name(nh.dev),
                "weight": nh.weight,
                "flags": list(nh.flags),
            }
            for nh in route.nexthops
        ],
    }


def rule_json(rule: Rule) -> dict[str, Any]:
    """One policy routing rule, with `ip rule`'s words (``table`` named like routes')."""
    return {
        "family": rule.family,
        "priority": rule.priority,
        "action": rule.action,
        "table": table_name(rule.table) if rule.action == "lookup" else None,
        "src": rule.src,
        "dst": rule.dst,
        "iif": rule.iif,
        "oif": rule.oif,
        "fwmark": rule.fwmark,
        "fwmask": rule.fwmask,
        "tos": rule.tos,
        "not": rule.invert,
        "goto": rule.goto,
        "suppress_prefixlen": rule.suppress_prefixlen,
        "protocol": rule.protocol,
    }


def namespace_head(ns: Namespace) -> dict[str, Any]:
    """What a namespace's JSON shows before its lists: names, inode, holder, sync."""
    return {
        "name": ns.name,
        "names": list(ns.names),
        "inode": ns.inode,
        # One process living in it (for a namespace no file holds, the one
        # it is named after), when process discovery is on.
        "owner": (
            None
            if ns.owner is None
            else {
                "pid": ns.owner.pid,
                "comm": ns.owner.comm,
                "unit": ns.owner.unit,
                "container_id": ns.owner.container_id,
                "pod_uid": ns.owner.pod_uid,
            }
        ),
        "synced": ns.synced,
    }


# Each list's order is total (no two records of a namespace sort alike), so
# it does not depend on the order the kernel reported them in, and a
# renderer may keep a sorted list and insert what is new.
def link_order(link: Link) -> int:
    """Where a link goes in its namespace's list: by index."""
    return link.index


def address_order(a: Address) -> tuple[object, ...]:
    """Where an address goes in its namespace's list: by link, family, address, prefix."""
    return (a.link, a.family, a.address, a.prefixlen)


def route_order(r: Route) -> tuple[object, ...]:
    """Where a route goes: by family, table, destination, metric, gateway, then the rest."""
    return (
        r.family,
        r.table,
        r.dst,
        -1 if r.priority is None else r.priority,
        str(r.gateway),
        -1 if r.dev is None else r.dev,
        r.tos,
        r.type,
        str([(nh.gateway, nh.dev, nh.weight) for nh in r.nexthops]) if r.nexthops else "",
    )


def rule_order(r: Rule) -> tuple[object, ...]:
    """Where a rule goes: by family and priority, then its whole key."""
    return (r.family, r.priority, repr(r.key))


def links_json(model: Model, ns: Namespace) -> list[dict[str, Any]]:
    """A namespace's links, in :func:`link_order`."""
    return [link_json(model, ns, link) for link in sorted(ns.links.values(), key=link_order)]


def addresses_json(ns: Namespace) -> list[dict[str, Any]]:
    """A namespace's addresses, in :func:`address_order`."""
    return [address_json(ns, a) for a in sorted(ns.addresses.values(), key=address_order)]


def routes_json(ns: Namespace) -> list[dict[str, Any]]:
    """A namespace's routes, in :func:`route_order`."""
    return [route_json(ns, r) for r in sorted(ns.routes.values(), key=route_order)]


def rules_json(ns: Namespace) -> list[dict[str, Any]]:
    """A namespace's policy routing rules, in :func:`rule_order`."""
    return [rule_json(r) for r in sorted(ns.rules.values(), key=rule_order)]


def namespace_json(model: Model, ns: Namespace) -> dict[str, Any]:
    """One namespace with its links, addresses, routes and rules, each list in its order.

    A renderer may keep each part apart (:mod:`nswatch.render_cache`):
    addresses, routes and rules depend only on the record and the names of
    this namespace's links; links also on :func:`link_refs`.
    """
    return {
        **namespace_head(ns),
        "links": links_json(model, ns),
        "addresses": addresses_json(ns),
        "routes": routes_json(ns),
        "rules": rules_json(ns),
    }


def link_refs(model: Model, ns: Namespace, link: Link) -> tuple[object, object]:
    """What a link's JSON shows of other links: its veth peer and its lower device."""
    peer = model.peer_of(ns.inode, link.index) if link.kind == "veth" else None
    parent = model.parent_of(ns.inode, link.index) if link.parent_index is not None else None
    return peer, parent


def veth_pairs_json(model: Model) -> list[dict[str, Any]]:
    """The resolved veth pairs, each as its two ends' namespace and link names, sorted."""
    pairs = []
    for a, b in model.veth_pairs():
        na, nb = model.namespaces[a[0]], model.namespaces[b[0]]
        pairs.append(
            {
                "a": {"netns": na.name, "link": na.links[a[1]].name},
                "b": {"netns": nb.name, "link": nb.links[b[1]].name},
            }
        )
    pairs.sort(key=lambda p: (p["a"]["netns"], p["a"]["link"]))
    return pairs


def state_top(model: Model) -> dict[str, Any]:
    """What the state shows before its namespaces (and moves with every version)."""
    return {
        # The event stream's id of the last change this state includes.
        "event_id": model.changes_made,
        "synced": model.synced,
    }


def state_json(
    model: Model,
    namespace: Callable[[Namespace], Any] | None = None,
    pairs: Any = None,
) -> dict[str, Any]:
    """The whole model: ``synced``, ``namespaces`` by name, ``veth_pairs``.

    ``namespace`` makes each namespace's JSON (or a stand-in that serialises
    the same); by default :func:`namespace_json`. ``pairs`` likewise stands
    in for :func:`veth_pairs_json`.
    """
    return {
        **state_top(model),
        "namespaces": {
            ns.name: namespace(ns) if namespace else namespace_json(model, ns)
            for ns in sorted(model.namespaces.values(), key=lambda n: n.name)
        },
        "veth_pairs": veth_pairs_json(model) if pairs is None else pairs,
    }
