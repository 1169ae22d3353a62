"""The benchmark's scene: N namespaces wired to the host, built with ``ip -batch``.

Everything here is named with :data:`PREFIX` (``nswB``) and uses only
198.18.0.0/15 and 2001:db8::/32:

- namespace ``nswB{i}``: lo up, ``eth0`` (a veth whose host end is
  ``nswBh{i}``), 198.19.128.0/18 carved into /30s (host end .1, namespace end
  .2), 2001:db8:b0:{i:x}::/64 (host ::1, namespace ::2), and a default route
  via the host end. No route is ever added in the host namespace.
- the storm: /32 and /128 addresses from 198.18.0.0/17 and 2001:db8:b1::/48,
  /32 and /128 routes to 198.18.128.0/17 and 2001:db8:b2::/48 via the host end.
- churn: namespaces ``nswBc{i}`` with host veth ends ``nswBch{i}``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PREFIX = "nswB"
NETNS_DIR = "/run/netns"
SCENE_V4 = ipaddress.IPv4Address("198.19.128.0")  # /18: 4096 namespaces of /30
STORM_ADDR_V4 = ipaddress.IPv4Address("198.18.0.0")  # /17
STORM_ROUTE_V4 = ipaddress.IPv4Address("198.18.128.0")  # /17
STORM_ADDR_V6 = ipaddress.IPv6Address("2001:db8:b1::")
STORM_ROUTE_V6 = ipaddress.IPv6Address("2001:db8:b2::")
MAX_NAMESPACES = 4096


ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_nswatch(
    port: int,
    *args: str,
    src: Path = ROOT,
    stderr: int = subprocess.PIPE,
    cgroup: Path | None = None,
) -> subprocess.Popen[bytes]:
    """``nswatch run`` (from the checkout at ``src``) serving on ``port``, in its own session.

    The benchmarks read its JSON log on stderr; its own session keeps a
    Ctrl-C of the benchmark from reaching it before the benchmark's cleanup.
    With ``cgroup`` (a cgroup directory), it joins that group before it
    execs, so everything it and its children ever allocate is charged there.
    """
    cmd = [sys.executable, "-m", "nswatch", "run", "--listen", f"127.0.0.1:{port}", *args]
    if cgroup is not None:
        cmd = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *cmd]
    return subprocess.Popen(
        cmd,
        cwd=src,
        env={**os.environ, "PYTHONPATH": str(src)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
    )


def ns_name(i: int) -> str:
    """The scene's i-th namespace."""
    return f"{PREFIX}{i}"


def host_end(i: int) -> str:
    """The host end of the i-th namespace's veth (at most 15 bytes)."""
    name = f"{PREFIX}h{i}"
    assert len(name) <= 15, name
    return name


def v4(i: int, host: int) -> str:
    """The i-th /30's address: host 1 is the host end, 2 the namespace end."""
    return str(SCENE_V4 + 4 * i + host)


def v6(i: int, host: int) -> str:
    """The i-th /64's address: ::1 host end, ::2 namespace end."""
    return f"2001:db8:b0:{i:x}::{host}"


