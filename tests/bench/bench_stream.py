"""Event-stream latency with many clients connected (issue 14).

```sh
sudo .venv/bin/python -m tests.bench.bench_stream --sizes 200,1000 --clients 100 --changes 100
```

Builds bench.py's scene (N namespaces, each with a veth to the host) under
its own prefix ``nswHb`` and addresses (198.19.192.0/18, 2001:db8:b3::/48),
so it never touches a concurrent run of bench.py; starts ``nswatch run``;
connects ``--clients`` stream clients (plus ``--stuck`` that never read a
byte); then sets a random host end down and up ``--changes`` times through
one long-lived ``ip -batch -``. Latency: from writing the command to a
client's socket holding that ``link_changed`` event, for every client
(one thread, ``select`` over all sockets). Reported: p50/p99/max over all
(client, change) samples, and of the slowest client per change (fan-out).
Everything is removed at the end, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import random
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.bench import scene
from tests.bench.bench import pct
from tests.bench.scene import free_port, spawn_nswatch

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "nswHb"


def use_own_scene() -> None:
    """bench.py's scene under this benchmark's own names and addresses."""
    scene.PREFIX = PREFIX
    scene.SCENE_V4 = ipaddress.IPv4Address("198.19.192.0")
    scene.v6 = lambda i, host: f"2001:db8:b3:{i:x}::{host}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Daemon:
    """``nswatch run`` watching the scene, in a child process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = spawn_nswatch(
            self.port,
            *("--include", f"^{PREFIX}", "--log-level", "warning"),
            stderr=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError("nswatch exited")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=2) as s,
            ):
                s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return time.monotonic() - t0
            time.sleep(0.05)
        raise TimeoutError("nswatch not ready")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def connect(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.setblocking(False)
        socks.append(s)
    return socks


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("qq")


def wait_all(
    socks: list[socket.socket], pattern: re.Pattern[bytes], t0: float, timeout: float
) -> list[float | None]:
    """Seconds from ``t0`` (wall clock) until each socket had ``pattern`` (None: not in time).

    The time is the kernel's receive timestamp of the bytes that completed
    the match (SO_TIMESTAMPNS), not when this loop got round to reading
    them: with 100 sockets on a busy 2-core machine the reader's own delay
    would dominate.
    """
    got: list[float | None] = [None] * len(socks)
    tails = [b""] * len(socks)
    index = {s.fileno(): i for i, s in enumerate(socks)}
    pending = set(index)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        ready, _, _ = select.select(list(pending), [], [], 0.05)
        for fd in ready:
            i = index[fd]
            try:
                data, anc, _, _ = socks[i].recvmsg(1 << 20, socket.CMSG_SPACE(_TIMESPEC.size))
            except BlockingIOError:
                continue
            buf = tails[i] + data
            if pattern.search(buf):
                got[i] = _stamp(anc) - t0
                pending.discard(fd)
            tails[i] = buf[-600:]
    # Drain what else arrived so the next change starts from an empty socket.
    for s in socks:
        with contextlib.suppress(BlockingIOError):
            while s.recv(1 << 20):
                pass
    return got


class LinkNotifications:
    """The kernel's own link notifications in the host, timed as they arrive.

    The baseline: when a netlink listener that does nothing else learns of
    the change (a thread blocked in recv). Netlink messages carry no kernel
    receive timestamp, so this one is taken in user space and suffers the
    same scheduling delays; the difference to a client's time is what
    nswatch adds, give or take those, and without the kernel's rtnl lock,
    which other work on a shared machine holds for long stretches.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 1))  # RTMGRP_LINK
        self.sock.settimeout(0.2)
        self._stop = False
        self.seen: list[tuple[float, str | None, bool]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                if self._stop:
                    return
                continue
            t = time.time()
            off = 0
            while off + 32 <= len(data):
                length, kind = struct.unpack_from("IH", data, off)
                if kind == 16:  # RTM_NEWLINK
                    flags = struct.unpack_from("I", data, off + 24)[0]
                    self.seen.append((t, _ifname(data[off + 32 : off + length]), bool(flags & 1)))
                off += (length + 3) & ~3 if length else len(data)

    def when(self, name: str, up: bool, since: float) -> float | None:
        """When the first RTM_NEWLINK of ``name`` in that state after ``since`` arrived."""
        return next((t for t, n, u in self.seen if t >= since and n == name and u is up), None)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def _ifname(attrs: bytes) -> str | None:
    off = 0
    while off + 4 <= len(attrs):
        alen, atype = struct.unpack_from("HH", attrs, off)
        if alen < 4:
            return None
        if atype == 3:  # IFLA_IFNAME
            return attrs[off + 4 : off + alen].split(b"\0", 1)[0].decode()
        off += (alen + 3) & ~3
    return None


def _stamp(anc: list[tuple[int, int, bytes]]) -> float:
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            sec, nsec = _TIMESPEC.unpack(raw[: _TIMESPEC.size])
            return float(sec + nsec / 1e9)
    return time.time()


def measure(n: int, args: argparse.Namespace) -> dict[str, Any]:
    sc = scene.Scene(n)
    log(f"N={n}: building the scene")
    sc.build()
    time.sleep(1)
    d = Daemon()
    res: dict[str, Any] = {"n": n, "stuck": args.stuck, "phases": []}
    ip = subprocess.Popen(
        ["ip", "-force", "-batch", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    socks: list[socket.socket] = []
    stuck: list[socket.socket] = []
    try:
        res["ready_s"] = d.wait_ready(120)
        log(f"N={n}: ready in {res['ready_s']:.1f} s")
        stuck = connect(d.port, args.stuck)
        for s in stuck:  # a stuck client's socket buffers fill up early
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for clients in (int(x) for x in args.clients.split(",")):
            log(f"N={n}: {clients} clients")
            socks += connect(d.port, clients - len(socks))
            time.sleep(1)
            wait_all(socks, re.compile(rb"^$"), time.time(), 0.2)
            phase = changes(n, args, d, ip, socks)
            res["phases"].append(phase)
            log(json.dumps(phase))
    finally:
        if ip.stdin is not None:
            ip.stdin.close()
        ip.wait(10)
        for s in socks + stuck:
            s.close()
        d.stop()
        sc_sweep()
    return res


def changes(
    n: int,
    args: argparse.Namespace,
    d: Daemon,
    ip: subprocess.Popen[str],
    socks: list[socket.socket],
) -> dict[str, Any]:
    """Set random host ends down and up; latency to every client, ms."""
    res: dict[str, Any] = {"clients": len(socks)}
    rng = random.Random(14)
    kernel = LinkNotifications()
    added: list[float] = []  # client time minus the kernel's notification time
    samples: list[float] = []
    slowest: list[float] = []
    missed = 0
    cpu0 = d.cpu_seconds()
    assert ip.stdin is not None
    for k in range(args.changes):
        h = scene.host_end(rng.randrange(n))
        for state, flag in (("down", b"false"), ("up", b"true")):
            pattern = re.compile(
                rb'"netns":"host","link":"' + h.encode() + rb'","ifindex":\d+,'
                rb'"kind":"veth","admin_up":' + flag
            )
            t0 = time.time()
            ip.stdin.write(f"link set {h} {state}\n")
            ip.stdin.flush()
            got = wait_all(socks, pattern, t0, 5)
            ok = [g * 1000 for g in got if g is not None]
            sent = kernel.when(h, state == "up", t0)
            if sent is not None:
                added += [x - (sent - t0) * 1000 for x in ok]
            missed += len(got) - len(ok)
            samples += ok
            if ok:
                slowest.append(max(ok))
            time.sleep(args.gap)
        if k % 25 == 24:
            log(f"N={n}: {k + 1}/{args.changes} changes")
    res["daemon_cpu_s"] = d.cpu_seconds() - cpu0
    res["samples"] = len(samples)
    res["missed"] = missed
    kernel.close()
    for name, xs in (("all", samples), ("slowest_client", slowest), ("after_kernel", added)):
        for q in (50, 90, 99):
            res[f"{name}_p{q}_ms"] = pct(xs, q) if xs else None
        res[f"{name}_max_ms"] = max(xs, default=None)
    return res


def sc_sweep() -> None:
    scene.sweep()
    left = scene.own_namespaces() + scene.own_host_links()
    if left:
        log(f"WARNING: left behind: {left}")


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    scene.sweep()
    try:
        yield
    finally:
        sc_sweep()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="200,1000", help="namespace counts")
    p.add_argument("--clients", default="1,100", help="stream clients that read, per phase")
    p.add_argument("--stuck", type=int, default=0, help="stream clients that never read")
    p.add_argument("--changes", type=int, default=100, help="down+up pairs per size")
    p.add_argument("--gap", type=float, default=0.1, help="seconds between changes")
    p.add_argument("--out", default="bench-results/bench_stream.json")
    args = p.parse_args(argv)
    use_own_scene()
    results = []
    with guarded():
        for n in (int(x) for x in args.sizes.split(",")):
            r = measure(n, args)
            results.append(r)
            log(json.dumps(r))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(
        "| N | clients | stuck | p50 ms | p90 ms | p99 ms | max ms | slowest p99 ms "
        "| after-kernel p50 / p99 ms | missed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for ph in r["phases"]:
            print(
                f"| {r['n']} | {ph['clients']} | {r['stuck']} | {ph['all_p50_ms']:.1f} | "
                f"{ph['all_p90_ms']:.1f} | {ph['all_p99_ms']:.1f} | {ph['all_max_ms']:.1f} | "
                f"{ph['slowest_client_p99_ms']:.1f} | {ph['after_kernel_p50_ms']:.1f} / "
                f"{ph['after_kernel_p99_ms']:.1f} | {ph['missed']} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
