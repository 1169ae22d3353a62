"""systemd/nswatch.service: verify, security exposure, and the unit under a real systemd.

The real systemd boots in a container on this machine's own root file system
(`systemd-nspawn -D / --volatile=yes -b`, with its own network namespace so
nothing it does reaches the host's interfaces). A clean copy of the checkout
is bound in and installed there by the shell block of systemd/README.md's
Install section, run as written (pip offline, from a wheelhouse built here),
and the tests drive it with systemctl: start (active only after READY=1),
namespaces added later, profiles writing sysctls, reload, kill -9, a wedged
process and the watchdog, stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nswatch.http import SEND_HERE_MAX
from tests.conftest import require_root
from tests.kernel import wait_for

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "nswatch.service"
README = ROOT / "systemd" / "README.md"
MAX_EXPOSURE = 3.0


def tool(name: str, package: str) -> str:
    """A binary the tests need; its absence is a failure, never a skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's '{package}' package (see .ci/install)")
    return path


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment in a unit file, in order."""
    out = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def service() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for section, key, value in directives(UNIT.read_text()):
        if section == "Service":
            out.setdefault(key, []).append(value)
    return out


# --- static checks -----------------------------------------------------------------


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` passes (with ExecStart= pointing at this checkout's nswatch)."""
    analyze = tool("systemd-analyze", "systemd")
    nswatch = Path(sys.executable).parent / "nswatch"
    assert nswatch.exists(), nswatch
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/nswatch run" in text
    unit = tmp_path / "nswatch.service"
    unit.write_text(text.replace("/usr/local/bin/nswatch", str(nswatch)))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # no warnings either


def exposure() -> tuple[float, str]:
    analyze = tool("systemd-analyze", "systemd")
    proc = subprocess.run(
        [analyze, "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for nswatch\.service: (\d+\.\d+) (\w+)", proc.stdout)
    assert m is not None, proc.stdout + proc.stderr
    return float(m.group(1)), m.group(2)


def test_security_exposure_and_readme() -> None:
    """`systemd-analyze security --offline=yes` rates the unit 3.0 or lower, as the README says."""
    level, verdict = exposure()
    assert level <= MAX_EXPOSURE, f"exposure {level} {verdict}"
    assert (
        f"Overall exposure level for nswatch.service: {level:.1f} {verdict}" in README.read_text()
    )


def test_unit_contract() -> None:
    """The service type, lifecycle and hardening lines the issue asks for."""
    s = service()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    assert s["WatchdogSec"] == ["30s"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_SYS_ADMIN CAP_SYS_PTRACE"]
    assert s["LimitNOFILE"] == ["524288"]
    assert s["ReadWritePaths"] == ["/proc/sys/net"]
    assert s["RestrictNamespaces"] == ["net"]
    assert set(s["RestrictAddressFamilies"][0].split()) == {
        "AF_UNIX",
        "AF_NETLINK",
        "AF_INET",
        "AF_INET6",
    }
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictRealtime",
        "RestrictSUIDSGID",
    ):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    assert s["SystemCallArchitectures"] == ["native"]
    # Settings that would break the job: its own network, users or /proc view.
    for key in ("PrivateNetwork", "PrivateUsers", "ProcSubset", "DynamicUser"):
        assert key not in s, key


def test_readme_explains_every_line() -> None:
    """Every directive of the unit has its line in systemd/README.md."""
    readme = README.read_text()
    for section, key, _ in directives(UNIT.read_text()):
        assert f"`{key}=" in readme, f"[{section}] {key}= is not explained in {README.name}"


# --- under a real systemd ----------------------------------------------------------------

TARGET = """\
[Unit]
Description=nswatch tests: basic system only
Requires=basic.target
After=basic.target
AllowIsolate=yes
"""

CHECKOUT = "/opt/nswA/checkout"
WHEELS = "/opt/nswA/wheels"


def readme_install_block() -> str:
    """The first shell block of the Install section of systemd/README.md."""
    install = README.read_text().split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"^```sh\n(.*?)^```$", install, re.M | re.S)
    assert m is not None, "systemd/README.md: no sh block under ## Install"
    return m.group(1)