def run(args: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
    """Run a command, return stdout; raise with stderr on failure."""
    proc = subprocess.run(list(args), input=stdin, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()[:2000]}")
    return proc.stdout


def batch(lines: Iterable[str], netns: str | None = None, force: bool = False) -> None:
    """``ip [-n NS] [-force] -batch -``: many commands, one process."""
    args = ["ip"] + (["-n", netns] if netns else []) + (["-force"] if force else [])
    run([*args, "-batch", "-"], "\n".join(lines) + "\n", check=not force)


def parallel_batches(files: dict[str, str], jobs: int = 0) -> float:
    """Run ``ip -n NS -batch FILE`` for every namespace at once; seconds taken.

    One shell starts them all in the background and waits. ``nsenter
    --net`` rather than ``ip -n``: ``ip -n`` also unshares the mount
    namespace and remounts /sys, which serialises on the kernel's mount lock
    and costs 8 ms sequentially, over 20 ms each in parallel at 1000
    namespaces; ``nsenter --net`` only calls setns (4 ms, and it scales).
    ``jobs`` > 0 bounds concurrency through ``xargs -P``.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        if jobs > 0:
            f.write(
                f"xargs -P {jobs} -n 2 sh -c "
                f"'exec nsenter --net={NETNS_DIR}/\"$0\" ip -force -batch \"$1\"' <<'EOF'\n"
            )
            for ns, path in files.items():
                f.write(f"{ns} {path}\n")
            f.write("EOF\n")
        else:
            for ns, path in files.items():
                f.write(f"nsenter --net={NETNS_DIR}/{ns} ip -force -batch {path} &\n")
            f.write("wait\n")
        script = f.name
    try:
        t0 = time.monotonic()
        subprocess.run(["sh", script], check=True, capture_output=True)
        return time.monotonic() - t0
    finally:
        os.unlink(script)


def own_namespaces(prefix: str = PREFIX) -> list[str]:
    """Namespaces in /run/netns named with ``prefix`` (a fresh boot has no /run/netns)."""
    if not os.path.isdir(NETNS_DIR):
        return []
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))


def own_host_links(prefix: str = PREFIX) -> list[str]:
    """Host links named with ``prefix``."""
    out = json.loads(run(["ip", "-j", "link", "show"]) or "[]")
    return [str(link["ifname"]) for link in out if str(link["ifname"]).startswith(prefix)]


@contextlib.contextmanager
def exclusive(prefix: str = PREFIX) -> Iterator[None]:
    """Hold the lock of ``prefix``'s objects; a second run with the same prefix stops at once.

    Each run sweeps its prefix before and after: a second run started while
    one is under way would delete the first one's namespaces under it.
    """
    with open(f"/run/lock/nswatch-bench-{prefix}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise SystemExit(
                f"another benchmark run is using the prefix {prefix}: wait for it"
            ) from e
        yield


class MemoryGroup:
    """A memory cgroup of the benchmark's own, for the daemon and its children.

    Its charge is what systemd shows as a unit's memory (and what
    ``MemoryMax=`` limits): every page the processes use, counted once,
    shared ones included (a document in a memfd is charged once, whether
    one process maps it, two do or none does), at the moment they are used.
    Adding the processes' own peaks (VmHWM) instead counts a shared page
    once per process that mapped it, and two peaks as if they came at once.
    cgroup v1 (``memory.max_usage_in_bytes``) or v2 (``memory.peak``);
    without either, every figure is NaN.
    """

    V1 = Path("/sys/fs/cgroup/memory")
    V2 = Path("/sys/fs/cgroup")

    def __init__(self, name: str) -> None:
        self.path: Path | None = None
        v1 = self.V1.is_dir()
        root = self.V1 if v1 else self.V2
        self._usage, self._peak = (
            ("memory.usage_in_bytes", "memory.max_usage_in_bytes")
            if v1
            else ("memory.current", "memory.peak")
        )
        path = root / name
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()  # a killed run's
            path.mkdir()
            if (path / self._peak).exists():
                self.path = path
            else:
                path.rmdir()

    def _mb(self, file: str) -> float:
        if self.path is None:
            return float("nan")
        try:
            return int((self.path / file).read_text()) / 2**20
        except (OSError, ValueError):
            return float("nan")

    def usage_mb(self) -> float:
        return self._mb(self._usage)

    def peak_mb(self) -> float:
        return self._mb(self._peak)

    def stat_mb(self) -> dict[str, float]:
        """The charge by kind (anonymous, shared memory, page cache …) in MB."""
        if self.path is None:
            return {}
        out: dict[str, float] = {}
        with contextlib.suppress(OSError):
            for line in (self.path / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key in ("rss", "anon", "shmem", "cache", "file", "mapped_file", "kernel"):
                    out[key] = int(value) / 2**20
        return out

    def close(self) -> None:
        """Remove the group once its processes have gone."""
        if self.path is None:
            return
        deadline = time.monotonic() + 5
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def sweep(wait: float = 30.0, prefix: str = PREFIX) -> None:
    """Remove every namespace and host link named with ``prefix`` (leftovers too).

    Deleting a namespace destroys its veths once the kernel frees it, which
    happens asynchronously; host ends still present after that are deleted.
    """
    names = own_namespaces(prefix)
    if names:
        batch((f"netns del {n}" for n in names), force=True)
    deadline = time.monotonic() + wait
    while own_host_links(prefix) and time.monotonic() < deadline:
        time.sleep(0.2)
    links = own_host_links(prefix)
    if links:
        batch((f"link del {n}" for n in links), force=True)


@dataclass
class Scene:
    """The scene's namespaces, what was created, and what the storm adds."""

    n: int
    names: list[str] = field(default_factory=list)
    build_seconds: float = 0.0

    def build(self) -> None:
        """Create N namespaces (see the module docstring); idempotent start state."""
        assert 0 < self.n <= MAX_NAMESPACES
        sweep()
        t0 = time.monotonic()
        self.names = [ns_name(i) for i in range(self.n)]
        lines = [f"netns add {ns}" for ns in self.names]
        for i, ns in enumerate(self.names):
            h = host_end(i)
            lines += [
                f"link add {h} type veth peer name eth0 netns {ns}",
                f"addr add {v4(i, 1)}/30 dev {h}",
                f"addr add {v6(i, 1)}/64 dev {h} nodad",
                f"link set {h} up",
            ]
        batch(lines)
        files: dict[str, str] = {}
        tmp = tempfile.mkdtemp(prefix="nswB-scene-")
        try:
            for i, ns in enumerate(self.names):
                path = os.path.join(tmp, ns)
                with open(path, "w") as f:
                    f.write(
                        "link set lo up\n"
                        "link set eth0 up\n"
                        f"addr add {v4(i, 2)}/30 dev eth0\n"
                        f"addr add {v6(i, 2)}/64 dev eth0 nodad\n"
                        f"route add default via {v4(i, 1)}\n"
                    )
                files[ns] = path
            parallel_batches(files, jobs=8)
        finally:
            for path in files.values():
                os.unlink(path)
            os.rmdir(tmp)
        self.build_seconds = time.monotonic() - t0

    def cleanup(self) -> None:
        """Remove the scene and anything else with our prefix."""
        sweep()
        self.names = []


