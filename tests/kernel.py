"""Helpers for tests against the real kernel: running `ip`, naming, comparing.

Every object a test creates carries a per-run prefix and lives only in
198.18.0.0/15 and 2001:db8::/32; :class:`Lab` removes what it made even when
the test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Any

from nswatch.state import state_json

# The node id of the running test when it is not marked `kernel` (set by
# tests/conftest.py), else None. Such a test that reaches for the kernel
# anyway fails at once, so `pytest -m "not kernel"` stays kernel-free even
# when run as root. Outside pytest (the benchmark) it stays None.
UNMARKED_TEST: list[str | None] = [None]


def require_kernel_mark(what: str) -> None:
    """Fail the running test if it uses ``what`` (root or the kernel) without the kernel mark."""
    test = UNMARKED_TEST[0]
    if test is not None:
        raise AssertionError(f"{test} uses {what}: mark it @pytest.mark.kernel")


def ip(*args: str, check: bool = True) -> str:
    """Run `ip ARGS` and return stdout; raise with stderr on failure."""
    require_kernel_mark("`ip`")
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def ip_batch(lines: Iterable[str]) -> None:
    """Run many `ip` commands in one process (`ip -batch -`)."""
    require_kernel_mark("`ip -batch`")
    text = "\n".join(lines) + "\n"
    proc = subprocess.run(["ip", "-batch", "-"], input=text, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip -batch: {proc.stderr.strip()}")


def ip_json(netns: str | None, *args: str) -> Any:
    """`ip -j [-n NS] ARGS` parsed."""
    pre = ["-n", netns] if netns else []
    out = ip("-j", *pre, *args)
    return json.loads(out) if out.strip() else []


class Lab:
    """Namespaces and links made by one test, removed at the end whatever happens."""

    def __init__(self, prefix: str | None = None) -> None:
        require_kernel_mark("a Lab")
        self.prefix = prefix or f"nswT{secrets.token_hex(2)}"
        self.namespaces: list[str] = []
        self.host_links: list[str] = []

    def name(self, suffix: str) -> str:
        """A name with this lab's prefix; fits IFNAMSIZ for short suffixes."""
        n = f"{self.prefix}{suffix}"
        assert len(n) <= 15, n
        return n

    def netns(self, suffix: str) -> str:
        """Create a namespace (`ip netns add`)."""
        n = self.name(suffix)
        ip("netns", "add", n)
        self.namespaces.append(n)
        return n

    def veth(self, a: str, b: str, a_ns: str | None = None, b_ns: str | None = None) -> None:
        """Create a veth pair a<->b, each end in the given namespace (None: host)."""
        args = ["link", "add", a]
        if a_ns:
            args += ["netns", a_ns]
        args += ["type", "veth", "peer", "name", b]
        if b_ns:
            args += ["netns", b_ns]
        ip(*args)
        if a_ns is None:
            self.host_links.append(a)
        if b_ns is None:
            self.host_links.append(b)

    def host_link(self, name: str) -> str:
        """Remember a host link to delete at the end."""
        self.host_links.append(name)
        return name

    def cleanup(self) -> None:
        """Delete everything, ignoring what is already gone."""
        for link in self.host_links:
            ip("link", "del", link, check=False)
        for ns in self.namespaces:
            ip("netns", "del", ns, check=False)
        # Anything else with our prefix (a test may have moved or renamed).
        for link in ip_json(None, "link", "show"):
            if link["ifname"].startswith(self.prefix):
                ip("link", "del", link["ifname"], check=False)
        for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else []:
            if name.startswith(self.prefix):
                ip("netns", "del", name, check=False)


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


# --- comparing the model with `ip -j` ---------------------------------------------


def _dst(route: dict[str, Any], family: str) -> str:
    dst = str(route["dst"])
    if dst == "default" or "/" in dst:
        return dst
    return f"{dst}/{32 if family == 'inet' else 128}"