def clean_copy(dest: Path) -> None:
    """The checkout as a clone has it: no venv, caches or build output."""
    shutil.copytree(
        ROOT,
        dest,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )


def wheelhouse(dest: Path, checkout: Path) -> None:
    """Wheels of nswatch's dependencies and build backend (the container has no network)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-build-isolation",
            "-w",
            str(dest),
            str(checkout),
            "setuptools>=77,<81",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )


PROFILE = """\
profiles:
  - name: lab
    match: "{prefix}p*"
    loopback: up
    sysctls:
      net.ipv4.ip_forward: 1
    veth:
      host_name: "{{netns}}h"
      netns_name: eth0
      pool: 198.18.200.0/24
      prefix: 30
      default_route: true
"""


class Container:
    """A booted systemd-nspawn container of this machine's own root."""

    def __init__(self, workdir: Path) -> None:
        self.prefix = f"nswA{secrets.token_hex(2)}"
        self.machine = self.prefix
        self.workdir = workdir
        self.etc = workdir / "etc-nswatch"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.installed: subprocess.CompletedProcess[str] | None = None
        self.after_install: dict[str, str] = {}

    def boot(self) -> None:
        nspawn = tool("systemd-nspawn", "systemd-container")
        # An empty, writable /usr/local for the README's symlink.
        local = self.workdir / "local"
        (local / "bin").mkdir(parents=True)
        checkout = self.workdir / "checkout"
        clean_copy(checkout)
        wheels = self.workdir / "wheels"
        wheelhouse(wheels, checkout)
        target = self.workdir / "nswA-test.target"
        target.write_text(TARGET)
        self.etc.mkdir()
        log = open(self.workdir / "boot.log", "wb")  # noqa: SIM115 (the child keeps it)
        with log:
            self.proc = subprocess.Popen(
                [
                    nspawn,
                    "--directory=/",
                    "--volatile=yes",
                    "--boot",
                    # No machined or D-Bus on the host: run unregistered.
                    "--register=no",
                    "--keep-unit",
                    f"--machine={self.machine}",
                    # Its own network namespace: the container's "host" is not ours.
                    "--private-network",
                    "--console=pipe",
                    f"--bind={checkout}:{CHECKOUT}",
                    f"--bind-ro={wheels}:{WHEELS}",
                    f"--bind={local}:/usr/local",
                    f"--bind-ro={target}:/etc/systemd/system/nswA-test.target",
                    f"--bind={self.etc}:/etc/nswatch",
                    # Boot no further than basic.target: the first boot of an
                    # empty /etc would otherwise start every installed service.
                    "systemd.unit=nswA-test.target",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            leader = container_init(self.proc.pid)
            if leader is not None:
                self.leader = leader
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"container did not start: {self.boot_log()}")
            time.sleep(0.05)
        # Wait for the system manager inside to be up.
        while True:
            p = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=60)
            if p.stdout.strip() in {"running", "degraded"}:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"container did not boot: {p.stdout} {self.boot_log()}")
            time.sleep(0.2)

    def install(self) -> subprocess.CompletedProcess[str]:
        """Run the README's install block as written, in the checkout, with pip offline."""
        script = f"cd {CHECKOUT}\n{readme_install_block()}"
        # Only what a root shell has: none of this machine's pip settings.
        env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"]
        env += ["PIP_NO_INDEX=1", f"PIP_FIND_LINKS={WHEELS}", "PIP_DISABLE_PIP_VERSION_CHECK=1"]
        self.installed = self.run(
            "env", "-i", *env, "bash", "-euxo", "pipefail", "-c", script, check=False, timeout=300
        )
        self.after_install = self.show("ActiveState", "StatusText")
        return self.installed

    def boot_log(self) -> str:
        return (self.workdir / "boot.log").read_text(errors="replace")[-3000:]

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all its namespaces)."""
        p = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: rc {p.returncode}: {p.stdout}{p.stderr}")
        return p

    def show(self, *props: str) -> dict[str, str]:
        """`systemctl show nswatch` properties."""
        out = self.run("systemctl", "show", "nswatch", *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def http(self, path: str) -> tuple[int, str]:
        """GET http://127.0.0.1:9442{path} inside the container's network namespace."""
        code = (
            "import sys, urllib.request, urllib.error\n"
            "try:\n"
            f"    r = urllib.request.urlopen('http://127.0.0.1:9442{path}', timeout=5)\n"
            "    print(r.status); sys.stdout.write(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code); sys.stdout.write(e.read().decode())\n"
            "except OSError as e:\n"
            "    print(0); sys.stdout.write(str(e))\n"
        )
        p = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-n", sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
        )
        status, _, body = p.stdout.partition("\n")
        return int(status or 0), body

    def state(self) -> dict[str, Any]:
        status, body = self.http("/api/v1/state")
        assert status == 200, body
        data: dict[str, Any] = json.loads(body)
        return data

    def metric(self, name: str) -> float | None:
        """One sample of /metrics by its exact name and labels, e.g. 'x{a="b"}'."""
        status, body = self.http("/metrics")
        assert status == 200
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return None

    def journal(self) -> str:
        return self.run("journalctl", "-u", "nswatch", "--no-pager", "-o", "cat").stdout

    def ensure_running(self) -> None:
        if self.show("ActiveState")["ActiveState"] != "active":
            self.run("systemctl", "start", "nswatch")
        wait(lambda: self.http("/readyz")[0] == 200, 30)

    def shutdown(self) -> None:
        """Power the container off; failing that, kill its init, then nspawn."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.leader = container_init(self.proc.pid) or self.leader
            if self.leader:
                self.run("systemctl", "poweroff", check=False, timeout=20)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                # Killing the container's init takes its whole PID namespace
                # down; killing nspawn alone would leave the container running.
                leader = container_init(self.proc.pid)
                if leader is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(leader, signal.SIGKILL)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        # nspawn leaves this behind on a host whose /run is not a tmpfs.
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.machine}", ignore_errors=True)


def container_init(nspawn: int) -> int | None:
    """The container's PID 1 (as seen from here) among nspawn's descendants, once it exists.

    nspawn forks an intermediate child that exits after forking the real init,
    so "nspawn's first child" can be a process about to go.
    """
    todo, seen = [nspawn], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        m = re.search(r"^NSpid:\s*(.*)$", status, re.M)
        if pid != nspawn and m is not None and m.group(1).split()[-1] == "1":
            return pid
        todo.extend(int(c) for c in children)
    return None


def wait(cond: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    # Polling systemctl in the container is heavier than a local check.
    return wait_for(cond, timeout, interval)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """One container for the tests below, which run in file order."""
    require_root()
    c = Container(tmp_path_factory.mktemp("nspawn"))
    try:
        c.boot()
        c.install()
        # The tests below start it themselves (the README's block started it).
        c.run("systemctl", "stop", "nswatch", check=False)
        yield c
    finally:
        c.shutdown()


@pytest.mark.kernel
def test_readme_install(box: Container) -> None:
    """systemd/README.md's install block, run as written, installs a built nswatch and starts it."""
    p = box.installed
    assert p is not None and p.returncode == 0, (p.stdout + p.stderr)[-3000:] if p else None
    # Installed from a build into /opt/nswatch, not run from the checkout.
    assert (
        box.run("readlink", "/usr/local/bin/nswatch").stdout.strip() == "/opt/nswatch/bin/nswatch"
    )
    where = box.run(
        "/opt/nswatch/bin/python", "-c", "import nswatch; print(nswatch.__file__)", timeout=30
    ).stdout.strip()
    assert where.startswith("/opt/nswatch/lib/python3"), where
    assert box.run("/usr/local/bin/nswatch", "--version").stdout.startswith("nswatch ")
    shipped = box.run("cat", "/etc/systemd/system/nswatch.service").stdout
    assert shipped == UNIT.read_text()
    assert box.run("systemctl", "is-enabled", "nswatch").stdout.strip() == "enabled"
    # `enable --now` returned after READY=1, with the summary of what it watched.
    assert box.after_install == {
        "ActiveState": "active",
        "StatusText": "watching 1 namespace, 1 link, 0 veth pairs",
    }


