"""nswatch performance benchmark against pyroute2's NDB and iproute2 (issue 6).

    sudo .venv/bin/python -m tests.bench.bench --sizes 100,1000 --repeat 3
    sudo .venv/bin/python -m tests.bench.bench --quick      # N=50, 1 run, < 1 min
    sudo .venv/bin/python -m tests.bench.bench --codec      # decode and /metrics only

Builds its own scene with ``ip -batch`` (namespaces ``nswB*``, see
scene.py), measures, removes everything (also leftovers of an earlier run)
and prints a table; the figures go to ``bench-results/bench.json``
(``--out``). Every figure is the median of ``--repeat`` runs; each ratio is
taken within the same invocation. See tests/bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import platform
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from tests.bench import codec, scene
from tests.bench.scene import (
    PREFIX,
    BatchFiles,
    NetlinkBurst,
    Scene,
    Storm,
    free_port,
    in_netns,
    spawn_nswatch,
)
from tests.kernel import diff_namespace

ROOT = Path(__file__).resolve().parents[2]

# How the storm is sent: `ip -batch` files, one `ip` per namespace, all
# started at once (the burst lasts seconds: 1000 process starts on 2 cores),
# and the same requests as raw rtnetlink messages (a burst of ~0.1 s).
BURSTS = ("ip", "netlink")

# The targets on this 2-core machine.
TARGETS = {
    "cold_start_s_1000": 3.0,
    "ndb_ratio_1000": 10.0,
    "peak_rss_mb_1000": 150.0,
    "storm_converge_s": 2.0,
    "latency_p99_ms": 10.0,
    "metrics_s_1000": 0.5,
}


def log(msg: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def pct(xs: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of xs."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def status_kb(pid: int, key: str) -> int:
    """A /proc/PID/status field in kB (or a count, for Threads)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- nswatch as a real process -------------------------------------------------------


