"""Real runtimes' plumbing: CNI's bridge and ptp plugins, and a namespace directory laid out like Docker's.

The plugins run as a runtime runs them (``CNI_COMMAND=ADD ... < conf``, then
DEL), with host-local IPAM keeping its data under a temp directory. The
bridge plugin's ``isGateway`` turns on forwarding on the host: every host
sysctl the plugins may touch is saved before and restored after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nswatch.daemon import Settings
from tests.conftest import Running, start_daemon, stop_daemon
from tests.kernel import Lab, diff_namespace, ip, state_of, wait_for

pytestmark = pytest.mark.kernel

CNI_PATH = "/usr/lib/cni"

HOST_SYSCTLS = [
    "net/ipv4/ip_forward",
    *(f"net/ipv4/conf/{i}/forwarding" for i in ("all", "default")),
    *(f"net/ipv6/conf/{i}/forwarding" for i in ("all", "default")),
    *(f"net/ipv4/conf/{i}/rp_filter" for i in ("all", "default")),
    *(f"net/ipv4/conf/{i}/route_localnet" for i in ("all", "default")),
]


@pytest.fixture
def host_sysctls() -> Iterator[None]:
    """Whatever the plugins change on the host is put back."""
    saved = {k: Path("/proc/sys", k).read_text() for k in HOST_SYSCTLS}
    try:
        yield
    finally:
        # ip_forward first: writing it resets the per-interface forwarding.
        for key, value in saved.items():
            path = Path("/proc/sys", key)
            if path.read_text() != value:
                path.write_text(value)
        changed = {k for k, v in saved.items() if Path("/proc/sys", k).read_text() != v}
        assert not changed, f"host sysctls not restored: {changed}"


@pytest.fixture
def tmp(lab: Lab) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}-cni-"))
    try:
        yield path
    finally:
        for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
            point = line.split()[4]
            if point.startswith(os.fsencode(path)):
                subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def cni(command: str, plugin: str, conf: dict[str, Any], netns: str, container: str) -> Any:
    """Run a CNI plugin as a runtime does; return its JSON result."""
    if not os.access(f"{CNI_PATH}/{plugin}", os.X_OK):
        pytest.fail(f"{CNI_PATH}/{plugin} missing: install containernetworking-plugins")
    env = dict(
        os.environ,
        CNI_COMMAND=command,
        CNI_CONTAINERID=container,
        CNI_NETNS=netns,
        CNI_IFNAME="eth0",
        CNI_PATH=CNI_PATH,
    )
    proc = subprocess.run(
        [f"{CNI_PATH}/{plugin}"],
        input=json.dumps(conf),
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 0, f"{plugin} {command}: {proc.stdout} {proc.stderr}"
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def subnet(lab: Lab, offset: int) -> str:
    return f"198.19.{(int(lab.prefix[-4:], 16) + offset) % 250}.0/24"


def host_end(result: Any, bridge: str | None = None) -> str:
    """The host side veth's name from a CNI ADD result (the bridge is listed too)."""
    return str(
        next(i["name"] for i in result["interfaces"] if "sandbox" not in i and i["name"] != bridge)
    )


def peer(r: Running, label: str, link: str) -> tuple[str, str] | None:
    v = r.daemon.view()
    ns = v.get(label)
    found = ns.link_by_name(link) if ns is not None else None
    if ns is None or found is None:
        return None
    p = v.peer_of(ns.inode, found.index)
    return (p.netns, p.name) if p is not None else None