@pytest.mark.kernel
def test_verify_inside(box: Container) -> None:
    """With nswatch installed at /usr/local/bin, the unit as shipped verifies cleanly and rates <= 3.0."""
    p = box.run("systemd-analyze", "verify", "/etc/systemd/system/nswatch.service", check=False)
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr
    # The loaded unit, as the running manager sees it, rates as well as offline.
    p = box.run("systemd-analyze", "security", "nswatch.service", check=False)
    m = re.search(r"Overall exposure level for nswatch\.service: (\d+\.\d+)", p.stdout)
    assert m is not None, p.stdout + p.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE


# Samples (ActiveState, /readyz status) as fast as possible while starting.
POLL = """\
import json, subprocess, time, urllib.request, urllib.error
subprocess.run(["systemctl", "start", "--no-block", "nswatch"], check=True)
samples = []
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    state = subprocess.run(["systemctl", "show", "-P", "ActiveState", "nswatch"],
                           capture_output=True, text=True).stdout.strip()
    try:
        code = urllib.request.urlopen("http://127.0.0.1:9442/readyz", timeout=2).status
    except urllib.error.HTTPError as e:
        code = e.code
    except OSError:
        code = 0
    samples.append((state, code))
    if state == "active" and code == 200 or state == "failed":
        break
    time.sleep(0.01)
print(json.dumps(samples))
"""


