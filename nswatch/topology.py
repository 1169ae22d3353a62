"""The topology graph of a model view: namespaces holding links, and the edges between links.

One graph-building function, :func:`build`, feeds the web page's data
(``/api/v1/topology``), ``nswatch graph --format json``, and the DOT and
SVG renderings here. Edges: veth pairs, a link's lower device (macvlan,
vxlan, ... on another link, often in another namespace), and bridge ports
to their bridge.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from nswatch.model import Link, Model, Namespace

# Operational states in which a link passes no traffic (shown red).
DOWN_STATES = frozenset({"DOWN", "LOWERLAYERDOWN", "NOTPRESENT"})
_GROUP = re.compile(r"^(.*?[^\d])[-_.]?\d+$")
_DIGITS = re.compile(r"(\d+)")


def link_id(inode: int, index: int) -> str:
    """A link's id in the graph, unique across namespaces."""
    return f"{inode}:{index}"


def is_down(link: Link) -> bool:
    """Whether the link is set down or cannot pass traffic."""
    return not link.admin_up or link.oper_state in DOWN_STATES


def group_of(name: str) -> str:
    """The group a namespace is shown in: its name without a trailing number (pod-17 → pod)."""
    m = _GROUP.match(name)
    return m.group(1).rstrip("-_.") if m else name


def _natural(name: str) -> list[str | int]:
    # pod-2 before pod-10; the split alternates text and digits, so items compare alike.
    return [int(t) if t.isdigit() else t for t in _DIGITS.split(name)]


def _selected(ns: Namespace, globs: Sequence[str]) -> bool:
    return not globs or any(fnmatch.fnmatchcase(n, g) for n in ns.names for g in globs)


def build(model: Model, netns: Sequence[str] = ()) -> dict[str, Any]:
    """The graph (JSON-ready) of the namespaces matching the ``netns`` globs (all if none)."""
    chosen = sorted(
        (ns for ns in model.namespaces.values() if _selected(ns, netns)),
        key=lambda ns: (not ns.is_host, _natural(ns.name)),
    )
    inodes = {ns.inode for ns in chosen}
    namespaces = []
    edges: list[dict[str, str]] = []
    for ns in chosen:
        addrs: dict[int, list[str]] = {}
        for a in sorted(ns.addresses.values(), key=lambda a: (a.family != "inet", a.address)):
            addrs.setdefault(a.link, []).append(f"{a.address}/{a.prefixlen}")
        links = []
        for index in sorted(ns.links):
            link = ns.links[index]
            lid = link_id(ns.inode, index)
            master = link_id(ns.inode, link.master) if link.master in ns.links else None
            links.append(
                {
                    "id": lid,
                    "index": index,
                    "name": link.name,
                    "kind": link.kind,
                    "admin_up": link.admin_up,
                    "oper_state": link.oper_state,
                    "down": is_down(link),
                    "mtu": link.mtu,
                    "mac": link.mac,
                    "master": master,
                    "addresses": addrs.get(index, []),
                }
            )
            if master is not None:
                edges.append({"kind": "master", "a": lid, "b": master})
            parent = model.parent_of(ns.inode, index)
            if parent is not None and parent.inode in inodes:
                edges.append({"kind": "parent", "a": lid, "b": link_id(parent.inode, parent.index)})
        namespaces.append(
            {
                "id": f"ns{ns.inode}",
                "name": ns.name,
                "names": list(ns.names),
                "inode": ns.inode,
                "host": ns.is_host,
                "group": "host" if ns.is_host else group_of(ns.name),
                "links": links,
            }
        )
    for end_a, end_b in model.veth_pairs():
        if end_a[0] in inodes and end_b[0] in inodes:
            edges.append({"kind": "veth", "a": link_id(*end_a), "b": link_id(*end_b)})
    return {"event_id": model.changes_made, "namespaces": namespaces, "edges": edges}


# --- Graphviz DOT -------------------------------------------------------------------


def _dot_str(s: str) -> str:
    escaped = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped + '"'


_EDGE_STYLE = {
    "veth": 'color="#3367d6", penwidth=2',
    "parent": 'style=dashed, color="#777777", label="lower"',
    "master": 'style=dotted, color="#777777", label="port"',
}