def test_cni_bridge_add_and_del(lab: Lab, tmp: Path, host_sysctls: None) -> None:
    """bridge + host-local: the pod's eth0, its host veth on the bridge, the address; DEL removes them."""
    ns = lab.netns("p")
    bridge = lab.host_link(lab.name("br"))
    conf = {
        "cniVersion": "1.0.0",
        "name": f"{lab.prefix}net",
        "type": "bridge",
        "bridge": bridge,
        "isGateway": True,
        "ipMasq": False,
        "ipam": {"type": "host-local", "subnet": subnet(lab, 0), "dataDir": str(tmp / "ipam")},
    }
    r = start_daemon(Settings(include=f"^{lab.prefix}", reconcile_interval=0))
    container = f"{lab.prefix}c1"
    added = False
    try:
        result = cni("ADD", "bridge", conf, f"/run/netns/{ns}", container)
        added = True
        veth = lab.host_link(host_end(result, bridge))
        wait_for(lambda: peer(r, ns, "eth0") == ("host", veth), timeout=3)
        host = r.daemon.view().get("host")
        assert host is not None
        link = host.link_by_name(veth)
        assert link is not None and host.link_name(link.master) == bridge
        want = result["ips"][0]["address"].split("/")[0]
        state = state_of(r.daemon.view)
        wait_for(lambda: not diff_namespace(state(), ns, ns), timeout=3)
        assert any(a["address"] == want for a in state()["namespaces"][ns]["addresses"])
        cni("DEL", "bridge", conf, f"/run/netns/{ns}", container)
        added = False
        wait_for(lambda: veth not in ip("link", "show"), timeout=3)
        wait_for(lambda: r.daemon.view().get(ns) is not None, timeout=1)
        wait_for(lambda: (v := r.daemon.view().get(ns)) and v.link_by_name("eth0") is None)
        wait_for(lambda: (h := r.daemon.view().get("host")) and h.link_by_name(veth) is None)
    finally:
        if added:
            subprocess.run(
                [f"{CNI_PATH}/bridge"],
                input=json.dumps(conf),
                env=dict(
                    os.environ,
                    CNI_COMMAND="DEL",
                    CNI_CONTAINERID=container,
                    CNI_NETNS=f"/run/netns/{ns}",
                    CNI_IFNAME="eth0",
                    CNI_PATH=CNI_PATH,
                ),
                capture_output=True,
                text=True,
            )
        stop_daemon(r)


def test_cni_ptp_in_a_docker_layout_directory_that_appears_later(
    lab: Lab, tmp: Path, host_sysctls: None
) -> None:
    """A Docker-style netns directory missing at start is watched when it appears; ptp's pair resolves there."""
    docker = tmp / "docker" / "netns"
    sandbox = f"{int(lab.prefix[-4:], 16):04x}" + "0c0ffee0"  # 12 hex digits, like Docker's
    r = start_daemon(
        Settings(
            netns_dirs=("/run/netns", str(docker)),
            include=f"^({lab.prefix}|{sandbox})",
            reconcile_interval=0,
        )
    )
    path = docker / sandbox
    conf = {
        "cniVersion": "1.0.0",
        "name": f"{lab.prefix}ptp",
        "type": "ptp",
        "ipMasq": False,
        "ipam": {"type": "host-local", "subnet": subnet(lab, 1), "dataDir": str(tmp / "ipam")},
    }
    container = f"{lab.prefix}c2"
    added = False
    try:
        docker.mkdir(parents=True)
        path.touch()
        # What dockerd does: a new namespace, bind-mounted onto the file.
        subprocess.run(["unshare", f"--net={path}", "true"], check=True)
        wait_for(lambda: r.daemon.view().get(sandbox) is not None, timeout=3)
        result = cni("ADD", "ptp", conf, str(path), container)
        added = True
        veth = lab.host_link(host_end(result))
        wait_for(lambda: peer(r, sandbox, "eth0") == ("host", veth), timeout=3)
        want = result["ips"][0]["address"].split("/")[0]
        # ptp adds the address after the pair: the peer may resolve first.
        wait_for(
            lambda: (
                (ns := r.daemon.view().get(sandbox)) is not None
                and any(a.address == want for a in ns.addresses.values())
            ),
            timeout=3,
        )
        cni("DEL", "ptp", conf, str(path), container)
        added = False
        wait_for(lambda: (v := r.daemon.view().get(sandbox)) and v.link_by_name("eth0") is None)
        subprocess.run(["umount", str(path)], check=True)
        path.unlink()
        wait_for(lambda: r.daemon.view().get(sandbox) is None, timeout=1)
    finally:
        if added:
            subprocess.run(
                [f"{CNI_PATH}/ptp"],
                input=json.dumps(conf),
                env=dict(
                    os.environ,
                    CNI_COMMAND="DEL",
                    CNI_CONTAINERID=container,
                    CNI_NETNS=str(path),
                    CNI_IFNAME="eth0",
                    CNI_PATH=CNI_PATH,
                ),
                capture_output=True,
                text=True,
            )
        stop_daemon(r)
