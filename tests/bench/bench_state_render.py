"""The state document's render per model version, as a host link flaps (no root needed).

    .venv/bin/python -m tests.bench.bench_state_render -n 1000 --flaps 300   # ~30 s

The synthetic model of bench_metrics (the host and N namespaces joined by
veths), plus what the kernel gives each host end once it is up: an IPv6
link-local address and three routes (fe80::/64, its local /128, ff00::/8).
A random host end is set down (its address and routes go, the peer inside
shows LOWERLAYERDOWN), a version, then up again, a version; each version is
rendered by :class:`nswatch.render_cache.StateRenderer` (what ``GET
/api/v1/state`` sends) and, in the same run, by the plain
``json_bytes(state_json(model))`` it must equal. Figures: the median and
p90 of each per version, and their ratio.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from dataclasses import replace

from nswatch.gcschedule import NEVER
from nswatch.model import (
    Address,
    AddressDel,
    AddressNew,
    Event,
    LinkNew,
    Model,
    Route,
    RouteDel,
    RouteNew,
)
from nswatch.render_cache import StateRenderer, json_bytes
from nswatch.state import state_json
from tests.bench.bench_metrics import HOST, synthetic


def link_local(i: int) -> tuple[Address, tuple[Route, ...]]:
    """Host end ``i``'s link-local address and the routes the kernel adds with it."""
    index = 100 + i
    return Address(index, "inet6", f"fe80::{i:x}:1", 64, "link"), (
        Route(254, "inet6", "unicast", "fe80::/64", dev=index, protocol="kernel", priority=256),
        Route(
            255, "inet6", "local", f"fe80::{i:x}:1/128", dev=index, protocol="kernel", priority=0
        ),
        Route(255, "inet6", "multicast", "ff00::/8", dev=index, protocol="kernel", priority=256),
    )


def scene(n: int, with_link_local: bool) -> Model:
    live = synthetic(n)
    for i in range(n if with_link_local else 0):
        address, routes = link_local(i)
        live.apply(AddressNew(HOST, address))
        for r in routes:
            live.apply(RouteNew(HOST, r))
    return live


def flap(live: Model, i: int, with_link_local: bool) -> tuple[list[Event], list[Event]]:
    """Host end ``i`` set down, then up: the events of each version."""
    link = live.namespaces[HOST].links[100 + i]
    inner = live.namespaces[1000 + i].links[2]
    address, routes = link_local(i)
    if not with_link_local:
        return (
            [
                LinkNew(HOST, replace(link, admin_up=False, oper_state="DOWN")),
                LinkNew(1000 + i, replace(inner, oper_state="LOWERLAYERDOWN")),
            ],
            [LinkNew(HOST, link), LinkNew(1000 + i, inner)],
        )
    down: list[Event] = [
        LinkNew(HOST, replace(link, admin_up=False, oper_state="DOWN")),
        AddressDel(HOST, address),
        *(RouteDel(HOST, r) for r in routes),
        LinkNew(1000 + i, replace(inner, oper_state="LOWERLAYERDOWN")),
    ]
    up: list[Event] = [
        LinkNew(HOST, link),
        AddressNew(HOST, address),
        *(RouteNew(HOST, r) for r in routes),
        LinkNew(1000 + i, inner),
    ]
    return down, up


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", type=int, default=1000, help="namespaces (default 1000)")
    p.add_argument("--flaps", type=int, default=300, help="down-up flaps (two versions each)")
    p.add_argument(
        "--no-link-local",
        action="store_true",
        help="host ends without their link-local address and routes (as bench_metrics builds them)",
    )
    args = p.parse_args()
    with_ll = not args.no_link_local
    live = scene(args.n, with_ll)
    renderer = StateRenderer()  # as the daemon makes it
    view = live.snapshot()
    renderer.render_chunks(view)
    # The daemon's collector once synced (nswatch.gcschedule): what exists is
    # collected and frozen, and no full collection runs on its own.
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, NEVER)
    rnd = random.Random(1)
    cached: list[float] = []
    plain: list[float] = []
    for _ in range(args.flaps):
        for batch in flap(live, rnd.randrange(args.n), with_ll):
            for ev in batch:
                live.apply(ev)
            view = live.snapshot(view)
            t0 = time.perf_counter()
            chunks = renderer.render_chunks(view)
            t1 = time.perf_counter()
            whole = json_bytes(state_json(view))
            t2 = time.perf_counter()
            cached.append(t1 - t0)
            plain.append(t2 - t1)
            if len(cached) <= 4 and b"".join(chunks.parts) != whole:
                print("the cached render differs from the plain one", file=sys.stderr)
                return 1

    def p90(xs: list[float]) -> float:
        return sorted(xs)[int(0.9 * len(xs))]

    c, q = statistics.median(cached), statistics.median(plain)
    print(
        f"{args.n} namespaces, {len(cached)} versions, {len(whole) / 1e6:.1f} MB each: "
        f"StateRenderer median {c * 1e3:.2f} ms (p90 {p90(cached) * 1e3:.2f}), "
        f"plain render {q * 1e3:.2f} ms (p90 {p90(plain) * 1e3:.2f}); ratio {c / q:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