@pytest.mark.kernel
def test_start_active_only_after_ready(box: Container) -> None:
    """`systemctl start`: activating until READY=1, which comes only once /readyz says 200."""
    # No namespace directory yet: `ip netns add` creates (and mounts) it later.
    assert box.run("test", "-e", "/run/netns", check=False).returncode == 1
    p = box.run("/usr/bin/python3", "-c", POLL, timeout=90)
    samples = [tuple(s) for s in json.loads(p.stdout)]
    assert samples[-1] == ("active", 200), samples[-5:]
    assert ("activating", 0) in samples  # systemd waited while the process started up
    not_ready_but_active = [s for s in samples if s[0] == "active" and s[1] != 200]
    assert not_ready_but_active == []
    props = box.show("StatusText", "MainPID", "NRestarts")
    # The container's own network namespace: lo only.
    assert props["StatusText"] == "watching 1 namespace, 1 link, 0 veth pairs"
    # The hardening is in force on the running process.
    status = box.run("cat", f"/proc/{props['MainPID']}/status").stdout
    fields = dict(re.findall(r"^(\w+):\s*(.*)$", status, re.M))
    cap_net_admin, cap_sys_ptrace, cap_sys_admin = 1 << 12, 1 << 19, 1 << 21
    caps = cap_net_admin | cap_sys_ptrace | cap_sys_admin
    assert int(fields["CapEff"], 16) == caps
    assert int(fields["CapBnd"], 16) == caps
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"
    # The filter lets setpriority through: the HTTP thread (it answered the
    # polls) runs at nice 10, the event loop and the main thread at 0.
    tasks = box.run("sh", "-c", f"cat /proc/{props['MainPID']}/task/*/stat").stdout
    # Field 19 of stat is the nice value; fields after the ")" that ends the name start at 3.
    nice = {int(line.rsplit(")", 1)[1].split()[16]) for line in tasks.splitlines()}
    assert nice == {0, 10}, nice
    # Its view of the file system: read-only but for /proc/sys/net.
    mounts = box.run("cat", f"/proc/{props['MainPID']}/mountinfo").stdout
    flags = {}
    for line in mounts.splitlines():
        parts = line.split()
        flags[parts[4]] = set(parts[5].split(","))  # the last mount on a path wins
    for path in ("/", "/usr", "/run", "/proc/sys"):
        assert "ro" in flags[path], (path, flags[path])
    assert "rw" in flags["/proc/sys/net"]
    assert "/root" in flags and "/home" in flags  # ProtectHome= covers them