class Nswatch:
    """``nswatch run`` in a child process, with its JSON log read line by line."""

    def __init__(self) -> None:
        self.port = free_port()
        self.t0 = time.monotonic()
        self.proc = spawn_nswatch(self.port, "--include", f"^{PREFIX}", "--log-format", "json")
        self.pid = self.proc.pid
        self.lines = 0
        self._watch: Callable[[dict[str, Any]], bool] | None = None
        self._seen = threading.Event()
        self.seen_at = 0.0
        self.tail: list[bytes] = []
        self._pending: set[tuple[str, str, str]] = set()
        self._all_seen = threading.Event()
        self.last_seen = 0.0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            t = time.monotonic()
            self.lines += 1
            self.tail = [*self.tail[-20:], line]
            if self._pending and (b'"address_' in line or b'"route_' in line):
                self._track(t, line)
            watch = self._watch
            if watch is not None and b"link_changed" in line:
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                if watch(d):
                    self.seen_at = t
                    self._watch = None
                    self._seen.set()

    def _track(self, t: float, line: bytes) -> None:
        try:
            d = json.loads(line)
        except ValueError:
            return
        kind, _, action = str(d.get("event", "")).partition("_")
        what = d.get("address") if kind == "address" else d.get("route")
        key = (action, str(d.get("netns")), str(what))
        if key in self._pending:
            self._pending.discard(key)
            self.last_seen = t
            if not self._pending:
                self._all_seen.set()

    def track(self, keys: set[tuple[str, str, str]]) -> None:
        """Watch the log for these (added|removed, netns, address or route dst)."""
        self._all_seen.clear()
        self.last_seen = 0.0
        self._pending = set(keys)

    def wait_tracked(self, timeout: float) -> float | None:
        """When the last tracked change was logged (after the model applied it)."""
        if self._all_seen.wait(timeout):
            return self.last_seen
        self._pending = set()
        return None

    def expect(self, pred: Callable[[dict[str, Any]], bool]) -> None:
        """Arm a watch for a log line (before making the change)."""
        self._seen.clear()
        self._watch = pred

    def wait_seen(self, timeout: float) -> float | None:
        """Monotonic time the expected line was read, or None."""
        return self.seen_at if self._seen.wait(timeout) else None

    def get(self, path: str, accept: str | None = None, timeout: float = 60) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Accept": accept} if accept else {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def state(self) -> tuple[bytes, dict[str, Any]]:
        status, body = self.get("/api/v1/state")
        assert status == 200, status
        return body, json.loads(body)

    def wait_ready(self, timeout: float) -> float:
        """Poll /readyz every 5 ms; seconds from process start to the first 200."""
        deadline = self.t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    "nswatch exited: " + b"".join(self.tail).decode(errors="replace")
                )
            with contextlib.suppress(OSError):
                status, _ = self.get("/readyz", timeout=5)
                if status == 200:
                    return time.monotonic() - self.t0
            time.sleep(0.005)
        raise TimeoutError(f"nswatch not ready within {timeout} s")

    def metric(self, name: str) -> float:
        """Sum of a metric's samples in /metrics (0 if absent)."""
        _, body = self.get("/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name) and line[len(name)] in " {":
                total += float(line.rsplit(" ", 1)[1])
        return total

    def fds(self) -> list[str]:
        out = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):
                out.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
        return out

    def thread_netns(self) -> set[str]:
        out = set()
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            with contextlib.suppress(OSError):
                out.add(os.readlink(f"/proc/{self.pid}/task/{tid}/ns/net"))
        return out

    def stop(self) -> float:
        """SIGTERM; seconds until it exited (killed after 10 s)."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return time.monotonic() - t0


def scene_namespaces(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state["namespaces"].items() if k.startswith(PREFIX)}


def check_complete(state: dict[str, Any], sc: Scene, addrs_per_ns: int) -> list[str]:
    """What the state lacks compared to the scene (empty: complete)."""
    problems = []
    nss = scene_namespaces(state)
    if set(nss) != set(sc.names):
        problems.append(f"namespaces: {len(nss)} of {len(sc.names)}")
    if "host" not in state["namespaces"]:
        problems.append("host missing")
    for name, ns in nss.items():
        eth0 = [link for link in ns["links"] if link["name"] == "eth0"]
        if len(ns["links"]) != 2 or not eth0 or eth0[0]["peer"] is None:
            problems.append(f"{name}: links {[(x['name'], x['peer']) for x in ns['links']]}")
        if len(ns["addresses"]) != addrs_per_ns:
            problems.append(f"{name}: {len(ns['addresses'])} addresses, kernel {addrs_per_ns}")
        if not any(r["dst"] == "default" for r in ns["routes"]):
            problems.append(f"{name}: no default route")
    pairs = [
        p
        for p in state["veth_pairs"]
        if p["a"]["link"].startswith(PREFIX) or p["b"]["link"].startswith(PREFIX)
    ]
    if len(pairs) != len(sc.names):
        problems.append(f"veth pairs: {len(pairs)} of {len(sc.names)}")
    return problems


def verify_exact(state: dict[str, Any], names: list[str], with_host: bool = True) -> list[str]:
    """Full comparison of the state with `ip -j` for these namespaces (and the host)."""

    def one(name: str) -> list[str]:
        return in_netns(f"{scene.NETNS_DIR}/{name}", lambda: diff_namespace(state, name, None))

    out: list[str] = []
    if with_host:
        out += diff_namespace(state, "host", None)
    with ThreadPoolExecutor(4) as pool:
        for d in pool.map(one, names):
            out += d
    return out


def exact_with_retry(nsw: Nswatch, names: list[str], tries: int = 3) -> tuple[bool, list[str]]:
    """Exact, allowing for other engineers' host churn between the two reads."""
    diff: list[str] = []
    for _ in range(tries):
        _, state = nsw.state()
        diff = verify_exact(state, names)
        if not diff:
            return True, []
        time.sleep(0.5)
    return False, diff[:20]


# --- iproute2 and NDB ----------------------------------------------------------------


def iproute2_cold(names: list[str]) -> tuple[float, dict[str, int]]:
    """`ip -j -n NS link/addr/route` over every namespace: seconds, totals."""
    t0 = time.monotonic()
    totals = {"links": 0, "addresses": 0, "routes": 0}
    for ns in names:
        for k, v in scene.kernel_counts(ns).items():
            totals[k] += v
    return time.monotonic() - t0, totals


class NdbChild:
    """tests.bench.ndb_probe in its own process group, read with timeouts."""

    def __init__(self, names: list[str], storm: bool) -> None:
        fd, self.names_file = tempfile.mkstemp(prefix="nswB-ndb-")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(names) + "\n")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.ndb_probe", self.names_file, str(2 * len(names))]
            + (["--storm"] if storm else []),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def read(self, event: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"NDB: no {event} within {timeout:.0f} s")
            r, _, _ = select.select([self.proc.stdout], [], [], left)
            if not r:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("NDB probe exited")
            d: dict[str, Any] = json.loads(line)
            if d["event"] == event:
                return d

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send("")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            # Our own process group: NDB's forked helpers go with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()
        os.unlink(self.names_file)


# --- the phases ----------------------------------------------------------------------


