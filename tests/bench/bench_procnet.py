"""The per-namespace /proc poller's cost: CPU per namespace read, and its share of a core at an interval.

    sudo .venv/bin/python -m tests.bench.bench_procnet [-n 1000] [--interval 30] [--repeat 3]

Creates ``n`` namespaces (``ip -batch``, prefix nswJb; lo up, nothing
else), builds a model of them, and times full passes of
:class:`nswatch.procnet.ProcNetPoller` (``poll_once`` without spreading:
enter, read sockstat, sockstat6, snmp, netstat and the two conntrack
sysctls, come back) in CPU time of the polling thread (``time.thread_time``,
which counts the kernel's work for that thread too) and in wall time. The
share of a core is the CPU of one pass divided by the interval. Everything
is removed at the end, and first any leftovers of an interrupted run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

from nswatch.model import Model, NamespaceSeen
from nswatch.procnet import ProcNetPoller

PREFIX = "nswJb"


def ip_batch(lines: list[str]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".batch") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        subprocess.run(["ip", "-force", "-batch", f.name], check=False, capture_output=True)


def cleanup() -> None:
    names = (
        [n for n in os.listdir("/run/netns") if n.startswith(PREFIX)]
        if os.path.isdir("/run/netns")
        else []
    )
    if names:
        ip_batch([f"netns del {n}" for n in names])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=1000, help="namespaces")
    p.add_argument("--interval", type=float, default=30.0, help="poll interval for the share")
    p.add_argument("--repeat", type=int, default=3, help="full passes timed")
    args = p.parse_args()
    cleanup()
    try:
        names = [f"{PREFIX}{i}" for i in range(args.n)]
        t = time.monotonic()
        ip_batch([f"netns add {n}" for n in names])
        ip_batch([f"-n {n} link set lo up" for n in names])
        print(f"{args.n} namespaces made in {time.monotonic() - t:.1f} s")
        model = Model()
        model.apply(NamespaceSeen(os.stat("/proc/self/ns/net").st_ino, ("host",), is_host=True))
        paths: dict[int, str] = {}
        for n in names:
            path = f"/run/netns/{n}"
            inode = os.stat(path).st_ino
            paths[inode] = path
            model.apply(NamespaceSeen(inode, (n,)))
        poller = ProcNetPoller(model.copy, paths.get)
        cpu: list[float] = []
        wall: list[float] = []
        for _ in range(args.repeat):
            c, w = time.thread_time(), time.monotonic()
            poller.poll_once()
            cpu.append(time.thread_time() - c)
            wall.append(time.monotonic() - w)
        snap = poller.snapshot()
        assert len(snap.stats) == args.n + 1, (len(snap.stats), snap.errors)
        c, w = statistics.median(cpu), statistics.median(wall)
        per = c / (args.n + 1)
        print(
            f"full pass over {args.n + 1} namespaces: CPU {c * 1000:.0f} ms"
            f" ({per * 1e6:.0f} µs a namespace), wall {w * 1000:.0f} ms; medians of {args.repeat}"
        )
        print(
            f"share of one core at a {args.interval:g} s interval: {100 * c / args.interval:.2f} %"
        )
        print(f"errors: {snap.errors}")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
