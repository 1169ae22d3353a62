"""The two hand-written codecs against the libraries they replace, side by side (``bench --codec``).

Decode: a live capture of the link, address and route dumps of a small scene
(``--codec-namespaces``, default 10, built as scene.py builds the big one):
each namespace's dumps, plus the host's messages about the scene's veth
host ends, repeated until they hold as many messages as a cold start at 1000
namespaces reads (``--codec-messages``, default 35,000). The same bytes
go through nswatch's decoder (``decode.messages`` + ``decode_dump_item``, as
a dump is read) and through pyroute2's ``MarshalRtnl.parse`` (the full
decode every pyroute2 socket, IPRoute or NDB, does), in alternation.

Encode: the synthetic 1000-namespace model of bench_metrics.py (lo and a
veth each, 2 addresses, a default route: ~57,000 samples). ``GET /metrics``
as nswatch renders it (``MetricsSink.render``: the collectors plus the fast
encoder, prometheus-client for the process and histogram part) against
prometheus-client's own encoders over the same registry, text and
OpenMetrics, in alternation; the bodies' nswatch_* lines are checked equal.

Every figure is the median of ``--repeat`` runs (at least 3) of CPU time
(``time.process_time``): all of it is single-threaded Python, and on a
shared machine wall time would also count the other processes' work.
"""

from __future__ import annotations

import gc
import socket
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from prometheus_client.exposition import generate_latest as text_latest
from prometheus_client.openmetrics.exposition import generate_latest as om_latest
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from nswatch import decode
from nswatch.model import DumpKind
from tests.bench import scene
from tests.bench.bench_metrics import synthetic_sink
from tests.bench.scene import Scene, in_netns

KINDS: tuple[DumpKind, ...] = ("link", "address", "route")
OM = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def _dump(sock: socket.socket, what: DumpKind) -> list[bytes]:
    """The datagrams of one dump (all families), up to NLMSG_DONE."""
    sock.send(decode.dump_request(what, 0, 1))
    out: list[bytes] = []
    while True:
        data = sock.recv(1 << 20)
        out.append(data)
        if any(m.type in (decode.NLMSG_DONE, decode.NLMSG_ERROR) for m in decode.messages(data)):
            return out


def _dump_all() -> dict[DumpKind, list[bytes]]:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as sock:
        return {k: _dump(sock, k) for k in KINDS}


def _raw_messages(data: bytes) -> list[tuple[decode.Message, bytes]]:
    """Each message of a datagram with its own bytes (header included)."""
    out = []
    off = 0
    for m in decode.messages(data):
        size = 16 + len(m.body)
        out.append((m, data[off : off + size]))
        off += (size + 3) & ~3
    return out


def _host_side(hosts: set[str]) -> dict[DumpKind, list[bytes]]:
    """The host namespace's messages about the scene's veth host ends, regrouped into datagrams.

    The host holds other objects (and other users' on a shared machine): only
    the ends, their addresses and their routes belong to the mix.
    """
    dumps = _dump_all()
    ours: dict[DumpKind, list[bytes]] = {k: [] for k in KINDS}
    indexes: set[int] = set()
    for data in dumps["link"]:
        for m, raw in _raw_messages(data):
            if m.type == decode.RTM_NEWLINK and decode.decode_link(m).name in hosts:
                indexes.add(decode.link_index(m))
                ours["link"].append(raw)
    for data in dumps["address"]:
        for m, raw in _raw_messages(data):
            a = decode.decode_address(m) if m.type == decode.RTM_NEWADDR else None
            if a is not None and a.link in indexes:
                ours["address"].append(raw)
    for data in dumps["route"]:
        for m, raw in _raw_messages(data):
            r = decode.decode_route(m) if m.type == decode.RTM_NEWROUTE else None
            if r is not None and r.dev in indexes:
                ours["route"].append(raw)
    # Padded to 4 bytes, as the kernel packs them.
    return {
        k: [b"".join(raw + b"\0" * (-len(raw) % 4) for raw in msgs)] if msgs else []
        for k, msgs in ours.items()
    }


def capture(names: list[str], hosts: set[str]) -> dict[DumpKind, list[bytes]]:
    """The datagrams of the link, address and route dumps of these namespaces and host ends."""
    out = _host_side(hosts)
    for ns in names:
        for k, datagrams in in_netns(f"{scene.NETNS_DIR}/{ns}", _dump_all).items():
            out[k] += datagrams
    return out


def count(datagrams: list[bytes]) -> int:
    return sum(1 for d in datagrams for m in decode.messages(d) if m.type > decode.NLMSG_DONE)


def scale(captured: dict[DumpKind, list[bytes]], target: int) -> dict[DumpKind, list[bytes]]:
    """The captured namespaces' datagrams repeated (in the same mix) to about ``target`` messages."""
    per_ns = sum(count(d) for d in captured.values())
    times = max(1, round(target / per_ns))
    return {k: d * times for k, d in captured.items()}


def decode_ours(datagrams: list[bytes], what: DumpKind) -> int:
    n = 0
    item = decode.decode_dump_item
    for data in datagrams:
        for m in decode.messages(data):
            if m.type > decode.NLMSG_DONE:
                item(m, what)
                n += 1
    return n