@pytest.mark.kernel
def test_sees_namespaces_added_after_start(box: Container) -> None:
    """`ip netns add` after start (even creating /run/netns) is seen through the service's mount namespace."""
    box.ensure_running()
    ns = f"{box.prefix}l"
    box.run("ip", "netns", "add", ns)
    box.run("ip", "link", "add", f"{ns}h", "type", "veth", "peer", "name", "eth0", "netns", ns)

    ends = [{"netns": "host", "link": f"{ns}h"}, {"netns": ns, "link": "eth0"}]

    def paired() -> bool:
        state = box.state()
        # a/b follow the namespaces' inode numbers, which the kernel reuses:
        # a new namespace may well get a lower one than the container's own.
        pairs = [sorted((p["a"], p["b"]), key=json.dumps) for p in state["veth_pairs"]]
        return ns in state["namespaces"] and sorted(ends, key=json.dumps) in pairs

    wait(paired, 10)
    wait(lambda: "watching 2 namespaces" in box.show("StatusText")["StatusText"], 5)


@pytest.mark.kernel
def test_reload_applies_profiles_and_writes_sysctls(box: Container) -> None:
    """`systemctl reload` takes a new profile; it sets up a new namespace, sysctl included."""
    box.ensure_running()
    pid = box.show("MainPID")["MainPID"]
    (box.etc / "nswatch.yaml").write_text(PROFILE.format(prefix=box.prefix))
    box.run("systemctl", "reload", "nswatch")
    wait(lambda: box.metric('nswatch_config_reload_total{result="success"}') == 1, 10)
    props = box.show("MainPID", "ActiveState")
    assert props == {"MainPID": pid, "ActiveState": "active"}
    journal = box.journal()
    assert "Reloading nswatch.service" in journal and "Reloaded nswatch.service" in journal
    assert '"event": "config_reloaded"' in journal

    plain, lab = f"{box.prefix}q", f"{box.prefix}p"
    box.run("ip", "netns", "add", plain)
    box.run("ip", "netns", "add", lab)

    def forwarding(ns: str) -> str:
        out = box.run("ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.ip_forward")
        return out.stdout.strip()

    # Written through ReadWritePaths=/proc/sys/net under ProtectKernelTunables=yes.
    wait(lambda: forwarding(lab) == "1", 10)
    assert forwarding(plain) == "0"
    route = box.run("ip", "-n", lab, "route", "show", "default").stdout
    assert route.startswith("default via 198.18.200.") and "dev eth0" in route
    assert box.run("ip", "link", "show", f"{lab}h").returncode == 0


