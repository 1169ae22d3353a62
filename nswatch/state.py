"""The model as JSON-ready data (``/api/v1/state``, ``nswatch snapshot --json``)."""

from __future__ import annotations

from typing import Any

from nswatch.model import Address, Link, Model, Namespace, Route

TABLE_NAMES = {253: "default", 254: "main", 255: "local"}


def table_name(table: int) -> str:
    """The routing table as `ip` names it: main, local, default, or its number."""
    return TABLE_NAMES.get(table, str(table))


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
    return out


def address_json(ns: Namespace, addr: Address) -> dict[str, Any]:
    """One address; ``link`` is the link's name."""
    return {
        "link": ns.link_name(addr.link),
        "ifindex": addr.link,
        "family": addr.family,
        "address": addr.address,
        "prefixlen": addr.prefixlen,
        "scope": addr.scope,
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
        "nexthops": [
            {"gateway": nh.gateway, "dev": ns.link_name(nh.dev), "weight": nh.weight}
            for nh in route.nexthops
        ],
    }


def namespace_json(model: Model, ns: Namespace) -> dict[str, Any]:
    """One namespace with its links, addresses and routes, in stable order."""
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
        "links": [link_json(model, ns, ns.links[i]) for i in sorted(ns.links)],
        "addresses": [
            address_json(ns, a)
            for a in sorted(ns.addresses.values(), key=lambda a: (a.link, a.family, a.address))
        ],
        "routes": [
            route_json(ns, r)
            for r in sorted(
                ns.routes.values(),
                key=lambda r: (r.family, r.table, r.dst, r.priority or 0, str(r.gateway)),
            )
        ],
    }


def state_json(model: Model) -> dict[str, Any]:
    """The whole model: ``synced``, ``namespaces`` by name, ``veth_pairs``."""
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
    return {
        "synced": model.synced,
        "namespaces": {
            ns.name: namespace_json(model, ns)
            for ns in sorted(model.namespaces.values(), key=lambda n: n.name)
        },
        "veth_pairs": pairs,
    }