def kernel_view(netns: str | None) -> dict[str, Any]:
    """What `ip -j` says about a namespace, normalised to nswatch's field names."""
    links = ip_json(netns, "-d", "link", "show")
    names = {link["ifindex"]: link["ifname"] for link in links}
    out_links = set()
    for link in links:
        kind = link.get("linkinfo", {}).get("info_kind")
        if kind is None:
            kind = "loopback" if link.get("link_type") == "loopback" else "device"
        out_links.add(
            (
                link["ifindex"],
                link["ifname"],
                kind,
                "UP" in link.get("flags", []),
                link.get("operstate", "UNKNOWN"),
                link.get("mtu"),
                link.get("master"),
            )
        )
    addrs = set()
    for link in ip_json(netns, "addr", "show"):
        for a in link.get("addr_info", []):
            addrs.add((link["ifname"], a["family"], a["local"], a["prefixlen"], a["scope"]))
    routes = set()
    for family, flag in (("inet", "-4"), ("inet6", "-6")):
        for r in ip_json(netns, flag, "route", "show", "table", "all"):
            metric = r.get("metric") or None
            nexthops = tuple(
                sorted((nh.get("gateway"), nh.get("dev")) for nh in r.get("nexthops", []))
            )
            routes.add(
                (
                    str(r.get("table", "main")),
                    family,
                    r.get("type", "unicast"),
                    _dst(r, family),
                    r.get("gateway"),
                    r.get("dev"),
                    str(r.get("protocol", "boot")),
                    r.get("scope", "global"),
                    metric,
                    r.get("prefsrc"),
                    nexthops,
                )
            )
    del names
    return {"links": out_links, "addresses": addrs, "routes": routes}


def model_view(ns: dict[str, Any]) -> dict[str, Any]:
    """One namespace of nswatch's state JSON, normalised like :func:`kernel_view`."""
    links = {
        (
            link["index"],
            link["name"],
            link["kind"],
            link["admin_up"],
            link["oper_state"],
            link["mtu"],
            link["master"],
        )
        for link in ns["links"]
    }
    addrs = {
        (a["link"], a["family"], a["address"], a["prefixlen"], a["scope"]) for a in ns["addresses"]
    }
    routes = {
        (
            r["table"],
            r["family"],
            r["type"],
            r["dst"],
            r["gateway"],
            r["dev"],
            r["protocol"],
            r["scope"],
            r["priority"] or None,
            r["prefsrc"],
            tuple(sorted((nh["gateway"], nh["dev"]) for nh in r["nexthops"])),
        )
        for r in ns["routes"]
    }
    return {"links": links, "addresses": addrs, "routes": routes}


def diff_namespace(state: dict[str, Any], name: str, netns: str | None) -> list[str]:
    """Differences between nswatch's view of ``name`` and the kernel's (empty: equal)."""
    ns = state["namespaces"].get(name)
    if ns is None:
        return [f"{name}: missing from the model"]
    want = kernel_view(netns)
    have = model_view(ns)
    out = []
    for key in ("links", "addresses", "routes"):
        for item in sorted(want[key] - have[key], key=repr):
            out.append(f"{name} {key} missing: {item}")
        for item in sorted(have[key] - want[key], key=repr):
            out.append(f"{name} {key} extra: {item}")
    return out


def diff_all(model_state: Callable[[], dict[str, Any]], netns_names: Iterable[str]) -> list[str]:
    """Differences for the host and each named namespace."""
    state = model_state()
    out = diff_namespace(state, "host", None)
    for name in netns_names:
        out += diff_namespace(state, name, name)
    return out


def converge(
    model_state: Callable[[], dict[str, Any]], netns_names: Iterable[str], timeout: float = 10.0
) -> None:
    """Wait until the model equals the kernel for these namespaces; fail with the diff."""
    names = list(netns_names)
    deadline = time.monotonic() + timeout
    while True:
        diff = diff_all(model_state, names)
        if not diff:
            return
        if time.monotonic() > deadline:
            raise AssertionError("model differs from kernel:\n" + "\n".join(diff[:40]))
        time.sleep(0.05)


def state_of(view: Callable[[], Any]) -> Callable[[], dict[str, Any]]:
    """A function returning the state JSON of a model view."""
    return lambda: state_json(view())