def decode_pyroute2(datagrams: list[bytes]) -> int:
    marshal = MarshalRtnl()
    n = 0
    for data in datagrams:
        for msg in marshal.parse(data):
            if msg["header"]["type"] > decode.NLMSG_DONE:
                n += 1
    return n


def timed(fn: Callable[[], object]) -> float:
    """CPU seconds of one call: single-threaded work, measured apart from the machine's other load."""
    # The previous run's garbage is not this run's cost.
    gc.collect()
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def side_by_side(
    ours: Callable[[], object], theirs: Callable[[], object], repeat: int
) -> tuple[float, float]:
    """Median seconds of each, run in alternation (so machine load hits both alike)."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeat):
        a.append(timed(ours))
        b.append(timed(theirs))
    return statistics.median(a), statistics.median(b)


def bench_decode(namespaces: int, messages: int, repeat: int) -> dict[str, Any]:
    sc = Scene(namespaces)
    sc.build()
    try:
        captured = capture(sc.names, {scene.host_end(i) for i in range(namespaces)})
    finally:
        sc.cleanup()
    data = scale(captured, messages)
    out: dict[str, Any] = {
        "captured_namespaces": namespaces,
        "captured_messages": {k: count(d) for k, d in captured.items()},
        "messages": {k: count(d) for k, d in data.items()},
    }
    for k in KINDS:
        # Both decoders see every message of the mix.
        assert decode_ours(data[k], k) == decode_pyroute2(data[k]) == out["messages"][k]
        ours, theirs = side_by_side(
            partial(decode_ours, data[k], k), partial(decode_pyroute2, data[k]), repeat
        )
        out[k] = {"nswatch_s": ours, "pyroute2_s": theirs}
    ours, theirs = side_by_side(
        lambda: [decode_ours(data[k], k) for k in KINDS],
        lambda: [decode_pyroute2(data[k]) for k in KINDS],
        repeat,
    )
    out["all"] = {"nswatch_s": ours, "pyroute2_s": theirs}
    return out


def _nswatch_lines(body: bytes) -> list[bytes]:
    return [ln for ln in body.splitlines() if ln.startswith(b"nswatch_") and b"_created" not in ln]


def bench_encode(namespaces: int, repeat: int) -> dict[str, Any]:
    _, sink = synthetic_sink(namespaces)
    text: Callable[[Any], bytes] = text_latest
    om: Callable[[Any], bytes] = om_latest
    body, _ = sink.render(None)
    assert _nswatch_lines(body) == _nswatch_lines(text(sink.registry))
    om_body, _ = sink.render(OM)
    assert _nswatch_lines(om_body) == _nswatch_lines(om(sink.registry))
    out: dict[str, Any] = {
        "namespaces": namespaces,
        "samples": sum(1 for ln in body.splitlines() if not ln.startswith(b"#")),
        "bytes": len(body),
    }
    for fmt, accept, encoder in (("text", None, text), ("openmetrics", OM, om)):
        ours, theirs = side_by_side(
            partial(sink.render, accept), partial(encoder, sink.registry), repeat
        )
        out[fmt] = {"nswatch_s": ours, "prometheus_client_s": theirs}
    return out


def run(namespaces: int, messages: int, repeat: int) -> dict[str, Any]:
    """Both comparisons, each side by side."""
    repeat = max(3, repeat)
    return {
        "repeat": repeat,
        "decode": bench_decode(namespaces, messages, repeat),
        "encode": bench_encode(1000, repeat),
    }


def table(r: dict[str, Any]) -> str:
    """The codec results as a Markdown table."""
    d, e = r["decode"], r["encode"]
    rows = [
        "| codec | input | nswatch | library | nswatch faster |",
        "|---|---|---|---|---|",
    ]
    for k in (*KINDS, "all"):
        n = sum(d["messages"].values()) if k == "all" else d["messages"][k]
        label = "cold-start mix" if k == "all" else f"{k} messages"
        ours, theirs = d[k]["nswatch_s"], d[k]["pyroute2_s"]
        rows.append(
            f"| decode ({label}) | {n} messages | {ours:.3f} s | pyroute2 {theirs:.3f} s "
            f"| {theirs / ours:.0f}× |"
        )
    for fmt in ("text", "openmetrics"):
        ours, theirs = e[fmt]["nswatch_s"], e[fmt]["prometheus_client_s"]
        rows.append(
            f"| /metrics ({fmt}) | {e['samples']} samples, {e['namespaces']} namespaces "
            f"| {ours:.3f} s | prometheus-client {theirs:.3f} s | {theirs / ours:.1f}× |"
        )
    captured = d["captured_messages"]
    note = (
        f"Decode input: the dumps of {d['captured_namespaces']} live namespaces and their "
        "host ends "
        f"({captured['link']} link, {captured['address']} address, {captured['route']} route "
        f"messages) repeated; CPU time, medians of {r['repeat']} runs, alternating."
    )
    return "\n".join(rows) + "\n\n" + note