@pytest.mark.kernel
def test_failed_reload_keeps_running(box: Container) -> None:
    """A bad config on reload: still active with the old config, and the metrics say so."""
    box.ensure_running()
    pid = box.show("MainPID")["MainPID"]
    (box.etc / "nswatch.yaml").write_text("profiles: [\n")
    box.run("systemctl", "reload", "nswatch")
    wait(lambda: box.metric('nswatch_config_reload_total{result="failure"}') == 1, 10)
    assert box.metric("nswatch_config_last_reload_success") == 0
    assert box.show("MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}
    (box.etc / "nswatch.yaml").unlink()


@pytest.mark.kernel
def test_restarts_after_kill_9(box: Container) -> None:
    """kill -9: Restart=on-failure brings it back, and it finds every namespace again."""
    box.ensure_running()
    before = box.show("MainPID", "NRestarts")
    box.run("kill", "-9", before["MainPID"])
    wait(lambda: box.show("NRestarts")["NRestarts"] == str(int(before["NRestarts"]) + 1), 15)
    wait(lambda: box.show("ActiveState")["ActiveState"] == "active", 30)
    assert box.show("MainPID")["MainPID"] != before["MainPID"]
    wait(lambda: box.http("/readyz")[0] == 200, 10)
    assert {f"{box.prefix}l", f"{box.prefix}p"} <= set(box.state()["namespaces"])


@pytest.mark.kernel
def test_watchdog_restarts_a_wedged_process(box: Container) -> None:
    """With a 3 s watchdog, a running nswatch keeps it fed; a stopped one is killed and restarted."""
    dropin = "/run/systemd/system/nswatch.service.d/nswA-watchdog.conf"
    box.run(
        "sh",
        "-c",
        f"mkdir -p {os.path.dirname(dropin)} && "
        f"printf '[Service]\\nWatchdogSec=3s\\n' > {dropin} && systemctl daemon-reload",
    )
    try:
        box.run("systemctl", "restart", "nswatch")
        wait(lambda: box.http("/readyz")[0] == 200, 30)
        props = box.show("MainPID", "NRestarts", "WatchdogUSec")
        assert props["WatchdogUSec"] == "3s"
        time.sleep(8)  # well past the timeout: the pings arrive
        assert box.show("MainPID", "NRestarts") == {
            "MainPID": props["MainPID"],
            "NRestarts": props["NRestarts"],
        }
        box.run("kill", "-STOP", props["MainPID"])
        wait(lambda: box.show("NRestarts")["NRestarts"] != props["NRestarts"], 20)
        assert "Watchdog timeout" in box.run("journalctl", "-u", "nswatch", "--no-pager").stdout
        wait(lambda: box.show("ActiveState")["ActiveState"] == "active", 30)
        assert box.show("MainPID")["MainPID"] != props["MainPID"]
    finally:
        box.run("rm", "-f", dropin)
        box.run("systemctl", "daemon-reload")


READ_ONLY = ROOT / "systemd" / "read-only.conf"


def test_read_only_dropin_contract() -> None:
    """The read-only drop-in keeps CAP_SYS_ADMIN and CAP_SYS_PTRACE only and re-closes /proc/sys/net; the README explains it."""
    got = [(k, v) for sec, k, v in directives(READ_ONLY.read_text()) if sec == "Service"]
    assert got == [
        ("CapabilityBoundingSet", ""),
        ("CapabilityBoundingSet", "CAP_SYS_ADMIN CAP_SYS_PTRACE"),
        ("ReadWritePaths", ""),
    ]
    assert "systemd/read-only.conf" in README.read_text()


@pytest.mark.kernel
def test_read_only_dropin_syncs_and_serves(box: Container) -> None:
    """Under the read-only drop-in: no CAP_NET_ADMIN, /proc/sys/net read-only, and a new veth pair and a namespace only a process holds are still seen and served."""
    box.ensure_running()
    dropin = "/run/systemd/system/nswatch.service.d/read-only.conf"
    src = f"{CHECKOUT}/systemd/{READ_ONLY.name}"
    box.run(
        "sh",
        "-c",
        f"mkdir -p {os.path.dirname(dropin)} && cp {src} {dropin} && systemctl daemon-reload",
    )
    # A namespace no file holds, held by a root process with every
    # capability: only CAP_SYS_PTRACE lets nswatch read its /proc/PID/ns/net.
    # Made first, so that the start-up scan finds it.
    holder = box.run("sh", "-c", "unshare -n sleep 300 >/dev/null 2>&1 & echo $!").stdout.strip()
    try:
        box.run("systemctl", "restart", "nswatch")
        wait(lambda: box.http("/readyz")[0] == 200, 30)
        pid = box.show("MainPID")["MainPID"]
        status = box.run("cat", f"/proc/{pid}/status").stdout
        fields = dict(re.findall(r"^(\w+):\s*(.*)$", status, re.M))
        cap_sys_ptrace, cap_sys_admin = 1 << 19, 1 << 21
        assert int(fields["CapEff"], 16) == cap_sys_ptrace | cap_sys_admin
        assert int(fields["CapBnd"], 16) == cap_sys_ptrace | cap_sys_admin
        mounts = box.run("cat", f"/proc/{pid}/mountinfo").stdout
        flags = {}
        for line in mounts.splitlines():
            parts = line.split()
            flags[parts[4]] = set(parts[5].split(","))
        assert "ro" in flags.get("/proc/sys/net", flags["/proc/sys"])

        ns = f"{box.prefix}r"
        box.run("ip", "netns", "add", ns)
        box.run("ip", "link", "add", f"{ns}h", "type", "veth", "peer", "name", "eth0", "netns", ns)
        box.run("ip", "-n", ns, "addr", "add", "198.18.201.2/24", "dev", "eth0")

        got: dict[str, object] = {}

        def seen() -> bool:
            state = box.state()
            ends = [{"netns": "host", "link": f"{ns}h"}, {"netns": ns, "link": "eth0"}]
            # a and b follow inode order, which the kernel may give either way.
            pairs = ({"a": ends[0], "b": ends[1]}, {"a": ends[1], "b": ends[0]})
            addrs = [a["address"] for a in state["namespaces"].get(ns, {}).get("addresses", [])]
            owners = [(n.get("owner") or {}).get("pid") for n in state["namespaces"].values()]
            got.update(
                pair=any(p in state["veth_pairs"] for p in pairs),
                address="198.18.201.2" in addrs,
                holder=int(holder) in owners,
                namespaces=sorted(state["namespaces"]),
            )
            return bool(got["pair"] and got["address"] and got["holder"])

        try:
            wait(seen, 20)
        except AssertionError:
            raise AssertionError(f"{got}; journal: {box.journal()[-3000:]}") from None
        assert box.http("/readyz")[0] == 200
        assert box.metric("nswatch_synced") == 1
        journal = box.run(
            "journalctl", "-u", "nswatch", "--no-pager", "-o", "cat", f"_PID={pid}"
        ).stdout
        assert "Operation not permitted" not in journal, journal[-2000:]
    finally:
        box.run("kill", holder, check=False)
        box.run("rm", "-f", dropin)
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", "nswatch")


@pytest.mark.kernel
def test_the_sender_child_sends_big_bodies_under_the_unit(box: Container) -> None:
    """Under the hardened unit the sender's child starts with the service (its one child
    process, at nice 10, holding no capability), maps and sends a state of over 1 MiB
    (smaller bodies the HTTP thread sends) that arrives whole, and the journal says nothing
    of the sender failing or of bodies not shared."""
    box.ensure_running()
    pid = box.show("MainPID")["MainPID"]
    names = [f"{box.prefix}s{i}" for i in range(600)]
    add = "".join(
        f"netns add {n}\nlink add {n}h type veth peer name eth0 netns {n}\n" for n in names
    )
    box.run("sh", "-c", f"printf '{add}' | ip -batch -")
    try:
        got: dict[str, object] = {}

        def big() -> bool:
            status, body = box.http("/api/v1/state")
            got.update(status=status, size=len(body))
            return (
                status == 200
                and len(body) > SEND_HERE_MAX
                and names[-1] in json.loads(body)["namespaces"]
            )

        try:
            wait(big, 30)
        except AssertionError:
            raise AssertionError(f"{got}; journal: {box.journal()[-3000:]}") from None
        kids = box.run("ps", "-o", "pid=,ni=,args=", "--ppid", str(pid)).stdout.splitlines()
        assert len(kids) == 1, kids
        child, nice, _ = kids[0].split(None, 2)
        args = box.run("cat", f"/proc/{child}/cmdline").stdout
        assert "sender_child.py" in args and nice == "10", (kids, args)
        # It cannot become nobody here (setresuid is filtered) but holds no capability.
        status = dict(
            line.split(":\t", 1)
            for line in box.run("cat", f"/proc/{child}/status").stdout.splitlines()
            if line.startswith(("Cap", "NoNewPrivs"))
        )
        for key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            assert int(status[key], 16) == 0, status
        assert status["NoNewPrivs"] == "1", status
        # The newest document stays mapped for a while after it was sent.
        assert "memfd:nswatch-body" in box.run("cat", f"/proc/{child}/maps").stdout
        journal = box.run(
            "journalctl", "-u", "nswatch", "--no-pager", "-o", "cat", f"_PID={pid}"
        ).stdout
        for said in (
            "http_sender_exited",
            "http_sender_unavailable",
            "http_body_not_shared",
            "http_sender_privileged",
        ):
            assert said not in journal, journal[-2000:]
    finally:
        delete = "".join(f"netns del {n}\n" for n in names)
        box.run("sh", "-c", f"printf '{delete}' | ip -force -batch -", check=False)


@pytest.mark.kernel
def test_stops_cleanly(box: Container) -> None:
    """`systemctl stop`: SIGTERM, a clean exit 0 within a second or two."""
    box.ensure_running()
    started = time.monotonic()
    box.run("systemctl", "stop", "nswatch")
    assert time.monotonic() - started < 5
    props = box.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert props == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",  # CLD_EXITED
        "ExecMainStatus": "0",
    }
    assert '"event": "stopped"' in box.journal()
