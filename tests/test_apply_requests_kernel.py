"""The applier's own rtnetlink requests against the real kernel: each step does what its `ip` command says."""

from __future__ import annotations

import pytest

from nswatch.apply import Applier, StepFailed
from nswatch.netns import NetnsEnterer
from nswatch.plan import Step
from tests.kernel import Lab, ip_json

pytestmark = pytest.mark.kernel


def test_every_step_kind_does_what_its_ip_command_says(lab: Lab) -> None:
    """Bridge, veth with MTU, master, MTU, link up, IPv4/IPv6 addresses and routes (gateway, device, metric, table) land as `ip` shows them."""
    ns = lab.netns("k1")
    br, host_end = lab.host_link(lab.name("br")), lab.host_link(lab.name("h"))
    enterer = NetnsEnterer()
    try:
        applier = Applier(enterer, lambda name: f"/run/netns/{name}")
        steps = [
            Step("create_bridge", "host", br),
            Step("link_up", "host", br),
            Step("create_veth", "host", host_end, "1400", peer="eth0", peer_netns=ns),
            Step("set_master", "host", host_end, br),
            Step("set_mtu", "host", host_end, "1300"),
            Step("link_up", "host", host_end),
            Step("set_mtu", ns, "eth0", "1300"),
            Step("add_address", ns, "eth0", "198.18.200.2/24"),
            Step("add_address", ns, "eth0", "2001:db8:c8::2/64"),
            Step("link_up", ns, "eth0"),
            Step("link_up", ns, "lo"),
            Step("add_route", ns, "eth0", "default", via="198.18.200.1"),
            Step("add_route", ns, "", "198.19.7.0/24", via="198.18.200.1", metric=50),
            Step("add_route", ns, "eth0", "198.19.8.0/24", table=100),
            Step("add_route", ns, "eth0", "2001:db8:c9::/48", via="2001:db8:c8::1"),
        ]
        assert applier.run(steps) == steps
        # Already there: addresses and routes are the goal, not an error.
        assert applier.run(steps[7:8] + steps[11:12]) == steps[7:8] + steps[11:12]
        with pytest.raises(StepFailed) as failed:
            applier.run(steps[2:3])
        assert "File exists" in str(failed.value)
    finally:
        enterer.close()
    bridge = ip_json(None, "-d", "link", "show", br)[0]
    assert bridge["linkinfo"]["info_kind"] == "bridge" and "UP" in bridge["flags"]
    hend = ip_json(None, "-d", "link", "show", host_end)[0]
    assert hend["linkinfo"]["info_kind"] == "veth"
    assert hend["master"] == br and hend["mtu"] == 1300 and "UP" in hend["flags"]
    eth0 = ip_json(ns, "addr", "show", "eth0")[0]
    assert eth0["mtu"] == 1300 and "UP" in eth0["flags"]
    assert {(a["local"], a["prefixlen"]) for a in eth0["addr_info"] if a["scope"] == "global"} == {
        ("198.18.200.2", 24),
        ("2001:db8:c8::2", 64),
    }
    assert "UP" in ip_json(ns, "link", "show", "lo")[0]["flags"]
    v4 = {r["dst"]: r for r in ip_json(ns, "-4", "route", "show")}
    assert v4["default"]["gateway"] == "198.18.200.1" and v4["default"]["dev"] == "eth0"
    assert v4["198.19.7.0/24"]["gateway"] == "198.18.200.1" and v4["198.19.7.0/24"]["metric"] == 50
    t100 = ip_json(ns, "-4", "route", "show", "table", "100")
    assert [(r["dst"], r["dev"], r.get("scope")) for r in t100] == [
        ("198.19.8.0/24", "eth0", "link")
    ]
    v6 = {r["dst"]: r for r in ip_json(ns, "-6", "route", "show")}
    assert v6["2001:db8:c9::/48"]["gateway"] == "2001:db8:c8::1"