@dataclass
class Storm:
    """A burst of addresses and routes spread round-robin over the namespaces."""

    names: list[str]
    addresses: int
    routes: int

    def _ns(self, j: int) -> int:
        return j % len(self.names)

    def address(self, j: int) -> tuple[str, str, int]:
        """(family, address, prefixlen) of the j-th storm address."""
        if j % 2 == 0:
            return "inet", str(STORM_ADDR_V4 + j // 2), 32
        return "inet6", str(STORM_ADDR_V6 + j // 2), 128

    def route(self, j: int) -> tuple[str, str, str]:
        """(family, dst CIDR, gateway) of the j-th storm route."""
        i = self._ns(j)
        if j % 2 == 0:
            return "inet", f"{STORM_ROUTE_V4 + j // 2}/32", v4(i, 1)
        return "inet6", f"{STORM_ROUTE_V6 + j // 2}/128", v6(i, 1)

    def per_namespace(self, op: str) -> dict[str, list[str]]:
        """``ip -batch`` lines per namespace: ``op`` is ``add`` or ``del``."""
        out: dict[str, list[str]] = {ns: [] for ns in self.names}
        for j in range(self.addresses):
            _, addr, plen = self.address(j)
            extra = " nodad" if ":" in addr and op == "add" else ""
            out[self.names[self._ns(j)]].append(f"addr {op} {addr}/{plen} dev eth0{extra}")
        for j in range(self.routes):
            _, dst, gw = self.route(j)
            out[self.names[self._ns(j)]].append(f"route {op} {dst} via {gw}")
        return out

    def expected(self) -> dict[str, tuple[set[tuple[str, str]], set[tuple[str, str]]]]:
        """Per namespace: the storm's (family, address) and (family, dst) sets."""
        out: dict[str, tuple[set[tuple[str, str]], set[tuple[str, str]]]] = {
            ns: (set(), set()) for ns in self.names
        }
        for j in range(self.addresses):
            fam, addr, _ = self.address(j)
            out[self.names[self._ns(j)]][0].add((fam, addr))
        for j in range(self.routes):
            fam, dst, _ = self.route(j)
            out[self.names[self._ns(j)]][1].add((fam, dst))
        return out


class BatchFiles:
    """``ip -batch`` files written in advance, one per namespace, for a burst."""

    def __init__(self, lines: dict[str, list[str]]) -> None:
        self.dir = tempfile.mkdtemp(prefix="nswB-batch-")
        self.files: dict[str, str] = {}
        for ns, ls in lines.items():
            if not ls:
                continue
            path = os.path.join(self.dir, ns)
            with open(path, "w") as f:
                f.write("\n".join(ls) + "\n")
            self.files[ns] = path

    def fire(self, jobs: int = 0) -> float:
        """Run them all in parallel; the burst's duration in seconds."""
        return parallel_batches(self.files, jobs)

    def close(self) -> None:
        """Remove the files."""
        for path in self.files.values():
            os.unlink(path)
        os.rmdir(self.dir)


def churn_names(count: int) -> list[tuple[str, str]]:
    """(namespace, host end) for the churn phase."""
    return [(f"{PREFIX}c{i}", f"{PREFIX}ch{i}") for i in range(count)]


def churn(count: int) -> tuple[float, float]:
    """Create ``count`` namespaces with a veth each, then delete them: (create s, delete s)."""
    pairs = churn_names(count)
    lines = []
    for ns, h in pairs:
        lines += [f"netns add {ns}", f"link add {h} type veth peer name eth0 netns {ns}"]
    t0 = time.monotonic()
    batch(lines)
    t1 = time.monotonic()
    batch(f"netns del {ns}" for ns, _ in pairs)
    return t1 - t0, time.monotonic() - t1


def kernel_counts(netns: str) -> dict[str, Any]:
    """`ip -j` link/addr/route of one namespace, counted (the iproute2 baseline)."""
    links = json.loads(run(["ip", "-j", "-n", netns, "link"]) or "[]")
    addrs = json.loads(run(["ip", "-j", "-n", netns, "addr"]) or "[]")
    routes = json.loads(run(["ip", "-j", "-n", netns, "route"]) or "[]")
    return {
        "links": len(links),
        "addresses": sum(len(a.get("addr_info", [])) for a in addrs),
        "routes": len(routes),
    }


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE = 20, 21, 24, 25
NLMSG_ERROR = 2


def in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a fresh thread inside the namespace at ``path``.

    Sockets it opens live in that namespace; processes forked from that
    thread (``ip``) start there too, without ``ip -n``'s mount-namespace copy.
    """
    out: list[T] = []
    err: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, os.strerror(e))
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


def _encode_addr(op: str, family: str, addr: str, plen: int, ifindex: int, seq: int) -> bytes:
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

    m = ifaddrmsg()
    m["family"] = socket.AF_INET if family == "inet" else socket.AF_INET6
    m["prefixlen"] = plen
    m["index"] = ifindex
    attrs: list[tuple[str, Any]] = [("IFA_LOCAL", addr), ("IFA_ADDRESS", addr)]
    if family == "inet6":
        attrs = [("IFA_ADDRESS", addr), ("IFA_FLAGS", 0x02)]  # IFA_F_NODAD
    m["attrs"] = attrs
    m["header"]["type"] = RTM_NEWADDR if op == "add" else RTM_DELADDR
    m["header"]["flags"] = (
        NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if op == "add" else 0)
    )
    m["header"]["sequence_number"] = seq
    m.encode()
    return bytes(m.data)


def _encode_route(op: str, family: str, dst: str, gw: str, seq: int) -> bytes:
    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    net, plen = dst.split("/")
    m = rtmsg()
    m["family"] = socket.AF_INET if family == "inet" else socket.AF_INET6
    m["dst_len"] = int(plen)
    m["table"] = 254
    m["proto"] = 3  # boot, what `ip route add` uses
    m["scope"] = 0
    m["type"] = 1  # unicast
    m["attrs"] = [("RTA_DST", net), ("RTA_GATEWAY", gw)]
    m["header"]["type"] = RTM_NEWROUTE if op == "add" else RTM_DELROUTE
    m["header"]["flags"] = (
        NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if op == "add" else 0)
    )
    m["header"]["sequence_number"] = seq
    m.encode()
    return bytes(m.data)


class NetlinkBurst:
    """The same storm sent as raw rtnetlink requests, for a burst of ~0.1 s.

    One NETLINK_ROUTE socket per namespace is opened and every message
    encoded beforehand; :meth:`fire` only writes them all, then reads the
    acknowledgements (any error fails the burst).
    """

    def __init__(self, storm: Storm, op: str) -> None:
        self.socks: dict[str, socket.socket] = {}
        self.msgs: dict[str, list[bytes]] = {ns: [] for ns in storm.names}
        try:
            for ns in storm.names:
                self.socks[ns] = in_netns(
                    f"{NETNS_DIR}/{ns}",
                    lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0),
                )
        except BaseException:
            self.close()
            raise
        seq = 0
        for j in range(storm.addresses):
            fam, addr, plen = storm.address(j)
            seq += 1
            ns = storm.names[storm._ns(j)]
            self.msgs[ns].append(_encode_addr(op, fam, addr, plen, 2, seq))
        for j in range(storm.routes):
            fam, dst, gw = storm.route(j)
            seq += 1
            ns = storm.names[storm._ns(j)]
            self.msgs[ns].append(_encode_route(op, fam, dst, gw, seq))

    def fire(self) -> float:
        """Send everything, read every ack; seconds taken."""
        t0 = time.monotonic()
        for ns, msgs in self.msgs.items():
            sock = self.socks[ns]
            for m in msgs:
                sock.send(m)
        errors = []
        for ns, msgs in self.msgs.items():
            sock = self.socks[ns]
            acks = 0
            while acks < len(msgs):
                data = sock.recv(65536)
                off = 0
                while off < len(data):
                    length, mtype = struct.unpack_from("=IH", data, off)
                    if mtype == NLMSG_ERROR:
                        acks += 1
                        (code,) = struct.unpack_from("=i", data, off + 16)
                        if code:
                            errors.append(f"{ns}: {os.strerror(-code)}")
                    off += (length + 3) & ~3
        elapsed = time.monotonic() - t0
        if errors:
            raise RuntimeError(f"netlink burst: {len(errors)} errors, e.g. {errors[:3]}")
        return elapsed

    def close(self) -> None:
        """Close the sockets."""
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()
