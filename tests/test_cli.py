"""The nswatch command as users run it: snapshot, check-config, apply, run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from nswatch.apply import Applier, ApplyEngine
from nswatch.cli import _reload, build_parser, load
from nswatch.config import Config, render_host_name
from nswatch.model import Model
from nswatch.netns import NetnsEnterer
from nswatch.procnet import ProcNetPoller
from nswatch.settings import DEFAULTS, Settings, declared
from nswatch.webconfig import WebConfig
from tests.kernel import Lab, ip, ip_json, wait_for

NSWATCH = [sys.executable, "-m", "nswatch"]


def nswatch(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NSWATCH, *args], capture_output=True, text=True, timeout=60, check=check
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.kernel
def test_snapshot_shows_the_seed_pair(lab: Lab) -> None:
    """`nswatch snapshot` prints the pair and addresses; --json is the state document."""
    ns = lab.netns("s")
    a, b = lab.name("a"), lab.name("b")
    lab.veth(a, b, b_ns=ns)
    ip("addr", "add", "198.18.50.1/24", "dev", a)
    ip("-n", ns, "addr", "add", "198.18.50.2/24", "dev", b)
    out = nswatch("snapshot", "--include", f"^{lab.prefix}", check=True).stdout
    assert f"host/{a} <-> {ns}/{b}" in out
    assert "198.18.50.2/24" in out
    state = json.loads(
        nswatch("snapshot", "--json", "--include", f"^{lab.prefix}", check=True).stdout
    )
    assert state["synced"] is True
    assert {"a": {"netns": "host", "link": a}, "b": {"netns": ns, "link": b}} in state["veth_pairs"]


def test_check_config_exit_codes(tmp_path: Path) -> None:
    """check-config exits 0 for a valid file and 2 with file:line: key: problem lines otherwise."""
    good = tmp_path / "good.yaml"
    good.write_text("listen: 127.0.0.1:9442\nprofiles: []\n")
    r = nswatch("check-config", str(good))
    assert r.returncode == 0 and r.stdout.startswith("OK:")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "profiles:\n  - name: p\n    match: '*'\n    veth:\n      host_name: 'v-{id}'\n"
        "      netns_name: eth0\n      pool: 198.18.0.0/24\n      prefix: 31\n"
    )
    r = nswatch("check-config", str(bad))
    assert r.returncode == 2
    assert f"{bad}:8: profiles[0].veth.prefix:" in r.stderr


def test_check_config_warns_when_a_profile_matches_the_host_label(tmp_path: Path) -> None:
    """A catch-all profile would match a namespace named like the host label: check-config warns, still exits 0."""
    f = tmp_path / "c.yaml"
    f.write_text("host_label: x\nprofiles:\n  - {name: all, match: '*', loopback: up}\n")
    r = nswatch("check-config", str(f))
    assert r.returncode == 0, r.stderr
    assert "profiles[0] (all) matches 'x', the host label" in r.stderr
    f.write_text("profiles:\n  - {name: lab, match: 'lab-*', loopback: up}\n")
    r = nswatch("check-config", str(f))
    assert r.returncode == 0 and "warning" not in r.stderr


@pytest.mark.kernel
def test_apply_dry_run_then_apply(lab: Lab, tmp_path: Path) -> None:
    """`apply --dry-run` changes nothing and prints the plan; `apply --netns` does it once."""
    ns = lab.netns("ap")
    lab.host_link(render_host_name("nsw-{id}", ns))
    cfg = tmp_path / "nswatch.yaml"
    cfg.write_text(
        f"include: '^{lab.prefix}'\nprofiles:\n  - name: lab\n    match: '{lab.prefix}*'\n"
        "    loopback: up\n    veth:\n      host_name: 'nsw-{id}'\n      netns_name: eth0\n"
        "      pool: 198.18.0.0/17\n      prefix: 30\n      default_route: true\n"
    )
    r = nswatch("apply", "--config", str(cfg), "--netns", ns, "--dry-run", check=True)
    assert "type veth peer name eth0" in r.stdout and "route add default" in r.stdout
    assert [link["ifname"] for link in ip_json(ns, "link", "show")] == ["lo"]
    nswatch("apply", "--config", str(cfg), "--netns", ns, check=True)
    assert any(r["dst"] == "default" for r in ip_json(ns, "-4", "route", "show"))
    again = nswatch("apply", "--config", str(cfg), "--netns", ns, "--dry-run", check=True)
    assert "0 step(s)" in again.stdout


DEEP = "profiles: " + "[" * 3000 + "]" * 3000 + "\n"


def test_bad_config_files_exit_2_without_a_traceback(tmp_path: Path) -> None:
    """`run` and `check-config` list the problems of a bad (even hostile) file and exit 2."""
    deep = tmp_path / "deep.yaml"
    deep.write_text(DEEP)
    blocky = tmp_path / "blocky.yaml"
    blocky.write_text(
        "profiles:\n" + "".join("  " * i + "- \n" for i in range(40)) + "  " * 40 + "- x\n"
    )
    too_deep = f"{blocky}:33: {'profiles' + '[0]' * 31}: nests deeper than 32 levels\n"
    for command in (["check-config"], ["run", "--config"]):
        r = nswatch(*command, str(deep))
        assert r.returncode == 2
        assert r.stderr.startswith(f"{deep}:1: invalid YAML: ") and r.stderr.count("\n") == 1
        r = nswatch(*command, str(blocky))
        assert (r.returncode, r.stderr) == (2, too_deep)


def test_bad_flags_exit_2_with_their_setting(tmp_path: Path) -> None:
    """A flag value the setting refuses (an RE2-incompatible regex, a too-short interval) exits 2 naming it."""
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("")
    r = nswatch("snapshot", "--config", str(cfg), "--include", "(a)\\1")
    assert r.returncode == 2
    assert r.stderr.startswith("<command line>: include: bad regular expression: invalid escape")
    r = nswatch("run", "--config", str(cfg), "--reconcile-interval", "0.000001")
    assert (r.returncode, r.stderr) == (
        2,
        "<command line>: reconcile_interval: must be at least 10 seconds or 0 (disabled)\n",
    )


FLAG_VALUES = {
    "listen": ("[::1]:1", ("::1", 1)),
    "netns_dirs": ("/x/", ("/x",)),
    "include": ("^a", "^a"),
    "exclude": ("b$", "b$"),
    "log_format": ("json", "json"),
    "log_level": ("debug", "debug"),
    "netlink_rcvbuf": ("4096", 4096),
    "reconcile_interval": ("60", 60.0),
    "web_config_file": ("/etc/nswatch/web.yml", "/etc/nswatch/web.yml"),
}


def test_flags_follow_the_settings_declaration(tmp_path: Path) -> None:
    """Each declared flag sets its setting on exactly the commands the declaration names."""
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("")
    flags = {name: s for name, s in declared() if s.flag is not None}
    assert set(flags) == set(FLAG_VALUES)
    for name, s in flags.items():
        assert s.flag is not None
        text, want = FLAG_VALUES[name]
        for command in ("run", "snapshot", "apply"):
            argv = [command, "--config", str(cfg), s.flag, text]
            if command not in s.commands:
                with pytest.raises(SystemExit):
                    build_parser().parse_args(argv)
                continue
            settings = load(build_parser().parse_args(argv)).settings
            assert getattr(settings, name) == want != getattr(DEFAULTS, name)


class _FakeDaemon:
    """What the reload path hands the daemon."""

    def __init__(self) -> None:
        self.observers: list[Any] = []
        self.settings: Settings | None = None

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings


class _FakeSink:
    def __init__(self) -> None:
        self.results: list[bool] = []

    def config_reloaded(self, ok: bool) -> None:
        self.results.append(ok)


class _FakeServer:
    """Stands in for HttpServer: records the web configs it is handed."""

    def __init__(self) -> None:
        self.webs: list[WebConfig] = []

    def use_web(self, web: WebConfig) -> None:
        self.webs.append(web)


@dataclass
class _ReloadKit:
    """What ``_reload`` is handed in the tests: the file, its args and config, and fakes."""

    cfg: Path
    args: Any
    config: Config
    engine: ApplyEngine
    daemon: Any
    sink: Any


@contextlib.contextmanager
def _reload_kit(tmp_path: Path, text: str) -> Iterator[_ReloadKit]:
    """A config file holding ``text``, loaded, with a real apply engine and fake consumers."""
    cfg = tmp_path / "nswatch.yaml"
    cfg.write_text(text)
    args = build_parser().parse_args(["run", "--config", str(cfg)])
    config = load(args)
    enterer = NetnsEnterer()
    try:
        engine = ApplyEngine(config, Model, Applier(enterer, lambda name: None))
        yield _ReloadKit(cfg, args, config, engine, _FakeDaemon(), _FakeSink())
    finally:
        enterer.close()


def test_reload_reads_the_web_config_again(tmp_path: Path) -> None:
    """A reload re-reads the web config file the config names (new users take over); a
    broken web config fails the whole reload, and the old config and web config stay."""
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users: {}\n")
    with _reload_kit(tmp_path, f"web_config_file: {web}\n") as k:
        server: Any = _FakeServer()
        log = structlog.get_logger()
        hashed = "$2y$04$" + "a" * 53
        web.write_text(f"basic_auth_users:\n  bob: '{hashed}'\n")
        new = _reload(k.args, k.config, k.daemon, k.engine, k.sink, log, None, server)
        assert [list(w.users) for w in server.webs] == [["bob"]]
        web.write_text("basic_auth_users: [not, a, mapping]\n")
        k.cfg.write_text(f"web_config_file: {web}\nhost_label: other\n")
        assert _reload(k.args, new, k.daemon, k.engine, k.sink, log, None, server) is new
        assert len(server.webs) == 1 and k.engine.config is new
        assert k.sink.results == [True, False]


def test_reload_hands_one_config_to_every_consumer(tmp_path: Path) -> None:
    """A reload gives the daemon, the apply engine and its applier the same new config (a new host_label reaches all); a bad file keeps the old one."""
    with _reload_kit(tmp_path, "host_label: host\n") as k:
        log = structlog.get_logger()
        k.cfg.write_text("host_label: root\n")
        new: Config = _reload(k.args, k.config, k.daemon, k.engine, k.sink, log)
        assert k.engine.applier.host_label == "root"
        assert k.engine.config is new and new.settings.host_label == "root"
        assert k.daemon.settings is new.settings
        k.cfg.write_text(DEEP)
        assert _reload(k.args, new, k.daemon, k.engine, k.sink, log) is new
        assert k.engine.applier.host_label == "root"
        assert k.sink.results == [True, False]


def test_reload_gives_the_procnet_poller_its_new_interval(tmp_path: Path) -> None:
    """A reload hands a running /proc poller a changed interval; turning it off (or on)
    is said to need a restart and leaves the poller as it was."""
    poller = ProcNetPoller(Model, lambda inode: None, interval=30.0)
    with _reload_kit(tmp_path, "procnet_interval: 30\n") as k:
        log = structlog.get_logger()
        k.cfg.write_text("procnet_interval: 60\n")
        new = _reload(k.args, k.config, k.daemon, k.engine, k.sink, log, None, None, poller)
        assert poller.interval == 60.0
        k.cfg.write_text("procnet_interval: 0\n")
        with capture_logs() as logs:
            newer = _reload(k.args, new, k.daemon, k.engine, k.sink, log, None, None, poller)
        assert newer.settings.procnet_interval == 0
        assert poller.interval == 60.0
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "procnet_change_needs_restart"
        ]
        assert k.sink.results == [True, True]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


@pytest.mark.kernel
def test_run_serves_and_stops_cleanly(lab: Lab, tmp_path: Path) -> None:
    """`nswatch run` becomes ready, serves state and metrics, reloads on SIGHUP and exits 0 within 2 s of SIGTERM."""
    port = free_port()
    cfg = tmp_path / "nswatch.yaml"
    cfg.write_text(f"include: '^{lab.prefix}'\n")
    proc = subprocess.Popen(
        [
            *NSWATCH,
            "run",
            "--config",
            str(cfg),
            "--listen",
            f"127.0.0.1:{port}",
            "--log-format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(base + "/readyz")[0] == 200, timeout=15)
        ns = lab.netns("run")
        wait_for(lambda: ns.encode() in _get(base + "/api/v1/state")[1], timeout=3)
        status, body = _get(base + "/metrics")
        assert status == 200 and b"nswatch_namespaces" in body
        cfg.write_text(DEEP)
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: (
                b'nswatch_config_reload_total{result="failure"} 1.0' in _get(base + "/metrics")[1]
            ),
            timeout=5,
        )
        cfg.write_text(f"include: '^{lab.prefix}'\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: (
                b'nswatch_config_reload_total{result="success"} 1.0' in _get(base + "/metrics")[1]
            ),
            timeout=5,
        )
        assert _get(base + "/healthz")[0] == 200
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - t0 < 2.0
        _, err = proc.communicate(timeout=5)
        events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
        assert (
            "synced" in events and "namespace_added" in events and "config_reload_failed" in events
        )
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
