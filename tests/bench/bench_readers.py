"""Readers must not starve the event loop (issue 10, item 3).

    sudo .venv/bin/python -m tests.bench.bench_readers -n 1000     # ~6.5 min
    sudo .venv/bin/python -m tests.bench.bench_readers --repeat 3 --peer none   # ~10 min, medians

Builds N namespaces ``nswK{i}`` (lo up; a veth ``eth0`` whose host end
``nswKh{i}`` is up and has no address; inside, an address out of
198.18.0.0/16 and 2001:db8:c0::/48 and a default route), starts ``nswatch
run`` as a child process watching only them (``--include ^nswK``), then:

1. idle: RSS once ready, and link-change latency with no reader;
2. loaded: 16 clients looping on ``GET /api/v1/state`` and 4 on
   ``GET /metrics`` (with ``Accept-Encoding: gzip``, as Prometheus does), from
   a separate process (so their GIL is not the measuring process's), while
   host ends are set down and up (500 times: 1000 samples): the time from
   writing ``link set`` to a long-lived ``ip -batch -`` until nswatch wrote
   its ``link_changed`` log line (after applying the change to its model;
   the kernel's receive timestamp on the TCP socket that is its stderr);
   each GET's duration; RSS sampled every 0.1 s, and the peak (VmHWM);
   the memory target is read off the peak charge of a memory cgroup the
   daemon and its sender child run in (``scene.MemoryGroup``: every page
   once, when it is used; the sum of the two VmHWM is printed beside it);
3. after: RSS 20 s after the readers stopped;
4. the floor (``--peer nginx``, the default): the same readers and probe,
   for as long, against nginx serving the very documents nswatch last
   served (the state, and /metrics gzipped) as static files with sendfile,
   one worker per core: what this machine and these clients allow any
   server, so nswatch's figures are also given as ratios to it.

Everything it creates is removed at the end (and leftovers first).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.bench import scene
from tests.bench.scene import free_port, spawn_nswatch

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "nswK"
TARGETS = {"latency_p99_ms": 20.0, "state_get_p99_ms": 100.0, "rss_mb": 150.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(xs: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


# --- the scene ---------------------------------------------------------------------


def ns_name(i: int) -> str:
    return f"{PREFIX}{i}"


def host_end(i: int) -> str:
    return f"{PREFIX}h{i}"


def own() -> tuple[list[str], list[str]]:
    return scene.own_namespaces(PREFIX), scene.own_host_links(PREFIX)


def sweep() -> None:
    """Remove every namespace and host link named nswK…"""
    scene.sweep(prefix=PREFIX)


def build(n: int) -> float:
    """N namespaces (module docstring); seconds taken."""
    t0 = time.monotonic()
    lines = []
    for i in range(n):
        lines += [
            f"netns add {ns_name(i)}",
            f"link add {host_end(i)} type veth peer name eth0 netns {ns_name(i)}",
            f"link set {host_end(i)} up",
        ]
    scene.batch(lines)
    tmp = tempfile.mkdtemp(prefix="nswK-")
    files = {}
    try:
        for i in range(n):
            path = os.path.join(tmp, ns_name(i))
            a, b = divmod(4 * i, 256)
            with open(path, "w") as f:
                f.write(
                    "link set lo up\nlink set eth0 up\n"
                    f"addr add 198.18.{a}.{b + 2}/30 dev eth0\n"
                    f"addr add 2001:db8:c0:{i:x}::2/64 dev eth0 nodad\n"
                    f"route add default via 198.18.{a}.{b + 1}\n"
                )
            files[ns_name(i)] = path
        scene.parallel_batches(files, jobs=8)
    finally:
        for path in files.values():
            os.unlink(path)
        os.rmdir(tmp)
    return time.monotonic() - t0


# --- nswatch -----------------------------------------------------------------------


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("qq")


class Nswatch:
    """``nswatch run`` as a child process; its JSON log is read for ``link_changed`` lines.

    Its stderr is a TCP loopback socket with kernel receive timestamps
    (SO_TIMESTAMPNS; a pipe or a Unix socket has none): a line's time is
    when nswatch wrote it, not when this process, on the same busy two
    cores, got round to reading it. The reading time is kept too.
    """

    def __init__(
        self, extra: list[str], src: Path = ROOT, cgroup: scene.MemoryGroup | None = None
    ) -> None:
        self.port = free_port()
        listener = socket.create_server(("127.0.0.1", 0))
        theirs = socket.create_connection(listener.getsockname())
        self._log, _ = listener.accept()
        listener.close()
        self._log.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.proc = spawn_nswatch(
            self.port,
            "--include",
            f"^{PREFIX}",
            "--log-format",
            "json",
            *extra,
            src=src,
            stderr=theirs.fileno(),
            cgroup=cgroup.path if cgroup is not None else None,
        )
        theirs.close()
        self.pid = self.proc.pid
        self._want: tuple[str, bool] | None = None
        self._seen = threading.Event()
        self.seen_at = (0.0, 0.0)  # (written: wall clock, read: monotonic)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        tail = b""
        while True:
            data, anc, _, _ = self._log.recvmsg(1 << 20, socket.CMSG_SPACE(_TIMESPEC.size))
            if not data:
                return
            t_read = time.monotonic()
            written = _stamp(anc)
            *lines, tail = (tail + data).split(b"\n")
            want = self._want
            if want is None:
                continue
            for line in lines:
                if b"link_changed" not in line:
                    continue
                with contextlib.suppress(ValueError):
                    d = json.loads(line)
                    if (
                        d.get("netns") == "host"
                        and d.get("link") == want[0]
                        and d.get("admin_up") is want[1]
                    ):
                        self.seen_at = (written, t_read)
                        self._want = None
                        self._seen.set()

    def expect(self, link: str, up: bool) -> None:
        self._seen.clear()
        self._want = (link, up)

    def wait_seen(self, timeout: float) -> tuple[float, float] | None:
        """When the awaited line was written (wall clock) and read here (monotonic)."""
        return self.seen_at if self._seen.wait(timeout) else None

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError("nswatch exited")
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    return time.monotonic() - t0
            time.sleep(0.05)
        raise TimeoutError("not ready")

    def stop(self) -> float:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        self._log.close()
        return time.monotonic() - t0


def _stamp(anc: list[tuple[int, int, bytes]]) -> float:
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            sec, nsec = _TIMESPEC.unpack(raw[: _TIMESPEC.size])
            return float(sec + nsec / 1e9)
    raise RuntimeError("no receive timestamp on nswatch's log socket")


# --- readers (a child process) -----------------------------------------------------


def readers_child(
    port: int, state: int, metrics: int, state_gzip: bool, out: str, gap: float = 0.0
) -> None:
    """Loop GETs (``gap`` s apart) until SIGTERM; then write each GET's duration per path to ``out``."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    times: dict[str, list[float]] = {"/api/v1/state": [], "/metrics": []}
    # Until the response head arrived: the server's part, without the transfer.
    heads: dict[str, list[float]] = {"/api/v1/state": [], "/metrics": []}
    sizes: dict[str, int] = {}
    errors = [0]

    def loop(path: str, gz: bool) -> None:
        headers = {"Accept-Encoding": "gzip"} if gz else {}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                t_head = time.monotonic()
                body = resp.read()
                if resp.status != 200:
                    errors[0] += 1
                    time.sleep(0.01)
                    continue
            except (OSError, http.client.HTTPException):
                errors[0] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            times[path].append((time.monotonic() - t0) * 1000)
            heads[path].append((t_head - t0) * 1000)
            sizes[path] = len(body)
            if gap:
                stop.wait(gap)
        conn.close()

    threads = [
        threading.Thread(target=loop, args=("/api/v1/state", state_gzip)) for _ in range(state)
    ] + [threading.Thread(target=loop, args=("/metrics", True)) for _ in range(metrics)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(out, "w") as f:
        json.dump({"times": times, "heads": heads, "sizes": sizes, "errors": errors[0]}, f)


# --- measurements ------------------------------------------------------------------


def flips(nsw: Nswatch, n: int, changes: int, gap: float) -> tuple[list[float], list[float]]:
    """Set random host ends down then up; ms from the write to nswatch logging it, and to here.

    The first list ends when nswatch wrote its ``link_changed`` line (after
    the model took the change): the figure the targets are about. The
    second ends when this process read that line, its own delays included.
    """
    ip = subprocess.Popen(
        ["ip", "-force", "-batch", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert ip.stdin is not None
    rng = random.Random(10)
    out: list[float] = []
    read: list[float] = []
    missed = 0
    try:
        for _ in range(changes):
            h = host_end(rng.randrange(n))
            for state in ("down", "up"):
                nsw.expect(h, state == "up")
                wall0, t0 = time.time(), time.monotonic()
                ip.stdin.write(f"link set {h} {state}\n")
                ip.stdin.flush()
                seen = nsw.wait_seen(30)
                if seen is None:
                    missed += 1
                else:
                    out.append((seen[0] - wall0) * 1000)
                    read.append((seen[1] - t0) * 1000)
                time.sleep(gap)
    finally:
        ip.stdin.close()
        ip.wait(10)
    if missed:
        log(f"  {missed} changes not seen within 30 s")
    return out, read


def machine_cpu() -> tuple[int, int]:
    """(idle, all) CPU ticks of the whole machine so far (/proc/stat; iowait counts as idle)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return ticks[3] + ticks[4], sum(ticks)


def idle_pct(since: tuple[int, int]) -> float:
    """Percent of the machine's CPU time idle since ``since`` (a :func:`machine_cpu`)."""
    idle, total = machine_cpu()
    return 100 * (idle - since[0]) / max(1, total - since[1])


def children(pid: int) -> list[int]:
    """``pid``'s child processes (nswatch's body sender, once it has sent a big body)."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(k) for k in f.read().split())
    return kids


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(OSError, KeyError):
                self.samples.append(rss_mb(self.pid))

    def stop(self) -> list[float]:
        self._stop.set()
        self._t.join()
        return self.samples


NGINX_CONF = """\
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
daemon off;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  keepalive_timeout 120;
  client_body_temp_path {tmp}/temp;
  proxy_temp_path {tmp}/temp;
  fastcgi_temp_path {tmp}/temp;
  uwsgi_temp_path {tmp}/temp;
  scgi_temp_path {tmp}/temp;
  server {{
    listen 127.0.0.1:{port};
    location = /api/v1/state {{ default_type application/json; alias {tmp}/state.json; }}
    location = /metrics {{
      default_type text/plain;
      add_header Content-Encoding gzip;
      alias {tmp}/metrics.gz;
    }}
  }}
}}
"""


def fetch(port: int, path: str, gzip: bool = False) -> bytes:
    """One GET's body (gzip as sent, if asked for)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers={"Accept-Encoding": "gzip"} if gzip else {})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: {resp.status}")
        return body
    finally:
        conn.close()


@contextlib.contextmanager
def nginx_peer(state: bytes, metrics_gz: bytes) -> Iterator[int]:
    """nginx serving ``state`` and ``metrics_gz`` (sent as gzip) on a free port."""
    if shutil.which("nginx") is None:
        raise SystemExit("--peer nginx needs nginx: apt-get install nginx-light (or --peer none)")
    tmp = tempfile.mkdtemp(prefix="nswK-nginx-")
    # nginx's workers run as an unprivileged user: they must be able to read.
    os.chmod(tmp, 0o755)
    proc = None
    try:
        os.mkdir(os.path.join(tmp, "temp"))
        Path(tmp, "state.json").write_bytes(state)
        Path(tmp, "metrics.gz").write_bytes(metrics_gz)
        port = free_port()
        conf = Path(tmp, "nginx.conf")
        conf.write_text(NGINX_CONF.format(workers=os.cpu_count() or 1, tmp=tmp, port=port))
        proc = subprocess.Popen(["nginx", "-c", str(conf)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if fetch(port, "/api/v1/state") == state:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start (see {tmp}/error.log)")
            time.sleep(0.05)
        yield port
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


class Readers:
    """The looping readers' process and the probe's, against one port (module docstring)."""

    def __init__(self, port: int, args: argparse.Namespace) -> None:
        self.out = tempfile.mktemp(prefix="nswK-readers-", suffix=".json")
        self.probe_out = tempfile.mktemp(prefix="nswK-probe-", suffix=".json")
        me = [sys.executable, "-m", "tests.bench.bench_readers", "--child", str(port)]
        self.child = subprocess.Popen(
            [*me, self.out, "--state-clients", str(args.state_clients)]
            + ["--metrics-clients", str(args.metrics_clients)]
            + (["--state-gzip"] if args.state_gzip else []),
            cwd=ROOT,
        )
        # One more client in a process of its own, a GET every 0.2 s: how
        # long the server takes to answer, without 20 client threads
        # sharing one interpreter's lock on the reading side.
        self.probe = subprocess.Popen(
            [*me, self.probe_out, "--state-clients", "1", "--metrics-clients", "0"]
            + ["--pause", "0.2"]
            + (["--state-gzip"] if args.probe_gzip else []),
            cwd=ROOT,
        )

    def stop(self) -> dict[str, Any]:
        """Stop both; each path's GET figures, and the probe's."""
        for c in (self.child, self.probe):
            c.send_signal(signal.SIGTERM)
        self.child.wait(120)
        self.probe.wait(120)
        with open(self.out) as f:
            got = json.load(f)
        with open(self.probe_out) as f:
            probe_got = json.load(f)
        os.unlink(self.out)
        os.unlink(self.probe_out)
        probed = probe_got["times"]["/api/v1/state"]
        probe_heads = probe_got["heads"]["/api/v1/state"]
        res: dict[str, Any] = {
            "probe /api/v1/state": {
                "requests": len(probed),
                "p50_ms": pct(probed, 50),
                "p99_ms": pct(probed, 99),
                "max_ms": max(probed, default=float("nan")),
                "head_p50_ms": pct(probe_heads, 50),
                "head_p99_ms": pct(probe_heads, 99),
            }
        }
        for path, xs in got["times"].items():
            res[f"get {path}"] = {
                "requests": len(xs),
                "p50_ms": pct(xs, 50),
                "p99_ms": pct(xs, 99),
                "max_ms": max(xs, default=float("nan")),
                "head_p99_ms": pct(got["heads"][path], 99),
                "bytes": got["sizes"].get(path),
            }
        res["reader_errors"] = got["errors"]
        return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"n": args.n, "src": args.nswatch_src, "load_before": os.getloadavg()}
    res["options"] = {"state_gzip": args.state_gzip, "probe_gzip": args.probe_gzip}
    log(f"building {args.n} namespaces")
    res["build_s"] = build(args.n)
    group = scene.MemoryGroup(f"nswatch-bench-{PREFIX}")
    nsw = Nswatch(args.nswatch_arg or [], Path(args.nswatch_src), group)
    try:
        res["ready_s"] = nsw.wait_ready(300)
        time.sleep(3)
        res["rss_idle_mb"] = rss_mb(nsw.pid)
        res["cgroup_idle_mb"] = group.usage_mb()
        log(f"ready in {res['ready_s']:.1f} s, RSS {res['rss_idle_mb']:.0f} MB; idle flips")
        idle, _ = flips(nsw, args.n, args.changes // 2, args.gap)
        res["idle_latency_ms"] = {"p50": pct(idle, 50), "p99": pct(idle, 99), "max": max(idle)}
        log(f"  idle {res['idle_latency_ms']}; readers start")
        readers = Readers(nsw.port, args)
        # Whether serving more would need more CPU than the machine has
        # (nginx leaves it ~4 % idle) or the server is what holds back.
        cpu0, nsw_cpu0 = machine_cpu(), process_cpu_s(nsw.pid)
        sampler = RssSampler(nsw.pid)
        time.sleep(2)
        t_loaded = time.monotonic()
        loaded, loaded_read = flips(nsw, args.n, args.changes, args.gap)
        res["load_during"] = os.getloadavg()
        res.update(readers.stop())
        res["machine_idle_pct"] = idle_pct(cpu0)
        res["nswatch_cpu_s"] = process_cpu_s(nsw.pid) - nsw_cpu0
        # The body sender's child starts on the first big GET, so all its
        # CPU is the loaded phase's; its peak counts toward the memory target.
        kids = children(nsw.pid)
        res["children"] = len(kids)
        res["children_cpu_s"] = sum(process_cpu_s(k) for k in kids)
        res["children_vmhwm_mb"] = sum(rss_mb(k, "VmHWM") for k in kids)
        loaded_s = time.monotonic() - t_loaded + 2
        rss = sampler.stop()
        res["loaded_latency_ms"] = {
            "p50": pct(loaded, 50),
            "p99": pct(loaded, 99),
            "max": max(loaded),
            "samples": len(loaded),
        }
        res["loaded_latency_read_ms"] = {
            "p50": pct(loaded_read, 50),
            "p99": pct(loaded_read, 99),
            "max": max(loaded_read),
        }
        res["rss_max_mb"] = max(rss, default=float("nan"))
        res["vmhwm_mb"] = rss_mb(nsw.pid, "VmHWM")
        res["cgroup_peak_mb"] = group.peak_mb()
        # nswatch drops its cached documents after 10 s without a reader.
        time.sleep(20)
        res["rss_after_mb"] = rss_mb(nsw.pid)
        res["children_rss_after_mb"] = sum(rss_mb(k) for k in children(nsw.pid))
        res["cgroup_after_mb"] = group.usage_mb()
        res["cgroup_after_stat_mb"] = group.stat_mb()
        docs = (fetch(nsw.port, "/api/v1/state"), fetch(nsw.port, "/metrics", gzip=True))
        res["stop_s"] = nsw.stop()
    finally:
        if nsw.proc.poll() is None:
            nsw.stop()
        group.close()
    if args.peer == "nginx":
        log(f"the floor: nginx serving the same documents for {loaded_s:.0f} s")
        with nginx_peer(*docs) as port:
            readers = Readers(port, args)
            cpu0 = machine_cpu()
            time.sleep(loaded_s)
            res["load_during_peer"] = os.getloadavg()
            res["peer nginx"] = readers.stop()
            res["peer nginx"]["machine_idle_pct"] = idle_pct(cpu0)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", type=int, default=1000, help="namespaces (default 1000)")
    p.add_argument(
        "--changes",
        type=int,
        default=500,
        help="link flips with readers (x2 events; 1000 samples make the p99 the 10th worst)",
    )
    p.add_argument("--gap", type=float, default=0.1, help="seconds between link changes")
    p.add_argument("--state-clients", type=int, default=16)
    p.add_argument("--metrics-clients", type=int, default=4)
    p.add_argument("--state-gzip", action="store_true", help="state readers accept gzip too")
    p.add_argument("--probe-gzip", action="store_true", help="the probe accepts gzip")
    p.add_argument(
        "--peer",
        choices=("nginx", "none"),
        default="nginx",
        help="the floor: the same readers, for as long, against nginx serving the same documents",
    )
    p.add_argument("--nswatch-arg", action="append", help="extra argument to nswatch run")
    p.add_argument(
        "--nswatch-src",
        default=str(ROOT),
        help="run nswatch from this checkout (before/after comparisons; default this one)",
    )
    p.add_argument("--repeat", type=int, default=1, help="whole runs; medians when more than one")
    p.add_argument("--child", nargs=2, metavar=("PORT", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--pause", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        readers_child(
            int(args.child[0]),
            args.state_clients,
            args.metrics_clients,
            args.state_gzip,
            args.child[1],
            args.pause,
        )
        return 0
    runs: list[dict[str, Any]] = []
    with scene.exclusive(PREFIX):
        for i in range(args.repeat):
            if args.repeat > 1:
                log(f"run {i + 1} of {args.repeat}")
            sweep()
            try:
                runs.append(run(args))
            finally:
                sweep()
                names, links = own()
                if names or links:
                    log(f"WARNING: left behind {names[:5]} {links[:5]}")
    print(json.dumps(runs[0] if len(runs) == 1 else {"runs": runs}, indent=2))
    for res in runs:
        print(summary(res))
    if len(runs) > 1:
        print(medians(runs))
    return 0


def _ok(value: float, target: float) -> str:
    return "ok" if value < target else "MISSED"


def peak_memory_mb(res: dict[str, Any]) -> float:
    """The service's peak memory: its cgroup's peak charge, else (no cgroup) the sum of
    the daemon's and its children's VmHWM, an upper bound (peaks added as if they came
    at once)."""
    charge = float(res["cgroup_peak_mb"])
    return charge if charge == charge else float(res["vmhwm_mb"] + res["children_vmhwm_mb"])


def summary(res: dict[str, Any]) -> str:
    """One run's figures against the targets, in a line."""
    link, probe = res["loaded_latency_ms"]["p99"], res["probe /api/v1/state"]
    memory = peak_memory_mb(res)
    line = (
        f"latency p99 {link:.1f} ms ({_ok(link, TARGETS['latency_p99_ms'])}); "
        f"state GET (probe) p99 {probe['p99_ms']:.1f} ms "
        f"({_ok(probe['p99_ms'], TARGETS['state_get_p99_ms'])}); "
        f"state GET (probe) p50 {probe['p50_ms']:.1f} ms; "
        f"peak memory {memory:.0f} MB ({_ok(memory, TARGETS['rss_mb'])}; "
        # VmHWM: the true peak, which 0.1 s samples can miss.
        f"VmHWM daemon {res['vmhwm_mb']:.0f} + sender {res['children_vmhwm_mb']:.0f} = "
        f"{res['vmhwm_mb'] + res['children_vmhwm_mb']:.0f}; daemon's sampled max "
        f"{res['rss_max_mb']:.0f}), "
        f"idle {res['rss_idle_mb']:.0f}, after {res['rss_after_mb']:.0f} "
        f"+ {res['children_rss_after_mb']:.0f} MB; "
        f"machine idle {res['machine_idle_pct']:.0f} % while loaded, nswatch used "
        f"{res['nswatch_cpu_s']:.0f} + {res['children_cpu_s']:.0f} CPU s"
    )
    peer = res.get("peer nginx")
    if peer is not None:
        floor = peer["probe /api/v1/state"]
        line += (
            f"\nfloor (nginx, the same documents and readers): probe p50 "
            f"{floor['p50_ms']:.1f} ms, p99 {floor['p99_ms']:.1f} ms; nswatch / nginx: p50 "
            f"{probe['p50_ms'] / floor['p50_ms']:.2f}x, p99 "
            f"{probe['p99_ms'] / floor['p99_ms']:.2f}x; machine idle "
            f"{peer['machine_idle_pct']:.0f} %"
        )
    return line


def medians(runs: list[dict[str, Any]]) -> str:
    """The runs' medians against the targets: one neighbour's burst on this shared
    machine moves one run's p99, not the median of three."""
    link = statistics.median(r["loaded_latency_ms"]["p99"] for r in runs)
    probe = statistics.median(r["probe /api/v1/state"]["p99_ms"] for r in runs)
    memory = statistics.median(peak_memory_mb(r) for r in runs)
    return (
        f"medians of {len(runs)} runs: latency p99 {link:.1f} ms "
        f"({_ok(link, TARGETS['latency_p99_ms'])}); state GET (probe) p99 {probe:.1f} ms "
        f"({_ok(probe, TARGETS['state_get_p99_ms'])}); peak memory {memory:.0f} MB "
        f"({_ok(memory, TARGETS['rss_mb'])})"
    )


if __name__ == "__main__":
    sys.exit(main())
