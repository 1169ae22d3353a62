"""nswatch against the real prometheus-node-exporter on the host: every shared series, label and value.

node_exporter (Debian's 1.5) runs on a free loopback port with only its
netdev (with address info), netclass and network_route collectors; nswatch
watches the host. Every node_network_* series of this test's own devices
(a bridge, a veth pair with one end in it, a macvlan, a pair left down)
must exist in nswatch under the same name with ``nswatch_`` for ``node_``,
``netns="host"`` and node_exporter's labels with node_exporter's values;
nswatch's extra labels are allowed, nothing else. The differences the
README lists are the only ones left out (:data:`NOT_RTNETLINK`,
:data:`IGNORED_LABELS`).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nswatch.daemon import Daemon, Settings
from nswatch.dirwatch import DirWatcher
from nswatch.http import Api, HttpServer
from nswatch.metrics import MetricsSink
from tests.conftest import require_root
from tests.kernel import Lab, ip, wait_for

pytestmark = pytest.mark.kernel

# node_exporter families read from sysfs or ethtool, which rtnetlink does not
# give (README, "Differences from node_exporter").
NOT_RTNETLINK = {
    "node_network_address_assign_type",
    "node_network_name_assign_type",
    "node_network_device_id",
    "node_network_dormant",
    "node_network_speed_bytes",
}
# node_exporter labels nswatch does not have: duplex comes from ethtool.
IGNORED_LABELS = {"duplex"}

Sample = tuple[str, dict[str, str], float]


def samples(body: str, prefix: str) -> list[Sample]:
    """Every sample of a text scrape whose name starts with ``prefix``."""
    out: list[Sample] = []
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name.startswith(prefix):
                out.append((s.name, dict(s.labels), float(s.value)))
    return out


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return bytes(resp.read()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Pair:
    """node_exporter and nswatch side by side, and the devices this test made."""

    lab: Lab
    node_url: str
    nswatch_url: str
    sink: MetricsSink

    def ours(self, labels: dict[str, str]) -> bool:
        return labels.get("device", "").startswith(self.lab.prefix)

    def node(self) -> list[Sample]:
        return [
            s
            for s in samples(get(self.node_url), "node_network_")
            if s[0] not in NOT_RTNETLINK and self.ours(s[1])
        ]

    def nswatch(self) -> list[Sample]:
        return [
            s
            for s in samples(get(self.nswatch_url), "nswatch_network_")
            if s[1].get("netns") == "host" and self.ours(s[1])
        ]


def build(lab: Lab) -> None:
    """A bridge with a veth end in it, the other end addressed and routed, a macvlan on it, a pair left down."""
    p = lab.prefix
    br, a, b, mv, c, d = (lab.name(x) for x in ("br", "a", "b", "mv", "c", "d"))
    lab.host_link(br)
    ip("link", "add", br, "type", "bridge")
    lab.veth(a, b)
    lab.veth(c, d)
    lab.host_link(mv)
    for dev in (br, a, b, c, d):
        # No automatic link-local address: idle devices, counters that stay put.
        ip("link", "set", dev, "addrgenmode", "none")
    ip("link", "set", a, "master", br)
    ip("link", "set", b, "txqueuelen", "321", "alias", f"{p} uplink")
    for dev in (br, a, b):
        ip("link", "set", dev, "up")
    ip("link", "add", mv, "link", b, "type", "macvlan", "mode", "bridge")
    ip("link", "set", mv, "addrgenmode", "none")
    ip("link", "set", mv, "up")
    ip("addr", "add", "198.18.201.1/24", "dev", b)
    ip("addr", "add", "2001:db8:201::1/64", "dev", b, "nodad")
    ip("addr", "add", "198.18.202.1/24", "dev", mv)
    ip("route", "add", "198.18.203.0/24", "via", "198.18.201.2", "metric", "20", "proto", "static")
    ip(
        "route",
        "add",
        "198.18.204.0/24",
        "nexthop",
        "via",
        "198.18.201.3",
        "weight",
        "2",
        "nexthop",
        "via",
        "198.18.202.3",
    )
    ip("route", "add", "2001:db8:205::/64", "via", "2001:db8:201::2", "metric", "7")


@pytest.fixture
def pair() -> Iterator[Pair]:
    """node_exporter and a nswatch daemon over this test's host devices, stopped and removed at the end."""
    require_root()
    exe = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if exe is None:
        pytest.fail("prometheus-node-exporter is not installed (.ci/install installs it)")
    lab = Lab(prefix=f"nswJ{secrets.token_hex(2)}")
    node: subprocess.Popen[bytes] | None = None
    daemon: Daemon | None = None
    server: HttpServer | None = None
    try:
        build(lab)
        port = free_port()
        node = subprocess.Popen(
            [
                exe,
                "--collector.disable-defaults",
                "--collector.netdev",
                "--collector.netdev.address-info",
                "--collector.netclass",
                "--collector.network_route",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        node_url = f"http://127.0.0.1:{port}/metrics"
        wait_for(lambda: _answers(node_url), timeout=15, interval=0.1)
        sink = MetricsSink()
        # Only the host: the include pattern matches no namespace file.
        daemon = Daemon(
            Settings(
                netns_dirs=(),
                include=f"^{lab.prefix}",
                reconcile_interval=0,
                stats_interval=1.0,
                discover_processes=False,
            ),
            observers=[sink],
            dirwatch_factory=DirWatcher,
        )
        sink.bind(daemon)
        api = Api(
            view=daemon.view,
            alive=lambda: True,
            ready=daemon.ready.is_set,
            metrics=sink.render,
        )
        server = HttpServer(("127.0.0.1", 0), api)
        server.start()
        daemon.start()
        assert daemon.ready.wait(30), "nswatch did not sync within 30 s"
        host, nport = server.address
        yield Pair(lab, node_url, f"http://{host}:{nport}/metrics", sink)
    finally:
        if daemon is not None:
            daemon.request_stop()
            if daemon.loop_thread is not None:
                daemon.loop_thread.join(5)
        if server is not None:
            server.stop()
        if node is not None:
            node.terminate()
            node.wait(10)
        lab.cleanup()


def _answers(url: str) -> bool:
    try:
        get(url)
    except OSError:
        return False
    return True


def compare(node: list[Sample], nsw: list[Sample]) -> list[str]:
    """What differs: a node series nswatch lacks or values differently, or an nswatch series node lacks."""
    problems: list[str] = []
    by_name: dict[str, list[Sample]] = {}
    for s in nsw:
        by_name.setdefault(s[0], []).append(s)
    matched: set[int] = set()
    shared = set()
    for name, labels, value in node:
        want = name.replace("node_", "nswatch_", 1)
        shared.add(want)
        keys = {k: v for k, v in labels.items() if k not in IGNORED_LABELS}
        found = [s for s in by_name.get(want, []) if all(s[1].get(k) == v for k, v in keys.items())]
        if len(found) != 1:
            problems.append(f"{name}{labels}: {len(found)} nswatch series")
        elif found[0][2] != value:
            problems.append(f"{name}{labels}: node {value} nswatch {found[0][2]}")
        else:
            matched.add(id(found[0]))
    for s in nsw:
        if s[0] in shared and id(s) not in matched:
            problems.append(f"{s[0]}{s[1]} only in nswatch")
    return problems


def test_every_shared_series_equals_node_exporters(pair: Pair) -> None:
    """Every node_network_* series of our devices has its nswatch twin for netns="host" with the same labels and value."""
    node: list[Sample] = []
    nsw: list[Sample] = []
    problems: list[str] = ["not compared yet"]

    def agree() -> bool:
        nonlocal node, nsw, problems
        node = pair.node()
        # nswatch's counters come from a link dump every second.
        time.sleep(1.2)
        nsw = pair.nswatch()
        problems = compare(node, nsw)
        return not problems

    # Devices settle (carrier, multicast reports) in the first seconds.
    with contextlib.suppress(AssertionError):
        wait_for(agree, timeout=30, interval=0.5)
    assert not problems, "\n".join(problems)
    names = {s[0] for s in node}
    # The comparison covered every family this test is about.
    for fam in (
        "node_network_info",
        "node_network_up",
        "node_network_carrier",
        "node_network_carrier_changes_total",
        "node_network_carrier_up_changes_total",
        "node_network_carrier_down_changes_total",
        "node_network_flags",
        "node_network_transmit_queue_length",
        "node_network_protocol_type",
        "node_network_iface_link",
        "node_network_mtu_bytes",
        "node_network_receive_bytes_total",
        "node_network_transmit_carrier_total",
        "node_network_receive_frame_total",
        "node_network_address_info",
        "node_network_route_info",
        "node_network_routes",
    ):
        assert fam in names, fam
    assert len(node) > 150
    down = {s[1]["device"] for s in node if s[0] == "node_network_up" and s[2] == 0}
    assert pair.lab.name("c") in down
    # A bridge port and a macvlan's lower device are promiscuous without anyone asking.
    promisc = {s[1]["device"] for s in nsw if s[0] == "nswatch_network_flags" and int(s[2]) & 0x100}
    assert promisc == {pair.lab.name("a"), pair.lab.name("b")}
