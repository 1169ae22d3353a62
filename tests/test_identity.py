"""One namespace, one label: unique labels, a name index of exactly the live names, escaping."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from nswatch.model import Model, NamespaceGone, NamespaceRenamed, NamespaceSeen
from nswatch.naming import anonymous_name, escape, parse_cgroup, unescape
from nswatch.state import state_json

HOST, A, B = 4026531840, 4026532001, 4026532002


def labels(m: Model) -> dict[int, str]:
    return {inode: ns.name for inode, ns in m.namespaces.items()}


def test_host_label_belongs_to_the_host() -> None:
    """A namespace named like the host label gets its own label; the host keeps its label and state."""
    m = Model()
    m.apply(NamespaceSeen(HOST, ("x",), is_host=True))
    m.apply(NamespaceSeen(A, ("x",)))
    assert labels(m) == {HOST: "x", A: f"x@{A}"}
    host = m.get("x")
    assert host is not None and host.is_host
    assert set(state_json(m)["namespaces"]) == {"x", f"x@{A}"}


def test_host_takes_its_label_back() -> None:
    """A namespace that took the host label before the host arrived is relabelled, and says so."""
    m = Model()
    m.apply(NamespaceSeen(A, ("x",)))
    out = m.apply(NamespaceSeen(HOST, ("x",), is_host=True))
    assert labels(m) == {HOST: "x", A: f"x@{A}"}
    renamed = [c for c in out if isinstance(c, NamespaceRenamed)]
    assert renamed == [NamespaceRenamed(f"x@{A}", A, ("x",), ("x",), False, "x")]


def test_one_file_name_in_two_directories() -> None:
    """Two namespaces with one name get distinct labels, and the name finds whichever lives."""
    m = Model()
    m.apply(NamespaceSeen(HOST, ("host",), is_host=True))
    m.apply(NamespaceSeen(A, ("a",)))
    m.apply(NamespaceSeen(B, ("a",)))
    assert labels(m)[A] == "a" and labels(m)[B] == f"a@{B}"
    m.apply(NamespaceGone(B))
    assert m.get("a") is m.namespaces[A]
    m.apply(NamespaceSeen(B, ("a",)))
    m.apply(NamespaceGone(A))
    survivor = m.get("a")
    assert survivor is not None and survivor.inode == B
    # Its label does not move because the other one went.
    assert survivor.name == f"a@{B}" and m.get(f"a@{B}") is survivor


def test_name_index_holds_exactly_the_live_names() -> None:
    """A thousand names seen and gone leave nothing behind in the index."""
    m = Model()
    m.apply(NamespaceSeen(HOST, ("host",), is_host=True))
    for i in range(1000):
        m.apply(NamespaceSeen(A + i, (f"n{i}", f"alias{i}")))
        m.apply(NamespaceSeen(A + i, (f"renamed{i}",)))
        m.apply(NamespaceGone(A + i))
    assert m.by_name == {"host": HOST}
    assert m.by_label == {"host": HOST}


def test_lookup_by_any_name_and_by_inode() -> None:
    """A namespace is found by its label, each of its names, and its inode in decimal."""
    m = Model()
    m.apply(NamespaceSeen(HOST, ("host",), is_host=True))
    m.apply(NamespaceSeen(A, ("a", "b")))
    ns = m.namespaces[A]
    assert m.get("a") is ns and m.get("b") is ns and m.get(str(A)) is ns
    assert m.get(str(HOST)) is m.namespaces[HOST]
    assert m.get("c") is None and m.get("123") is None
    snap = m.snapshot()
    assert snap.get(str(A)) is not None and snap.get("b") is not None


def test_label_kept_while_its_name_stays() -> None:
    """Gaining a name keeps the label; losing the name the label came from moves the label."""
    m = Model()
    m.apply(NamespaceSeen(A, ("b",)))
    m.apply(NamespaceSeen(A, ("a", "b")))
    assert m.namespaces[A].name == "b"
    out = m.apply(NamespaceSeen(A, ("a",)))
    assert m.namespaces[A].name == "a"
    assert isinstance(out[0], NamespaceRenamed) and out[0].old_netns == "b"
    assert "b" not in m.by_name


def test_non_utf8_names_stay_apart() -> None:
    """Two file names that differ only in bytes that are not UTF-8 escape to two distinct labels."""
    one = os.fsdecode(b"x-\xff\xfe")
    two = os.fsdecode(b"x-\xfe\xff")
    assert escape(one) == "x-\\xff\\xfe" and escape(two) == "x-\\xfe\\xff"
    assert escape("a\\b") == "a\\\\b"
    m = Model()
    m.apply(NamespaceSeen(A, (escape(one),)))
    m.apply(NamespaceSeen(B, (escape(two),)))
    assert labels(m) == {A: "x-\\xff\\xfe", B: "x-\\xfe\\xff"}
    state_json(m)["namespaces"]["x-\\xff\\xfe"]["name"].encode("utf-8")


@given(st.binary(min_size=1, max_size=40))
def test_escape_round_trips(raw: bytes) -> None:
    """Escaping is reversible and yields text that encodes as UTF-8."""
    name = os.fsdecode(raw)
    label = escape(name)
    label.encode("utf-8")
    assert unescape(label) == name and os.fsencode(unescape(label)) == raw


def test_anonymous_names_from_cgroups() -> None:
    """A holder is named by its container, else its unit, else its command and PID."""
    cid = "0123456789abcdef" * 4
    docker = parse_cgroup(f"0::/system.slice/docker-{cid}.scope\n")
    assert docker.container_id == cid
    assert anonymous_name(7, "sh", docker.unit, docker.container_id) == "container:0123456789ab"
    pod = parse_cgroup(
        "0::/kubepods.slice/kubepods-besteffort.slice/"
        "kubepods-besteffort-pod1a2b3c4d_0000_1111_2222_333344445555.slice/"
        f"cri-containerd-{cid}.scope\n"
    )
    assert pod.pod_uid == "1a2b3c4d-0000-1111-2222-333344445555" and pod.container_id == cid
    unit = parse_cgroup("0::/system.slice/foo.service\n")
    assert anonymous_name(7, "foo", unit.unit, unit.container_id) == "unit:foo.service"
    session = parse_cgroup("0::/user.slice/user-0.slice/session-3.scope\n")
    assert anonymous_name(42, "sleep", session.unit, None) == "pid:42:sleep"
    hybrid = parse_cgroup("4:memory:/x\n1:name=systemd:/system.slice/bar.service\n0::/\n")
    assert hybrid.unit == "bar.service"


NAMES = st.sampled_from(["host", "a", "b", "a@4026532001", "c"])
EVENTS = st.lists(
    st.one_of(
        st.tuples(
            st.just("seen"),
            st.integers(0, 4),
            st.lists(NAMES, min_size=1, max_size=3, unique=True),
        ),
        st.tuples(st.just("gone"), st.integers(0, 4), st.just([])),
    ),
    max_size=40,
)


@given(EVENTS)
def test_labels_unique_and_index_exact_at_every_moment(
    events: list[tuple[str, int, list[str]]],
) -> None:
    """After every event: labels are unique, the host has its label, and the index holds exactly the live names."""
    m = Model()
    m.apply(NamespaceSeen(HOST, ("host",), is_host=True))
    for kind, i, names in events:
        inode = A + i
        if kind == "seen":
            m.apply(NamespaceSeen(inode, tuple(sorted(names))))
        else:
            m.apply(NamespaceGone(inode))
        live = m.namespaces.values()
        labels = [ns.name for ns in live]
        assert len(labels) == len(set(labels))
        assert m.namespaces[HOST].name == "host"
        keys = {ns.name for ns in live} | {n for ns in live for n in ns.names}
        assert set(m.by_name) == keys
        for key, owner in m.by_name.items():
            ns = m.namespaces[owner]
            assert key == ns.name or key in ns.names
            holder = m.by_label.get(key)
            if holder is not None:
                assert owner == holder