def cold_start_nswatch(sc: Scene, addrs: int, keep: bool) -> tuple[dict[str, Any], Nswatch | None]:
    nsw = Nswatch()
    try:
        ready = nsw.wait_ready(120)
        hwm = status_kb(nsw.pid, "VmHWM") / 1024
        cpu = cpu_seconds(nsw.pid)
        _, state = nsw.state()
        problems = check_complete(state, sc, addrs)
        rec = {
            "seconds": ready,
            "peak_rss_mb": hwm,
            "cpu_s": cpu,
            "complete": not problems,
            "problems": problems[:10],
        }
        log(f"  nswatch N={sc.n}: ready {ready:.2f} s, VmHWM {hwm:.0f} MB, complete={not problems}")
        if keep:
            return rec, nsw
        nsw.stop()
        return rec, None
    except BaseException:
        nsw.stop()
        raise


def cold_start_ndb(
    sc: Scene, timeout: float, storm: Storm | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    before = set(os.listdir(scene.NETNS_DIR))
    child = NdbChild(sc.names, storm is not None)
    storm_rec = None
    try:
        d = child.read("complete", timeout)
        rec = {
            "seconds": d["t"] - child.t0,
            "peak_rss_mb": d["vmhwm_kb"] / 1024,
            "tree_rss_mb": d["tree_rss_kb"] / 1024,
            "complete": True,
        }
        log(f"  NDB N={sc.n}: complete {rec['seconds']:.1f} s, VmHWM {rec['peak_rss_mb']:.0f} MB")
        if storm is not None:
            base = child.read("baseline", 30)
            storm_rec = {mode: storm_ndb(child, storm, base, mode) for mode in BURSTS}
    except TimeoutError as e:
        rec = {"seconds": None, "timeout_s": timeout, "complete": False, "error": str(e)}
        log(f"  NDB N={sc.n}: {e}")
    finally:
        child.close()
    extra = set(os.listdir(scene.NETNS_DIR)) - before
    if extra:
        rec["created_namespaces"] = sorted(extra)
    return rec, storm_rec


def storm_ndb(child: NdbChild, storm: Storm, base: dict[str, Any], mode: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for op in ("add", "del"):
        b = make_burst(storm, op, mode)
        try:
            burst = b.fire()
        finally:
            b.close()
        t_end = time.monotonic()
        want_a = base["addresses"] + (storm.addresses if op == "add" else 0)
        want_r = base["routes"] + (storm.routes if op == "add" else 0)
        child.send(f"{want_a} {want_r}")
        try:
            d = child.read("converged", 120)
            out[op] = {"burst_s": burst, "converge_s": max(0.0, d["t"] - t_end)}
        except TimeoutError:
            out[op] = {"burst_s": burst, "converge_s": None, "timeout_s": 120}
            break
        log(
            f"  NDB storm ({mode}) {op}: burst {burst:.2f} s, converged +{out[op]['converge_s']:.2f} s"
        )
    return out


class Burst(Protocol):
    def fire(self) -> float: ...
    def close(self) -> None: ...


def make_burst(storm: Storm, op: str, mode: str) -> Burst:
    """The storm's ``add`` or ``del`` half, prepared: ``ip`` batches or raw netlink."""
    if mode == "ip":
        return BatchFiles(storm.per_namespace(op))
    return NetlinkBurst(storm, op)


def storm_keys(storm: Storm, op: str) -> set[tuple[str, str, str]]:
    """The log keys of every change the storm makes."""
    action = "added" if op == "add" else "removed"
    keys = set()
    for j in range(storm.addresses):
        _, addr, plen = storm.address(j)
        keys.add((action, storm.names[j % len(storm.names)], f"{addr}/{plen}"))
    for j in range(storm.routes):
        _, dst, _ = storm.route(j)
        keys.add((action, storm.names[j % len(storm.names)], dst))
    return keys


def storm_nswatch(nsw: Nswatch, storm: Storm, names: list[str], mode: str) -> dict[str, Any]:
    """One add burst and one delete burst.

    Convergence: when nswatch has logged the last of the storm's changes (it
    logs after applying them to the model), then confirmed through
    /api/v1/state: the state fetched right after must equal `ip -j` for the
    host and every namespace (``api_exact_s``: when that fetch returned).
    Nothing polls during the storm, so nothing competes with nswatch for the
    two cores but the burst itself.
    """
    out: dict[str, Any] = {}
    overruns0 = nsw.metric("nswatch_netlink_overruns_total")
    for op in ("add", "del"):
        burst = make_burst(storm, op, mode)
        try:
            nsw.track(storm_keys(storm, op))
            burst_s = burst.fire()
        finally:
            burst.close()
        t_end = time.monotonic()
        seen = nsw.wait_tracked(60)
        t_api: float | None = None
        exact = False
        diff: list[str] = []
        for _ in range(5):
            _, state = nsw.state()
            t_fetch = time.monotonic()
            diff = verify_exact(state, names)
            if not diff:
                exact, t_api = True, t_fetch
                break
            time.sleep(0.3)
        out[op] = {
            "burst_s": burst_s,
            "converge_s": None if seen is None else max(0.0, seen - t_end),
            "last_change_after_end_s": None if seen is None else seen - t_end,
            "api_exact_s": None if t_api is None else t_api - t_end,
            "exact": exact,
            "diff": diff[:20],
        }
        conv = out[op]["converge_s"]
        log(
            f"  nswatch storm ({mode}) {op}: burst {burst_s:.2f} s, last change applied "
            f"+{conv if conv is not None else float('nan'):.2f} s, state API exact "
            f"+{out[op]['api_exact_s'] or float('nan'):.2f} s, exact={exact}"
        )
    out["overruns"] = nsw.metric("nswatch_netlink_overruns_total") - overruns0
    return out


def _link_seen(link: str, admin_up: bool) -> Callable[[dict[str, Any]], bool]:
    """A log-line predicate: the host's ``link`` changed to ``admin_up``."""

    def pred(d: dict[str, Any]) -> bool:
        return (
            d.get("event") == "link_changed"
            and d.get("netns") == "host"
            and d.get("link") == link
            and d.get("admin_up") is admin_up
        )

    return pred


class IpMonitor:
    """`ip monitor link` on the host, for the same changes (iproute2's own latency)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["ip", "monitor", "link"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._want: tuple[str, bool] | None = None
        self._seen = threading.Event()
        self.seen_at = 0.0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t = time.monotonic()
            want = self._want
            if want is None or f" {want[0]}@" not in line:
                continue
            flags = line.split("<", 1)[-1].split(">", 1)[0].split(",")
            if ("UP" in flags) is want[1]:
                self.seen_at = t
                self._want = None
                self._seen.set()

    def expect(self, link: str, up: bool) -> None:
        self._seen.clear()
        self._want = (link, up)

    def wait_seen(self, timeout: float) -> float | None:
        return self.seen_at if self._seen.wait(timeout) else None

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        self._thread.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def latency(nsw: Nswatch, sc: Scene, changes: int, gap: float) -> dict[str, Any]:
    """`ip link set HOSTEND down` (then up) to the model logging the change, ms.

    One long-lived ``ip -batch -`` takes the commands, so no process start is
    timed; the clock starts when the line is written. nswatch logs the
    ``link_changed`` line after applying the change to the model. The same
    changes are timed through `ip monitor link` for comparison. ``gap``
    seconds separate the changes.
    """
    ip = subprocess.Popen(
        ["ip", "-force", "-batch", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    mon = IpMonitor()
    assert ip.stdin is not None
    rng = random.Random(6)
    samples: dict[str, list[float]] = {"down": [], "up": [], "mon_down": [], "mon_up": []}
    missed = 0
    time.sleep(0.3)
    try:
        for k in range(changes):
            i = rng.randrange(sc.n)
            h = scene.host_end(i)
            for state in ("down", "up"):
                want = state == "up"
                nsw.expect(_link_seen(h, want))
                mon.expect(h, want)
                t0 = time.monotonic()
                ip.stdin.write(f"link set {h} {state}\n")
                ip.stdin.flush()
                t = nsw.wait_seen(5)
                tm = mon.wait_seen(1)
                if t is None:
                    missed += 1
                else:
                    samples[state].append((t - t0) * 1000)
                if tm is not None:
                    samples["mon_" + state].append((tm - t0) * 1000)
                time.sleep(gap)
            if k % 50 == 49:
                log(f"  latency (gap {gap * 1000:.0f} ms): {k + 1}/{changes}")
    finally:
        ip.stdin.close()
        ip.wait(10)
        mon.close()
    out: dict[str, Any] = {"changes": changes, "gap_s": gap, "missed": missed}
    for key, xs in samples.items():
        out[f"{key}_p50_ms"] = median(xs)
        out[f"{key}_p99_ms"] = pct(xs, 99) if xs else None
        out[f"{key}_max_ms"] = max(xs, default=None)
    return out


def metrics_scrape(nsw: Nswatch, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, accept in (
        ("text", None),
        ("openmetrics", "application/openmetrics-text; version=1.0.0; charset=utf-8"),
    ):
        times = []
        size = 0
        for _ in range(repeat):
            t0 = time.monotonic()
            status, body = nsw.get("/metrics", accept)
            times.append(time.monotonic() - t0)
            assert status == 200, status
            size = len(body)
        out[label] = {"seconds": median(times), "max_s": max(times), "bytes": size}
    samples = sum(1 for line in nsw.get("/metrics")[1].splitlines() if not line.startswith(b"#"))
    out["samples"] = samples
    log(
        f"  /metrics: {out['text']['seconds'] * 1000:.0f} ms, {out['text']['bytes'] / 1e6:.2f} MB,"
        f" {samples} samples"
    )
    return out


def churn(nsw: Nswatch, sc: Scene, count: int) -> dict[str, Any]:
    """Create and delete ``count`` namespaces with veths; then nothing may be left."""
    host_ns = os.readlink("/proc/self/ns/net")
    fds0 = len(nsw.fds())
    threads0 = status_kb(nsw.pid, "Threads")
    create_s, delete_s = scene.churn(count)
    t_end = time.monotonic()
    churned = {ns for ns, _ in scene.churn_names(count)}
    hosts = {h for _, h in scene.churn_names(count)}
    settled = model_clean = kernel_freed = None
    deadline = t_end + 60
    while time.monotonic() < deadline:
        _, state = nsw.state()
        in_model = churned & set(state["namespaces"])
        host_links = {link["name"] for link in state["namespaces"]["host"]["links"]}
        kernel_links = set(scene.own_host_links()) & hosts
        fds = len(nsw.fds())
        threads = status_kb(nsw.pid, "Threads")
        now = time.monotonic() - t_end
        if model_clean is None and not in_model and fds <= fds0:
            model_clean = now
        if kernel_freed is None and not kernel_links:
            kernel_freed = now
        gone = not in_model and not (host_links & hosts) and not kernel_links
        if gone and fds <= fds0 and threads <= threads0:
            settled = time.monotonic() - t_end
            break
        time.sleep(0.1)
    live = {os.stat(f"{scene.NETNS_DIR}/{n}").st_ino for n in scene.own_namespaces()}
    held = set()
    for target in nsw.fds():
        if target.startswith("net:["):
            ino = int(target[5:-1])
            if ino not in live and target != host_ns:
                held.add(target)
    exact, diff = exact_with_retry(nsw, sc.names)
    rec = {
        "count": count,
        "create_s": create_s,
        "delete_s": delete_s,
        "settled_s": settled,
        "model_clean_s": model_clean,
        "kernel_freed_s": kernel_freed,
        "fds_before": fds0,
        "fds_after": len(nsw.fds()),
        "threads_before": threads0,
        "threads_after": status_kb(nsw.pid, "Threads"),
        "host_ends_left": sorted(set(scene.own_host_links()) & hosts),
        "deleted_namespaces_held": sorted(held),
        "threads_outside_host_netns": sorted(nsw.thread_netns() - {host_ns}),
        "exact": exact,
        "diff": diff,
    }
    log(
        f"  churn {count}: create {create_s:.2f} s, delete {delete_s:.2f} s, settled "
        f"{settled if settled is not None else float('nan'):.2f} s, fds {fds0}->{rec['fds_after']}, "
        f"threads {threads0}->{rec['threads_after']}, exact={exact}"
    )
    return rec


# --- orchestration -------------------------------------------------------------------


def settle_scene(sc: Scene) -> int:
    """Wait for IPv6 DAD of the link-local addresses; the addresses per namespace."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = scene.run(["ip", "-n", sc.names[-1], "addr"])
        if "tentative" not in out:
            break
        time.sleep(0.2)
    time.sleep(0.5)
    return int(scene.kernel_counts(sc.names[-1])["addresses"])


def collect(
    values: list[dict[str, Any]], key: str, sub: str | None = None
) -> tuple[float | None, list[float]]:
    xs = []
    for v in values:
        x = v.get(key) if sub is None else (v.get(key) or {}).get(sub)
        if isinstance(x, int | float):
            xs.append(float(x))
    return (median(xs) if xs else None), xs


def run_size(
    n: int, args: argparse.Namespace, full: bool
) -> dict[str, Any]:  # the whole sequence at one N
    res: dict[str, Any] = {"n": n}
    sc = Scene(n)
    log(f"N={n}: building the scene")
    sc.build()
    try:
        addrs = settle_scene(sc)
        res["scene"] = {"build_s": sc.build_seconds, "addresses_per_namespace": addrs}
        log(f"N={n}: built in {sc.build_seconds:.1f} s")

        ip_runs = []
        for _ in range(args.repeat):
            secs, totals = iproute2_cold(sc.names)
            ip_runs.append({"seconds": secs, **totals})
            log(f"  iproute2 N={n}: {secs:.2f} s")
        res["iproute2"] = {"runs": ip_runs, "seconds": collect(ip_runs, "seconds")[0]}

        runs = []
        nsw: Nswatch | None = None
        for r in range(args.repeat):
            rec, nsw = cold_start_nswatch(sc, addrs, keep=full and r == args.repeat - 1)
            runs.append(rec)
        res["nswatch"] = {
            "runs": runs,
            "seconds": collect(runs, "seconds")[0],
            "peak_rss_mb": collect(runs, "peak_rss_mb")[0],
            "cpu_s": collect(runs, "cpu_s")[0],
            "complete": all(r["complete"] for r in runs),
        }
        storm = Storm(sc.names, args.storm_addresses or 5 * n, args.storm_routes or 2 * n)
        if nsw is not None:
            try:
                exact, diff = exact_with_retry(nsw, sc.names)
                res["nswatch"]["exact_after_start"] = exact
                res["nswatch"]["diff_after_start"] = diff
                log(f"  nswatch model exact after start: {exact}")
                # Isolated changes: each one after the previous one's IPv4
                # route re-dumps (20 and 300 ms later) are over.
                res["latency"] = latency(nsw, sc, args.changes, args.latency_gap)
                # A flapping link: the next change lands during those re-dumps.
                res["latency_flap"] = latency(nsw, sc, max(1, args.changes // 2), 0.03)
                time.sleep(3)  # IPv6 DAD on the links brought back up
                res["metrics"] = metrics_scrape(nsw, max(5, args.repeat))
                res["storm"] = {"addresses": storm.addresses, "routes": storm.routes}
                for mode in BURSTS:
                    storms = [storm_nswatch(nsw, storm, sc.names, mode) for _ in range(args.repeat)]
                    res["storm"][mode] = {
                        "runs": storms,
                        "add_converge_s": collect(storms, "add", "converge_s")[0],
                        "add_api_exact_s": collect(storms, "add", "api_exact_s")[0],
                        "del_converge_s": collect(storms, "del", "converge_s")[0],
                        "del_api_exact_s": collect(storms, "del", "api_exact_s")[0],
                        "add_burst_s": collect(storms, "add", "burst_s")[0],
                        "del_burst_s": collect(storms, "del", "burst_s")[0],
                        "overruns": sum(s["overruns"] for s in storms),
                        "exact": all(s[op]["exact"] for s in storms for op in ("add", "del")),
                    }
                churns = [churn(nsw, sc, args.churn) for _ in range(args.repeat)]
                res["churn"] = {
                    "runs": churns,
                    "settled_s": collect(churns, "settled_s")[0],
                    "clean": all(
                        c["settled_s"] is not None
                        and not c["host_ends_left"]
                        and not c["deleted_namespaces_held"]
                        and not c["threads_outside_host_netns"]
                        and c["fds_after"] <= c["fds_before"]
                        and c["threads_after"] <= c["threads_before"]
                        and c["exact"]
                        for c in churns
                    ),
                }
                res["nswatch"]["peak_rss_mb_whole_run"] = status_kb(nsw.pid, "VmHWM") / 1024
            finally:
                nsw.stop()

        if not args.no_ndb:
            ndb_runs = []
            ndb_repeat = args.ndb_repeat or (1 if n >= 500 else args.repeat)
            for r in range(ndb_repeat):
                with_storm = full and r == ndb_repeat - 1
                rec, storm_rec = cold_start_ndb(sc, args.ndb_timeout, storm if with_storm else None)
                ndb_runs.append(rec)
                if storm_rec is not None:
                    res.setdefault("storm", {})["ndb"] = storm_rec
            res["ndb"] = {
                "runs": ndb_runs,
                "seconds": collect(ndb_runs, "seconds")[0],
                "peak_rss_mb": collect(ndb_runs, "peak_rss_mb")[0],
                "tree_rss_mb": collect(ndb_runs, "tree_rss_mb")[0],
                "repeat": ndb_repeat,
            }
    finally:
        t0 = time.monotonic()
        sc.cleanup()
        log(f"N={n}: cleaned up in {time.monotonic() - t0:.1f} s")
    return res


def fmt(x: float | None, unit: str = "", digits: int = 2) -> str:
    if x is None or x != x:
        return "–"
    return f"{x:.{digits}f}{unit}"


def ratio(a: float | None, b: float | None) -> float | None:
    return b / a if a and b else None


def verdict(ok: bool | None, how: str = "") -> str:
    if ok is None:
        return "–"
    return ("met" if ok else "MISSED") + (f" ({how})" if how else "")


def table(results: dict[str, Any]) -> str:
    """The Markdown table of the latest figures."""
    rows = [
        "| measure | N | nswatch | pyroute2 NDB | iproute2 | target | |",
        "|---|---|---|---|---|---|---|",
    ]
    big = max(r["n"] for r in results["sizes"])
    for r in results["sizes"]:
        n = r["n"]
        nw, ndb, ip = r.get("nswatch", {}), r.get("ndb", {}), r.get("iproute2", {})
        s, s_ndb, s_ip = nw.get("seconds"), ndb.get("seconds"), ip.get("seconds")
        ndb_cell = (
            f"{fmt(s_ndb, ' s', 1)} ({fmt(ratio(s, s_ndb), '×', 0)} slower)"
            if s_ndb
            else ("timeout" if ndb.get("runs") else "not run")
        )
        ip_cell = (
            f"{fmt(s_ip, ' s')} (nswatch takes {fmt(ratio(s_ip, s), '×', 1)})" if s_ip else "–"
        )
        target, ok = "", None
        if n == 1000:
            t = TARGETS["cold_start_s_1000"]
            rat = ratio(s, s_ndb)
            ok = s is not None and s < t and (rat is None or rat >= TARGETS["ndb_ratio_1000"])
            target = f"< {t:.0f} s, ≥ 10× NDB"
            how = f"{t / s:.1f}× under" if s else ""
        else:
            how = ""
        rows.append(
            f"| cold start to /readyz, model complete | {n} | {fmt(s, ' s')} | {ndb_cell} "
            f"| {ip_cell} | {target} | {verdict(ok, how) if target else ''} |"
        )
        rss, rss_ndb = nw.get("peak_rss_mb"), ndb.get("peak_rss_mb")
        target, cell = "", ""
        if n == 1000:
            t = TARGETS["peak_rss_mb_1000"]
            target = f"< {t:.0f} MB"
            cell = verdict(rss is not None and rss < t, f"{t - rss:.0f} MB spare" if rss else "")
        ndb_rss = (
            f"{fmt(rss_ndb, ' MB', 0)} (+ helpers: {fmt(ndb.get('tree_rss_mb'), ' MB', 0)})"
            if rss_ndb
            else "–"
        )
        whole = nw.get("peak_rss_mb_whole_run")
        rss_cell = fmt(rss, " MB", 0) + (f" ({whole:.0f} MB by the end)" if whole else "")
        rows.append(
            f"| peak RSS (VmHWM) at ready | {n} | {rss_cell} | {ndb_rss} | – | {target} | {cell} |"
        )
    for r in results["sizes"]:
        if r["n"] != big:
            continue
        n = r["n"]
        st = r.get("storm") or {}
        t = TARGETS["storm_converge_s"]
        for mode in BURSTS:
            sm = st.get(mode)
            if not sm:
                continue
            nd = (st.get("ndb") or {}).get(mode) or {}
            how = "`ip -batch` per namespace" if mode == "ip" else "raw rtnetlink"
            for op, what in (
                ("add", f"+{st['addresses']} addresses, +{st['routes']} routes"),
                ("del", "the same removed"),
            ):
                conv, api = sm[f"{op}_converge_s"], sm[f"{op}_api_exact_s"]
                nd_conv = (nd.get(op) or {}).get("converge_s")
                ok = conv is not None and api is not None and api < t and sm["exact"]
                rows.append(
                    f"| storm: {what} ({how}, burst {fmt(sm[f'{op}_burst_s'], ' s')}); after the "
                    f"burst's end: last change in the model / state API exact | {n} "
                    f"| {fmt(conv, ' s')} / {fmt(api, ' s')}, exact={sm['exact']}, "
                    f"overruns {sm['overruns']:.0f} "
                    f"| {fmt(nd_conv, ' s') if nd else 'not run'} "
                    f"{'(' + fmt(ratio(conv, nd_conv), '×', 0) + ')' if conv and conv >= 0.01 else ''}"
                    " | – "
                    f"| < {t:.0f} s, exact | {verdict(ok)} |"
                )
        t = TARGETS["latency_p99_ms"]
        for key, label in (("latency", "isolated"), ("latency_flap", "flapping")):
            la = r.get(key)
            if not la:
                continue
            p99 = la["down_p99_ms"]
            ok = p99 is not None and p99 < t
            rows.append(
                f"| idle latency, `ip link set … down` / `up` to the model, p50 / p99 "
                f"({la['changes']} each, {label}: {la['gap_s'] * 1000:.0f} ms apart) | {n} "
                f"| down {fmt(la['down_p50_ms'], '', 1)} / {fmt(p99, ' ms', 1)}; up "
                f"{fmt(la['up_p50_ms'], '', 1)} / {fmt(la['up_p99_ms'], ' ms', 1)} | – "
                f"| `ip monitor`: down {fmt(la['mon_down_p50_ms'], '', 1)} / "
                f"{fmt(la['mon_down_p99_ms'], ' ms', 1)}; up {fmt(la['mon_up_p50_ms'], '', 1)} / "
                f"{fmt(la['mon_up_p99_ms'], ' ms', 1)} "
                f"| {'down p99 < ' + format(t, '.0f') + ' ms' if key == 'latency' else ''} "
                f"| {verdict(ok, f'{t / p99:.1f}× under' if ok and p99 else '') if key == 'latency' else ''} |"
            )
        me = r.get("metrics")
        if me:
            t = TARGETS["metrics_s_1000"]
            s = me["text"]["seconds"]
            rows.append(
                f"| GET /metrics (text; OpenMetrics {fmt(me['openmetrics']['seconds'] * 1000, ' ms', 0)})"
                f" | {n} | {fmt(s * 1000, ' ms', 0)}, {me['text']['bytes'] / 1e6:.2f} MB, "
                f"{me['samples']} samples | – | – | < {t * 1000:.0f} ms "
                f"| {verdict(s < t, f'{t / s:.1f}× under')} |"
            )
        ch = r.get("churn")
        if ch:
            c0 = ch["runs"][0]
            rows.append(
                f"| churn: {c0['count']} namespaces with veths created and deleted "
                f"(ip: {fmt(c0['create_s'], ' s')} + {fmt(c0['delete_s'], ' s')}), "
                f"all freed and model exact after | {n} | {fmt(ch['settled_s'], ' s')}, "
                f"fds {c0['fds_before']}→{c0['fds_after']}, threads "
                f"{c0['threads_before']}→{c0['threads_after']} | – | – | no leaks, exact "
                f"| {verdict(ch['clean'])} |"
            )
    return "\n".join(rows)


def machine() -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    import pyroute2

    rev = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_mb": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nswatch": rev,
        "pyroute2": pyroute2.__version__,
        "iproute2": scene.run(["ip", "-V"]).strip(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Leave nothing behind, even on Ctrl-C; one run at a time."""
    with scene.exclusive():
        scene.sweep()
        try:
            yield
        finally:
            scene.sweep()
            left = scene.own_namespaces() + scene.own_host_links()
            if left:
                log(f"WARNING: left behind: {left}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="100,1000", help="namespace counts (default 100,1000)")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    p.add_argument("--quick", action="store_true", help="N=50, 1 run, smaller storm and churn")
    p.add_argument("--out", default="bench-results/bench.json", help="JSON results file")
    p.add_argument("--no-ndb", action="store_true", help="skip pyroute2 NDB")
    p.add_argument("--ndb-repeat", type=int, default=0, help="NDB runs (default 1 at N ≥ 500)")
    p.add_argument("--ndb-timeout", type=float, default=240.0, help="seconds per NDB start")
    p.add_argument("--storm-addresses", type=int, default=0, help="default 5 per namespace")
    p.add_argument("--storm-routes", type=int, default=0, help="default 2 per namespace")
    p.add_argument("--changes", type=int, default=200, help="idle latency samples")
    p.add_argument("--latency-gap", type=float, default=0.4, help="seconds between changes")
    p.add_argument("--churn", type=int, default=200, help="namespaces created and deleted")
    p.add_argument(
        "--codec",
        action="store_true",
        help="only the decoder and /metrics encoder against pyroute2 and prometheus-client\n"
        "(a small live capture and a synthetic model; ~1 min; also part of a full run)",
    )
    p.add_argument("--codec-namespaces", type=int, default=10, help="namespaces captured")
    p.add_argument("--codec-messages", type=int, default=35000, help="messages decoded")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeat, args.changes, args.churn = "50", 1, 20, 20
    if os.geteuid() != 0:
        print("the benchmark needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    sizes = sorted(int(x) for x in args.sizes.split(","))
    results: dict[str, Any] = {
        "machine": machine(),
        "command": "sudo .venv/bin/python -m tests.bench.bench "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "targets": TARGETS,
        "sizes": [],
    }
    t0 = time.monotonic()
    with guarded():
        if not args.codec:
            for n in sizes:
                results["sizes"].append(run_size(n, args, full=n == sizes[-1]))
        log("codec: decoder and encoder against pyroute2 and prometheus-client")
        results["codec"] = codec.run(args.codec_namespaces, args.codec_messages, args.repeat)
    results["wall_s"] = time.monotonic() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    print(
        f"\nnswatch {m['nswatch']}, Python {m['python']}, pyroute2 {m['pyroute2']}, "
        f"{m['iproute2']}; Linux {m['kernel']}, {m['cores']} cores ({m['cpu']}), "
        f"{m['memory_mb']} MB; {m['date']}; medians of {args.repeat} runs\n"
    )
    if results["sizes"]:
        print(table(results) + "\n")
    print(codec.table(results["codec"]))
    print(f"\n{out} written; {results['wall_s']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
