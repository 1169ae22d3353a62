"""The topology graph: nodes, edges, filters, and its DOT and SVG renderings."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from nswatch.model import Address, AddressNew, Link, LinkNew, Model, NamespaceSeen, NsidLearned
from nswatch.topology import build, group_of, to_dot, to_svg

HOST, A, B = 1, 2, 3


def model() -> Model:
    """host: bridge br0 with port v10 (veth to a/eth0), eno1; b: a macvlan on host's eno1."""
    m = Model()
    m.apply(NamespaceSeen(HOST, ("host",), is_host=True))
    m.apply(NamespaceSeen(A, ("pod-1",)))
    m.apply(NamespaceSeen(B, ("pod-2",)))
    up = {"admin_up": True, "oper_state": "UP"}
    m.apply(LinkNew(HOST, Link(index=3, name="br0", kind="bridge", **up)))  # type: ignore[arg-type]
    m.apply(LinkNew(HOST, Link(index=4, name="eno1", kind="device", **up)))  # type: ignore[arg-type]
    m.apply(
        LinkNew(HOST, Link(10, "v10", "veth", master=3, peer_index=2, peer_netnsid=0, **up))  # type: ignore[arg-type]
    )
    m.apply(LinkNew(A, Link(2, "eth0", "veth", peer_index=10, peer_netnsid=0, admin_up=False)))
    m.apply(NsidLearned(HOST, 0, A))
    m.apply(LinkNew(B, Link(5, "mv0", "macvlan", parent_index=4, parent_netnsid=0, **up)))  # type: ignore[arg-type]
    m.apply(NsidLearned(B, 0, HOST))
    m.apply(AddressNew(A, Address(2, "inet", "198.18.3.2", 24)))
    m.apply(AddressNew(A, Address(2, "inet6", "fe80::1", 64, scope="link")))
    return m


def edges(graph: dict[str, object]) -> set[tuple[str, str, str]]:
    return {(e["kind"], e["a"], e["b"]) for e in graph["edges"]}  # type: ignore[attr-defined]


def test_namespaces_hold_links_and_edges_join_them() -> None:
    """Veth pairs, lower devices and bridge ports are edges between link ids across boxes."""
    g = build(model())
    assert [ns["name"] for ns in g["namespaces"]] == ["host", "pod-1", "pod-2"]
    assert edges(g) == {
        ("master", "1:10", "1:3"),
        ("parent", "3:5", "1:4"),
        ("veth", "1:10", "2:2"),
    }
    eth0 = g["namespaces"][1]["links"][0]
    assert eth0["down"] and eth0["addresses"] == ["198.18.3.2/24", "fe80::1/64"]
    assert g["namespaces"][1]["group"] == "pod"
    assert g["event_id"] == model().changes_made


def test_netns_globs_keep_only_edges_between_chosen_namespaces() -> None:
    """A filtered graph holds the matching namespaces and only the edges inside them."""
    g = build(model(), ["pod-*"])
    assert [ns["name"] for ns in g["namespaces"]] == ["pod-1", "pod-2"]
    assert edges(g) == set()
    g = build(model(), ["host", "pod-1"])
    assert edges(g) == {("master", "1:10", "1:3"), ("veth", "1:10", "2:2")}


def test_dot_has_a_cluster_per_namespace_and_red_down_links() -> None:
    """DOT output: clusters, one node per link, escaped labels, down links red, edge styles."""
    m = model()
    m.apply(NamespaceSeen(4, ('we"ird\\ns',)))
    dot = to_dot(build(m))
    assert dot.startswith("graph nswatch {") and dot.rstrip().endswith("}")
    assert dot.count("subgraph") == 4
    assert 'label="we\\"ird\\\\ns"' in dot
    eth0 = next(line for line in dot.splitlines() if line.strip().startswith('"2:2"'))
    assert 'color="#d33"' in eth0 and "198.18.3.2/24" in eth0
    assert '"1:10" -- "2:2"' in dot and "style=dashed" in dot


def test_svg_is_well_formed_with_a_path_per_edge() -> None:
    """The SVG parses as XML, names every namespace, marks down links and draws the edges between links."""
    svg = to_svg(build(model()))
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    texts = ["".join(t.itertext()) for t in root.iter(f"{ns}text")]
    assert {"host", "pod-1", "pod-2"} <= set(texts)
    # veth and lower device; the bridge port is indented under its bridge instead.
    assert sorted(p.get("class", "") for p in root.iter(f"{ns}path")) == [
        "edge parent",
        "edge veth",
    ]
    down = [t for t in root.iter(f"{ns}text") if "down" in (t.get("class") or "")]
    assert ["".join(t.itertext()).split()[0] for t in down] == ["eth0"]


def test_groups_strip_a_trailing_number() -> None:
    """Namespaces numbered alike share a group; others are their own."""
    assert [group_of(n) for n in ("pod-17", "web_3", "cni-42", "host", "ns1", "a-b")] == [
        "pod",
        "web",
        "cni",
        "host",
        "ns",
        "a-b",
    ]


def test_namespaces_come_in_natural_order_host_first() -> None:
    """pod-2 comes before pod-10, and the host before everything."""
    m = Model()
    for inode, name in enumerate(("pod-10", "pod-2", "a", "pod-1b"), start=10):
        m.apply(NamespaceSeen(inode, (name,)))
    m.apply(NamespaceSeen(1, ("zz-host",), is_host=True))
    assert [ns["name"] for ns in build(m)["namespaces"]] == [
        "zz-host",
        "a",
        "pod-1b",
        "pod-2",
        "pod-10",
    ]