def to_dot(graph: dict[str, Any]) -> str:
    """The graph in Graphviz DOT: a cluster per namespace, a node per link."""
    out = [
        "graph nswatch {",
        '  graph [rankdir=LR, fontname="sans-serif", compound=true];',
        '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="sans-serif",'
        " fontsize=10];",
        '  edge [fontname="sans-serif", fontsize=8];',
    ]
    for ns in graph["namespaces"]:
        out.append(f"  subgraph {_dot_str('cluster_' + ns['id'])} {{")
        out.append(f"    label={_dot_str(ns['name'])};")
        for link in ns["links"]:
            state = "DOWN" if not link["admin_up"] else link["oper_state"]
            label = "\n".join([link["name"], f"{link['kind']} {state}", *link["addresses"]])
            color = ', color="#d33", fontcolor="#d33"' if link["down"] else ""
            out.append(f"    {_dot_str(link['id'])} [label={_dot_str(label)}{color}];")
        out.append("  }")
    for e in graph["edges"]:
        out.append(f"  {_dot_str(e['a'])} -- {_dot_str(e['b'])} [{_EDGE_STYLE[e['kind']]}];")
    out.append("}")
    return "\n".join(out) + "\n"


# --- SVG, laid out here -------------------------------------------------------------

_BOX_W = 250
_GAP = 50
_HEAD = 24
_ROW = 16
_PAD = 8


def _rows(link: dict[str, Any]) -> int:
    return 1 + len(link["addresses"])


def to_svg(graph: dict[str, Any]) -> str:
    """The graph as a standalone SVG: namespace boxes on a grid, edges between link rows."""
    nss = graph["namespaces"]
    cols = max(1, min(len(nss), math.ceil(math.sqrt(len(nss) * 1.5))))
    heights = [_HEAD + _PAD + _ROW * sum(_rows(lk) for lk in ns["links"]) for ns in nss]
    row_h = [
        max(heights[i : i + cols], default=0) for i in range(0, len(nss), cols)
    ]  # per grid row
    pos: dict[str, tuple[float, float, float]] = {}  # link id -> (left x, right x, y)
    body: list[str] = []
    y0 = _GAP / 2
    for r, h in enumerate(row_h):
        for c in range(cols):
            i = r * cols + c
            if i >= len(nss):
                break
            ns = nss[i]
            x = _GAP / 2 + c * (_BOX_W + _GAP)
            body.append(
                f'<g class="ns"><rect x="{x}" y="{y0}" width="{_BOX_W}" height="{heights[i]}" '
                'rx="6" fill="#f6f8fb" stroke="#8a94a6"/>'
                f'<text x="{x + _PAD}" y="{y0 + 16}" class="nsname">{escape(ns["name"])}</text>'
            )
            y = y0 + _HEAD + _ROW - 4
            for link in ns["links"]:
                cls = "link down" if link["down"] else "link"
                state = "DOWN" if not link["admin_up"] else link["oper_state"]
                indent = 12 if link["master"] else 0
                body.append(
                    f'<text x="{x + _PAD + indent}" y="{y}" class={quoteattr(cls)}>'
                    f'{escape(link["name"])} <tspan class="meta">{escape(link["kind"])} '
                    f"{escape(state)}</tspan></text>"
                )
                pos[link["id"]] = (x, x + _BOX_W, y - 4)
                for a in link["addresses"]:
                    y += _ROW
                    body.append(
                        f'<text x="{x + _PAD + indent + 10}" y="{y}" class="addr">'
                        f"{escape(a)}</text>"
                    )
                y += _ROW
            body.append("</g>")
        y0 += h + _GAP
    lines = []
    for e in graph["edges"]:
        # Bridge ports are drawn indented under their bridge, in the same box.
        if e["a"] not in pos or e["b"] not in pos or e["kind"] == "master":
            continue
        (al, ar, ay), (bl, br, by) = pos[e["a"]], pos[e["b"]]
        if abs(al - bl) < 1:  # same column: loop out on the right
            x1, x2, bend = ar, br, 40.0
            d = f"M{x1},{ay} C{x1 + bend},{ay} {x2 + bend},{by} {x2},{by}"
        else:
            x1, x2 = (ar, bl) if al < bl else (al, br)
            mid = (x1 + x2) / 2
            d = f"M{x1},{ay} C{mid},{ay} {mid},{by} {x2},{by}"
        lines.append(f'<path class="edge {e["kind"]}" d="{d}"/>')
    width = _GAP + cols * (_BOX_W + _GAP)
    height = max(y0, 100.0)
    style = (
        "text{font-family:sans-serif;font-size:12px;fill:#1f2937}"
        ".nsname{font-weight:bold;font-size:13px}.meta{fill:#6b7280;font-size:10px}"
        ".addr{fill:#374151;font-size:10px}.down,.down .meta{fill:#d33}"
        ".edge{fill:none;stroke-width:2}.veth{stroke:#3367d6}"
        ".parent{stroke:#777;stroke-dasharray:6 4}.master{stroke:#999;stroke-dasharray:2 3}"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><style>{style}</style>'
        f'<rect width="100%" height="100%" fill="#ffffff"/>'
        # Edges first: one that crosses a box passes behind it, not over its text.
        + "".join(lines)
        + "".join(body)
        + "</svg>\n"
    )
