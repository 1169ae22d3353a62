"""What a newcomer sees first: the summary `nswatch run` opens with, and `snapshot --netns`."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nswatch import __version__
from nswatch.cli import startup_summary
from nswatch.config import Config
from nswatch.settings import Settings
from tests.kernel import Lab, ip

NSWATCH = [sys.executable, "-m", "nswatch"]


def nswatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NSWATCH, *args], capture_output=True, text=True, timeout=60)


def test_summary_says_what_is_watched_and_where_it_serves() -> None:
    """The default summary names the host, both directories, process-held namespaces, no profile, and the URLs."""
    text = startup_summary(Config(), ("127.0.0.1", 9442), tls=False)
    assert text == (
        f"nswatch {__version__} watches the host and every namespace in /run/netns,"
        " /run/docker/netns or held by a process; applies no profile (no config file)\n"
        "serving http://127.0.0.1:9442/ (the state: /api/v1/state, metrics: /metrics);"
        " Ctrl-C stops\n"
    )


def test_summary_with_filters_ipv6_and_tls() -> None:
    """Filters, several directories, an IPv6 address and TLS all show in the summary."""
    settings = Settings(
        netns_dirs=("/run/netns", "/run/docker/netns"),
        include="^lab",
        exclude="-old$",
        discover_processes=False,
    )
    config = Config(settings=settings, source="/etc/nswatch/nswatch.yaml")
    first, second = startup_summary(config, ("::1", 9000), tls=True).splitlines()
    assert first.endswith(
        "watches the host and every namespace in /run/netns, /run/docker/netns"
        " (names matching ^lab, except -old$); applies no profile (config /etc/nswatch/nswatch.yaml)"
    )
    assert second.startswith("serving https://[::1]:9000/ (")


def read_until(fd: int, want: bytes, timeout: float) -> bytes:
    """What the terminal shows until ``want`` appears (or the time is up)."""
    out = b""
    deadline = time.monotonic() + timeout
    while want not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    return out


@pytest.mark.kernel
def test_run_on_a_terminal_opens_with_the_summary(tmp_path: Path) -> None:
    """On a terminal, `nswatch run` prints the summary (with its real port) before any log line."""
    empty = tmp_path / "netns"
    empty.mkdir()
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [*NSWATCH, "run", "--listen", "127.0.0.1:0", "--netns-dir", str(empty)],
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
    )
    os.close(secondary)
    try:
        out = read_until(primary, b"synced", 20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
    lines = out.decode(errors="replace").splitlines()
    assert lines[0].startswith(
        f"nswatch {__version__} watches the host and every namespace in {empty}"
    )
    assert lines[1].startswith("serving http://127.0.0.1:") and ":0/" not in lines[1]
    # The change log follows, in console format, with the port it bound.
    assert "starting" in lines[2] and lines[1].split("/")[2] in lines[2]
    assert "synced" in out.decode(errors="replace")


@pytest.mark.kernel
def test_run_off_a_terminal_logs_json_only(tmp_path: Path) -> None:
    """Off a terminal (a service, a pipe), no summary: every line is a JSON log event."""
    empty = tmp_path / "netns"
    empty.mkdir()
    proc = subprocess.Popen(
        [*NSWATCH, "run", "--listen", "127.0.0.1:0", "--netns-dir", str(empty)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line)["event"] for line in (first + rest).splitlines()]
    assert events[0] == "starting" and events[-1] == "stopped"


@pytest.mark.kernel
def test_snapshot_netns_shows_only_matching_namespaces(lab: Lab) -> None:
    """`snapshot --netns GLOB` (repeatable) prints only the namespaces it names, with their pairs."""
    one, two, other = lab.netns("one"), lab.netns("two"), lab.netns("x")
    a, b = lab.name("a"), lab.name("b")
    lab.veth(a, b, a_ns=one, b_ns=other)
    ip("-n", other, "addr", "add", "198.18.51.2/24", "dev", b)
    include = ("--include", f"^{lab.prefix}")
    out = nswatch("snapshot", *include, "--netns", f"{lab.prefix}on*").stdout
    assert f"netns {one} " in out and f"netns {two} " not in out
    assert "netns host " not in out and f"netns {other} " not in out
    assert f"{one}/{a} <-> {other}/{b}" in out  # its pair, though the peer is not shown
    r = nswatch("snapshot", *include, "--json", "--netns", one, "--netns", f"*{lab.prefix}tw?")
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)
    assert set(state["namespaces"]) == {one, two}
    assert state["veth_pairs"] == [
        {"a": {"netns": one, "link": a}, "b": {"netns": other, "link": b}}
    ]
    r = nswatch("snapshot", *include, "--netns", f"{lab.prefix}nothing*")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"no namespace matches {lab.prefix}nothing*\n"
