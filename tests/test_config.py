"""The config file: parsing, every validation problem with its line and key path."""

from __future__ import annotations

import ipaddress
import re
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nswatch.config import (
    DEFAULT_CONFIG_PATH,
    MAX_FILE_BYTES,
    AddressSpec,
    BridgeSpec,
    Config,
    ConfigError,
    IPNetwork,
    Problem,
    Profile,
    RouteSpec,
    VethSpec,
    check_config_main,
    host_name_pattern,
    is_own_network,
    load_config,
    netns_id,
    parse_config,
    render_host_name,
    validate_against_host,
)
from nswatch.config.overlap import earliest_overlaps
from nswatch.netns import NameFilter
from nswatch.settings import DEFAULTS, Settings, declared, settings_table

DATA = Path(__file__).parent / "data" / "config"


def problems(text: str) -> list[tuple[int | None, str, str]]:
    """(line, path, message) of every problem in ``text``, which must be invalid."""
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text))
    return [(p.line, p.path, p.message) for p in info.value.problems]


def only(text: str) -> tuple[int | None, str, str]:
    """The single problem in ``text``."""
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


def profile(body: str, head: str = "") -> str:
    """A config with one profile named p matching everything; ``body`` starts on line 5."""
    return head + "profiles:\n  - name: p\n    match: '*'\n    # profile body\n" + body


P2P = "    veth:\n      host_name: 'v{id}'\n      netns_name: eth0\n"  # lines 5-7


# -- the examples ----------------------------------------------------------------


def test_issue_example_loads_to_the_expected_objects() -> None:
    """The issue's example (point-to-point and bridge profiles) loads to exactly these objects."""
    path = str(DATA / "example.yaml")
    config = load_config(path)
    lab = Profile(
        name="lab",
        match="nstest*",
        loopback=True,
        sysctls=(("net.ipv4.ip_forward", "1"),),
        veth=VethSpec(
            host_name="nsw-{id}",
            netns_name="eth0",
            mtu=1500,
            pool=ipaddress.IPv4Network("198.18.0.0/17"),
            prefix=30,
            bridge=None,
            default_route=True,
        ),
        addresses=(),
        routes=(RouteSpec(dst="198.19.0.0/24", via="host_end"),),
        enforce=True,
    )
    containers = Profile(
        name="containers",
        match="regex:^ctr-[0-9]+$",
        loopback=True,
        veth=VethSpec(
            host_name="nsw-{id}",
            netns_name="eth0",
            bridge=BridgeSpec("nswbr0", ipaddress.IPv4Interface("198.18.128.1/24")),
            default_route=True,
        ),
        enforce=False,
    )
    assert config == Config(
        settings=Settings(listen=("127.0.0.1", 9442), netns_dirs=("/run/netns",)),
        profiles=(lab, containers),
        source=path,
    )
    assert config.key_lines["profiles[0].veth.pool"] == 13
    assert config.profile_for("nstest1") == lab
    assert config.profile_for("ctr-12") == containers
    assert config.profile_for("ctr-12x") is None


def test_empty_file_gives_the_defaults() -> None:
    """An empty document (or only comments) is the default config."""
    assert parse_config("# nothing\n", source="f") == Config(source="f")
    assert parse_config("") == Config(source="<string>")


def test_every_key_round_trips() -> None:
    """Every top-level key, and every profile key, is read into its typed field."""
    config = parse_config(
        textwrap.dedent(
            """\
            listen: "[::1]:9000"
            netns_dirs: [/run/netns, /var/run/docker/netns/]
            include: ^ns
            exclude: -tmp$
            host_label: root
            log_format: json
            log_level: DEBUG
            netlink_rcvbuf: 1048576
            reconcile_interval: 0
            rescan_interval: 2.5
            stats_interval: 0
            web_config_file: /etc/nswatch/web.yml
            profiles:
              - name: full
                match: "regex:^x"
                loopback: down
                sysctls:
                  net.ipv6.conf.all.disable_ipv6: false
                  net.ipv4.ip_local_port_range: "32768 60999"
                  net.ipv4.ip_forward: yes
                veth:
                  host_name: "h-{netns}"
                  netns_name: eth1
                  mtu: 9000
                  pool: "fd00:10::/56"
                  prefix: 64
                addresses:
                  - {address: 10.9.0.1/32, dev: lo}
                  - {address: "FD00::1/128", dev: lo}
                routes:
                  - {dst: 10.8.0.1, dev: eth1, metric: 10, table: 100}
                  - {dst: "FD01:0:0::/64", via: host_end}
                  - {dst: default, via: "fd00:10::1"}
                enforce: false
            """
        )
    )
    assert config.settings == Settings(
        listen=("::1", 9000),
        netns_dirs=("/run/netns", "/var/run/docker/netns"),
        include="^ns",
        exclude="-tmp$",
        host_label="root",
        log_format="json",
        log_level="debug",
        netlink_rcvbuf=1048576,
        reconcile_interval=0.0,
        rescan_interval=2.5,
        stats_interval=0.0,
        web_config_file="/etc/nswatch/web.yml",
    )
    (p,) = config.profiles
    assert p.loopback is False
    # File order is kept: sysctls are applied in the order written.
    assert p.sysctls == (
        ("net.ipv6.conf.all.disable_ipv6", "0"),
        ("net.ipv4.ip_local_port_range", "32768 60999"),
        ("net.ipv4.ip_forward", "1"),
    )
    assert p.veth == VethSpec(
        "h-{netns}", "eth1", 9000, ipaddress.IPv6Network("fd00:10::/56"), 64, None, False
    )
    assert p.addresses == (
        AddressSpec(ipaddress.IPv4Interface("10.9.0.1/32"), "lo"),
        AddressSpec(ipaddress.IPv6Interface("fd00::1/128"), "lo"),
    )
    assert p.routes == (
        RouteSpec("10.8.0.1/32", None, "eth1", 10, 100),
        RouteSpec("fd01::/64", "host_end"),
        RouteSpec("default", "fd00:10::1"),
    )


def test_merge_keys_and_x_anchors() -> None:
    """Top-level x-* keys may hold anchors, and << merges them with written keys winning."""
    config = parse_config(
        textwrap.dedent(
            """\
            x-veth: &veth {host_name: "v{id}", netns_name: eth0, mtu: 1000}
            profiles:
              - name: a
                match: a*
                veth:
                  <<: *veth
                  mtu: 1400
                  pool: 10.0.0.0/24
                  prefix: 30
            """
        )
    )
    veth = config.profiles[0].veth
    assert veth is not None
    assert (veth.host_name, veth.mtu) == ("v{id}", 1400)


def test_loopback_accepts_yaml_booleans() -> None:
    """loopback takes up/down, and YAML 1.1's on/off/true/false."""
    for text, want in (("up", True), ("down", False), ("on", True), ("off", False)):
        config = parse_config(profile(f"    loopback: {text}\n"))
        assert config.profiles[0].loopback is want


# -- problems, one class per test ---------------------------------------------------


def test_unparseable_yaml() -> None:
    """Broken YAML is one problem at its line, with no key path."""
    assert only("listen: 127.0.0.1:1\nhost_label: [a, b\n") == (
        3,
        "",
        "invalid YAML: while parsing a flow sequence: did not find expected ',' or ']'",
    )
    assert only("listen: 1\n  bad: 2\n") == (
        2,
        "",
        "invalid YAML: mapping values are not allowed in this context",
    )


def test_tabs_are_unparseable_yaml() -> None:
    """A tab in indentation is reported at its line."""
    line, path, message = only("profiles:\n\t- name: x\n")
    assert (line, path) == (2, "")
    assert message.startswith("invalid YAML")


def test_several_documents() -> None:
    """A second YAML document is an error at the line where it starts."""
    assert only("listen: a:1\n---\nlisten: b:2\n")[:2] == (2, "")


def test_top_level_must_be_a_mapping() -> None:
    """A top-level list is refused."""
    assert only("- listen\n") == (1, "", "must be a mapping, not a list")


def test_unknown_keys_at_every_level() -> None:
    """Unknown keys are reported with their own line and path, with a suggestion when close."""
    assert problems(
        """\
        lisen: 127.0.0.1:1
        profiles:
          - name: p
            match: '*'
            vet: {}
            veth:
              host_name: 'v{id}'
              netns_name: eth0
              pool: 10.0.0.0/8
              prefix: 24
              bridge_name: br0
            routes:
              - {dst: default, dev: eth0, gateway: 10.0.0.1}
        """
    ) == [
        (1, "lisen", "unknown key (did you mean 'listen'?)"),
        (5, "profiles[0].vet", "unknown key (did you mean 'veth'?)"),
        (11, "profiles[0].veth.bridge_name", "unknown key (did you mean 'bridge'?)"),
        (13, "profiles[0].routes[0].gateway", "unknown key"),
    ]


def test_duplicate_keys() -> None:
    """A key written twice in one mapping is an error at the second, naming the first."""
    assert only("log_level: info\nlisten: a:1\nlog_level: debug\n") == (
        3,
        "log_level",
        "duplicate key (first on line 1)",
    )


def test_duplicate_keys_inside_a_profile() -> None:
    """Duplicate keys are found at any depth, including sysctls."""
    text = profile("    sysctls:\n      net.ipv4.ip_forward: 1\n      net.ipv4.ip_forward: 0\n")
    assert only(text) == (
        7,
        "profiles[0].sysctls.net.ipv4.ip_forward",
        "duplicate key (first on line 6)",
    )


def test_required_keys() -> None:
    """A profile without name or match, or a veth without names, says which key is missing."""
    assert problems(
        "profiles:\n  - {loopback: up}\n  - name: b\n    veth: {pool: 10.0.0.0/8, prefix: 24}\n"
    ) == [
        (2, "profiles[0].name", "is required"),
        (2, "profiles[0].match", "is required"),
        (3, "profiles[1].match", "is required"),
        (4, "profiles[1].veth.host_name", "is required"),
        (4, "profiles[1].veth.netns_name", "is required"),
    ]


def test_wrong_types() -> None:
    """Values of the wrong type name the type found."""
    assert problems("profiles: {a: 1}\nhost_label: [x]\n") == [
        (1, "profiles", "must be a list, not a mapping"),
        (2, "host_label", "must be a label, not a list"),
    ]


def test_bad_cidr() -> None:
    """An unparseable pool, or one with host bits set, is refused at its line."""
    text = profile(P2P + "      pool: 198.18.0.300/16\n      prefix: 30\n")
    assert only(text) == (
        8,
        "profiles[0].veth.pool",
        "'198.18.0.300/16' is not a valid network: "
        "'198.18.0.300/16' does not appear to be an IPv4 or IPv6 network",
    )
    text = profile(P2P + "      pool: 198.18.0.1/16\n      prefix: 30\n")
    assert only(text) == (
        8,
        "profiles[0].veth.pool",
        "'198.18.0.1/16' is not a valid network: 198.18.0.1/16 has host bits set",
    )
    text = profile(P2P + "      pool: 198.18.0.0\n      prefix: 30\n")
    assert only(text)[:2] == (8, "profiles[0].veth.pool")


def test_pool_too_small() -> None:
    """A pool that cannot hold one subnet of the prefix is refused."""
    text = profile(P2P + "      pool: 198.18.0.0/31\n      prefix: 30\n")
    assert only(text) == (
        8,
        "profiles[0].veth.pool",
        "198.18.0.0/31 is too small for one /30 subnet",
    )


def test_prefix_range_ipv4() -> None:
    """An IPv4 prefix must be 8..30, with the contract's exact message."""
    text = """\
        profiles:
          - {name: o, match: o}
          - name: p
            match: p*
            veth:
              host_name: "v{id}"
              netns_name: eth0
              pool: 10.0.0.0/8
              prefix: 31
        """
    assert only(text) == (9, "profiles[1].veth.prefix", "must be between 8 and 30")


def test_prefix_range_ipv6() -> None:
    """An IPv6 prefix must be 8..126 (room for the network and two host addresses)."""
    text = profile(P2P + "      pool: 'fd00::/48'\n      prefix: 127\n")
    assert only(text) == (9, "profiles[0].veth.prefix", "must be between 8 and 126")


def test_veth_needs_one_topology() -> None:
    """A veth needs pool+prefix or bridge, not both, and never half a pool."""
    assert only(profile(P2P)) == (5, "profiles[0].veth", "needs either pool and prefix, or bridge")
    text = profile(
        P2P + "      pool: 10.0.0.0/8\n      bridge: {name: br0, address: 10.1.0.1/24}\n"
    )
    assert only(text) == (
        9,
        "profiles[0].veth.bridge",
        "use either pool and prefix, or bridge, not both",
    )
    assert only(profile(P2P + "      pool: 10.0.0.0/8\n")) == (
        8,
        "profiles[0].veth.prefix",
        "is required with pool",
    )
    assert only(profile(P2P + "      prefix: 30\n")) == (
        8,
        "profiles[0].veth.pool",
        "is required with prefix",
    )


def test_name_template_too_long() -> None:
    """A host_name template that can render over 15 bytes is refused at load time."""
    text = profile(
        "    veth:\n      host_name: 'nswatch-{id}'\n      netns_name: eth0\n"
        "      pool: 10.0.0.0/8\n      prefix: 30\n"
    )
    assert only(text) == (
        6,
        "profiles[0].veth.host_name",
        "renders to 16 bytes; interface names are at most 15 bytes",
    )


def test_name_template_without_room_for_netns() -> None:
    """A {netns} template must leave at least 5 bytes for the (shortened) name."""
    text = profile(
        "    veth:\n      host_name: 'veth-{id}{netns}'\n      netns_name: eth0\n"
        "      pool: 10.0.0.0/8\n      prefix: 30\n"
    )
    assert only(text) == (
        6,
        "profiles[0].veth.host_name",
        "leaves 2 bytes for {netns}; needs at least 5 (interface names are at most 15 bytes)",
    )


def test_name_template_variables() -> None:
    """Templates need {id} or {netns}, know no other variables, and no bad characters."""
    cases = {
        "fixed": "must contain {id} or {netns} so each namespace gets its own name",
        "v{name}": "unknown variable {name} (use {netns} or {id})",
        "v{id:>4}": "{id} takes no format spec or conversion",
        "v:{id}": "character ':' is not allowed in an interface name",
        "v{netns}{netns}": "{netns} may appear only once",
        "v{id": "bad template: expected '}' before end of string",
    }
    for template, message in cases.items():
        text = profile(
            f"    veth:\n      host_name: '{template}'\n      netns_name: eth0\n"
            "      pool: 10.0.0.0/8\n      prefix: 30\n"
        )
        assert only(text) == (6, "profiles[0].veth.host_name", message), template


def test_netns_side_name() -> None:
    """veth.netns_name must be a valid interface name of at most 15 bytes."""
    base = "    veth:\n      host_name: 'v{id}'\n      netns_name: %s\n      pool: 10.0.0.0/8\n      prefix: 30\n"
    assert only(profile(base % "eth0-is-too-long")) == (
        7,
        "profiles[0].veth.netns_name",
        "'eth0-is-too-long' is longer than 15 bytes",
    )
    assert only(profile(base % "'a/b'")) == (
        7,
        "profiles[0].veth.netns_name",
        "'a/b' is not a valid interface name",
    )


def test_mtu() -> None:
    """MTU is 68..65535, and at least 1280 with IPv6 addressing."""
    text = profile(P2P + "      mtu: 67\n      pool: 10.0.0.0/8\n      prefix: 30\n")
    assert only(text) == (8, "profiles[0].veth.mtu", "must be between 68 and 65535")
    text = profile(P2P + "      mtu: 1200\n      pool: 'fd00::/48'\n      prefix: 64\n")
    assert only(text) == (8, "profiles[0].veth.mtu", "must be at least 1280 for IPv6")


def test_overlapping_pools_between_profiles() -> None:
    """Pools and bridge subnets must not overlap: each is reported once, against the first listed one it overlaps."""
    text = textwrap.dedent(
        """\
        profiles:
          - name: a
            match: a*
            veth: {host_name: "a{id}", netns_name: eth0, pool: 10.0.0.0/16, prefix: 30}
          - name: b
            match: b*
            veth:
              host_name: "b{id}"
              netns_name: eth0
              pool: 10.0.128.0/17
              prefix: 30
          - name: c
            match: c*
            veth:
              host_name: "c{id}"
              netns_name: eth0
              bridge: {name: br0, address: 10.0.200.1/24}
        """
    )
    assert problems(text) == [
        (10, "profiles[1].veth.pool", "10.0.128.0/17 overlaps 10.0.0.0/16 (profiles[0].veth.pool)"),
        (
            17,
            "profiles[2].veth.bridge.address",
            "10.0.200.0/24 overlaps 10.0.0.0/16 (profiles[0].veth.pool)",
        ),
    ]


def test_shared_bridge() -> None:
    """Profiles may share a bridge when they agree on its address, not otherwise."""
    row = "  - {name: %s, match: %s, veth: {host_name: '%s{id}', netns_name: e, bridge: {name: br0, address: %s}}}\n"
    ok = "profiles:\n" + row % ("a", "a", "a", "10.1.0.1/24") + row % ("b", "b", "b", "10.1.0.1/24")
    assert len(parse_config(ok).profiles) == 2
    bad = ok + row % ("c", "c", "c", "10.2.0.1/24")
    assert only(bad) == (
        4,
        "profiles[2].veth.bridge.address",
        "bridge br0 already has address 10.1.0.1/24 (profiles[0].veth.bridge.address)",
    )


def test_bridge_address_needs_room() -> None:
    """The bridge address must be a host address leaving room for a namespace."""
    base = P2P + "      bridge: {name: br0, address: %s}\n"
    cases = {
        "10.0.0.0/24": "10.0.0.0/24 is the subnet's network address",
        "10.0.0.255/24": "10.0.0.255/24 is the subnet's broadcast address",
        "10.0.0.1/32": "subnet 10.0.0.1/32 has no address left for a namespace",
        "10.0.0.1": "'10.0.0.1' needs a prefix length, like 198.18.128.1/24",
    }
    for address, message in cases.items():
        assert only(profile(base % address)) == (
            8,
            "profiles[0].veth.bridge.address",
            message,
        ), address
    assert parse_config(profile(base % "10.0.0.1/31")).profiles[0].veth is not None


def test_duplicate_profile_names() -> None:
    """Profile names are unique, even when a profile has other problems."""
    text = "profiles:\n  - {name: a, match: a}\n  - {name: a, match: b, loopback: x}\n"
    assert problems(text) == [
        (3, "profiles[1].loopback", "must be up or down, not str 'x'"),
        (3, "profiles[1].name", "duplicate profile name 'a' (also profiles[0])"),
    ]


def test_bad_match_regex() -> None:
    """A regex: match must compile and not be empty."""
    assert only("profiles:\n  - name: a\n    match: 'regex:[a'\n") == (
        3,
        "profiles[0].match",
        "bad regular expression: missing ]: [a",
    )
    assert only("profiles:\n  - {name: a, match: 'regex:'}\n")[1:] == (
        "profiles[0].match",
        '"regex:" needs a pattern after it',
    )


def test_sysctl_keys_and_values() -> None:
    """Sysctls are dotted net.* names with integer or string values."""
    text = profile(
        "    sysctls:\n"
        "      kernel.panic: 1\n"
        "      net/ipv4/ip_forward: 1\n"
        "      net.ipv4: 1\n"
        "      net.ipv4.conf.all.forwarding: 1.5\n"
        "      net.ipv4.conf.eth0/100.forwarding: 1\n"
    )
    hint = "not a per-namespace sysctl: use a dotted net.* name like net.ipv4.ip_forward"
    assert problems(text) == [
        (6, "profiles[0].sysctls.kernel.panic", hint),
        (7, "profiles[0].sysctls.net/ipv4/ip_forward", hint),
        (8, "profiles[0].sysctls.net.ipv4", hint),
        (
            9,
            "profiles[0].sysctls.net.ipv4.conf.all.forwarding",
            "must be an integer or a string, not float 1.5",
        ),
    ]


def test_route_via_family() -> None:
    """A route's via must be an address of dst's family, or host_end of the veth's family."""
    text = profile(
        P2P
        + "      pool: 10.0.0.0/8\n      prefix: 30\n"
        + "    routes:\n"
        + "      - {dst: 10.1.0.0/16, via: 'fe80::1'}\n"
        + "      - {dst: 'fd00::/8', via: host_end}\n"
        + "      - {dst: default, via: host_end}\n"
        + "      - {dst: 10.2.0.0/16, via: nexthop}\n"
    )
    assert problems(text) == [
        (11, "profiles[0].routes[0].via", "must be an IPv4 address like dst"),
        (12, "profiles[0].routes[1].via", "host_end is IPv4 but dst is IPv6"),
        (14, "profiles[0].routes[3].via", "'nexthop' is not an address or \"host_end\""),
    ]


def test_route_host_end_needs_a_veth() -> None:
    """via: host_end in a profile without a veth is an error."""
    text = profile("    routes:\n      - {dst: 10.0.0.0/8, via: host_end}\n")
    assert only(text) == (6, "profiles[0].routes[0].via", "host_end needs a veth in this profile")


def test_route_fields() -> None:
    """dst must be default or a CIDR without host bits; a route needs via or dev; ranges hold."""
    text = profile(
        "    routes:\n"
        "      - {dst: 10.0.0.1/8, dev: eth0}\n"
        "      - {dst: 10.0.0.0/8}\n"
        "      - {dst: 10.0.0.0/8, dev: eth0, metric: -1, table: 0}\n"
        "      - {via: 10.0.0.1}\n"
    )
    assert problems(text) == [
        (
            6,
            "profiles[0].routes[0].dst",
            "'10.0.0.1/8' is not \"default\" or a valid CIDR: 10.0.0.1/8 has host bits set",
        ),
        (7, "profiles[0].routes[1]", "needs via or dev"),
        (8, "profiles[0].routes[2].metric", "must be between 0 and 4294967295"),
        (8, "profiles[0].routes[2].table", "must be between 1 and 4294967295"),
        (9, "profiles[0].routes[3].dst", "is required"),
    ]


def test_addresses() -> None:
    """Namespace addresses need an explicit prefix and a device."""
    text = profile(
        "    addresses:\n      - {address: 10.0.0.1, dev: lo}\n      - address: 10.0.0.2/8\n"
    )
    assert problems(text) == [
        (
            6,
            "profiles[0].addresses[0].address",
            "'10.0.0.1' needs a prefix length, like 198.18.128.1/24",
        ),
        (7, "profiles[0].addresses[1].dev", "is required"),
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("127.0.0.1", 'must be "HOST:PORT" or "[IPV6]:PORT"'),
        ("127.0.0.1:http", "port 'http' is not a number"),
        ("127.0.0.1:70000", "must be between 0 and 65535"),
        (
            "::1:80",
            'must be "HOST:PORT" or "[IPV6]:PORT" (put an IPv6 address in brackets: "[::1]:9442")',
        ),
        ("[127.0.0.1]:80", "'127.0.0.1' is not an IPv6 address"),
        ("300.1.1.1:80", "'300.1.1.1' is not an IPv4 address"),
        ("bad_host:80", "'bad_host' is not an address or host name"),
        (":80", 'must be "HOST:PORT" or "[IPV6]:PORT"'),
    ],
)
def test_listen(value: str, message: str) -> None:
    """listen must parse as HOST:PORT or [IPV6]:PORT."""
    assert only(f"log_level: info\nlisten: '{value}'\n") == (2, "listen", message)


def test_listen_accepts_names_and_ipv6() -> None:
    """listen takes host names, IPv4 and bracketed IPv6 (brackets dropped)."""
    assert parse_config("listen: localhost:1\n").settings.listen == ("localhost", 1)
    assert parse_config("listen: '[::]:9442'\n").settings.listen == ("::", 9442)
    assert parse_config("listen: 0.0.0.0:0\n").settings.listen == ("0.0.0.0", 0)


def test_top_level_values() -> None:
    """Regexes compile; levels, formats, buffer sizes, intervals and directories are checked."""
    text = textwrap.dedent(
        """\
        include: "("
        exclude: "[z"
        log_level: loud
        log_format: xml
        netlink_rcvbuf: 0
        reconcile_interval: -1
        rescan_interval: 0
        netns_dirs: [run/netns]
        host_label: ""
        """
    )
    assert problems(text) == [
        (1, "include", "bad regular expression: missing ): ("),
        (2, "exclude", "bad regular expression: missing ]: [z"),
        (3, "log_level", "must be one of debug, info, warning, error, critical"),
        (4, "log_format", "must be json, console or auto (json when stderr is not a terminal)"),
        (5, "netlink_rcvbuf", "must be between 1 and 2147483647"),
        (6, "reconcile_interval", "must be at least 10 seconds or 0 (disabled)"),
        (7, "rescan_interval", "must be at least 1 second"),
        (8, "netns_dirs", "'run/netns' is not an absolute path"),
        (9, "host_label", "must be a label, not empty"),
    ]


def test_all_problems_are_reported_together() -> None:
    """Validation does not stop at the first problem: problems from every level come back."""
    text = profile(
        "    veth:\n      host_name: 'x{nope}'\n      netns_name: eth0\n"
        "      pool: 10.0.0.0/33\n      prefix: 30\n"
        "    enforce: maybe\n",
        head="listen: nope\nlog_level: loud\n",
    )
    assert [(line, path) for line, path, _ in problems(text)] == [
        (1, "listen"),
        (2, "log_level"),
        (8, "profiles[0].veth.host_name"),
        (10, "profiles[0].veth.pool"),
        (12, "profiles[0].enforce"),
    ]


def test_problem_str() -> None:
    """A problem prints as FILE:LINE: PATH: MESSAGE, dropping what it lacks."""
    assert str(Problem("f.yaml", 3, "profiles[1].veth.prefix", "must be between 8 and 30")) == (
        "f.yaml:3: profiles[1].veth.prefix: must be between 8 and 30"
    )
    assert str(Problem("f.yaml", None, "", "no such file")) == "f.yaml: no such file"
    assert str(Problem("<command line>", None, "listen", "bad")) == "<command line>: listen: bad"


# -- host checks --------------------------------------------------------------------


def test_pools_overlapping_host_addresses() -> None:
    """validate_against_host flags pools and bridge subnets overlapping host networks, by line."""
    config = load_config(str(DATA / "example.yaml"))
    host = [
        ipaddress.ip_network("192.168.1.0/24"),
        ipaddress.ip_network("198.18.5.0/24"),
        ipaddress.ip_network("198.18.128.0/20"),
        ipaddress.ip_network("fd00::/64"),
    ]
    found = validate_against_host(config, host)
    assert [str(p) for p in found] == [
        f"{config.source}:13: profiles[0].veth.pool: 198.18.0.0/17 overlaps 198.18.5.0/24,"
        " already on the host",
        f"{config.source}:25: profiles[1].veth.bridge.address: 198.18.128.0/24 overlaps"
        " 198.18.128.0/20, already on the host",
    ]
    assert validate_against_host(config, [ipaddress.ip_network("10.0.0.0/8")]) == []
    shared = replace(config, profiles=(*config.profiles, replace(config.profiles[1], name="x")))
    assert len(validate_against_host(shared, host)) == 2


def test_own_networks_are_recognised() -> None:
    """A pool subnet on a link the template can render, or the bridge subnet on the bridge, is ours."""
    config = load_config(str(DATA / "example.yaml"))
    sub = ipaddress.ip_network("198.18.0.4/30")
    name = render_host_name("nsw-{id}", "nstest1")
    assert is_own_network(config, name, sub)
    assert not is_own_network(config, "eth0", sub)
    assert not is_own_network(config, name, ipaddress.ip_network("198.18.0.0/24"))
    assert not is_own_network(config, name, ipaddress.ip_network("10.0.0.4/30"))
    bridge = ipaddress.ip_network("198.18.128.0/24")
    assert is_own_network(config, "nswbr0", bridge)
    assert not is_own_network(config, "br1", bridge)


# -- names ----------------------------------------------------------------------------

# Names from os.listdir may carry undecodable bytes as lone surrogates.
netns_names = st.text(min_size=1, max_size=300) | st.binary(min_size=1, max_size=40).map(
    lambda b: b.decode("utf-8", "surrogateescape")
)


@given(netns_names)
def test_rendered_names_always_fit(netns: str) -> None:
    """Every template that loads renders a valid, stable name of at most 15 bytes for any netns."""
    for template in ("nsw-{id}", "nsw-{netns}", "{netns}", "v{netns}-{id}", "{id}{netns}x"):
        name = render_host_name(template, netns)
        assert 1 <= len(name.encode()) <= 15
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+", name)
        assert name not in (".", "..")
        assert render_host_name(template, netns) == name
        assert host_name_pattern(template).fullmatch(name)


@given(st.from_regex(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,10}", fullmatch=True))
def test_short_names_render_verbatim(netns: str) -> None:
    """A safe name that fits is used as is."""
    assert render_host_name("nsw-{netns}", netns) == f"nsw-{netns}"


def test_long_names_are_shortened_with_a_hash() -> None:
    """A name too long (or unsafe) keeps its start and gets 4 hex digits of its id."""
    long = "a-very-long-namespace-name"
    assert render_host_name("nsw-{netns}", long) == "nsw-a-very-" + netns_id(long)[:4]
    assert render_host_name("nsw-{netns}", "a b") == "nsw-a_b" + netns_id("a b")[:4]
    assert render_host_name("nsw-{netns}", "a-very-long-namespace-nam3") != render_host_name(
        "nsw-{netns}", long
    )


def test_id_is_short_and_stable() -> None:
    """{id} is 8 hex digits of BLAKE2b of the name, the same across runs."""
    assert netns_id("nstest1") == "cb222b74"
    assert render_host_name("nsw-{id}", "nstest1") == "nsw-cb222b74"


def test_render_rejects_bad_templates() -> None:
    """render_host_name raises ValueError for a template load would refuse."""
    with pytest.raises(ValueError, match="renders to 16 bytes"):
        render_host_name("nswatch-{id}", "x")


# -- matching ---------------------------------------------------------------------------


def test_profile_matching_semantics() -> None:
    """Globs match the whole name; regex: uses re.search, so unanchored patterns match inside."""
    glob = Profile("g", "ns*")
    assert glob.matches("ns1") and not glob.matches("xns1")
    assert not Profile("g", "NS*").matches("ns1")
    rx = Profile("r", "regex:test")
    assert rx.matches("my-test-ns")
    assert not Profile("r", "regex:^test$").matches("my-test-ns")


def test_first_matching_profile_wins() -> None:
    """profile_for returns the first profile, in file order, that matches."""
    a, b = Profile("a", "ns-*"), Profile("b", "*")
    config = Config(profiles=(a, b))
    assert config.profile_for("ns-1") is a
    assert config.profile_for("other") is b
    assert Config().profile_for("ns-1") is None


# -- overrides --------------------------------------------------------------------------


def test_overrides_win_and_are_validated() -> None:
    """Command-line values replace the file's after the same checks; None means not given."""
    config = parse_config("listen: 127.0.0.1:1\nlog_level: info\n")
    new = config.with_overrides(
        listen=("0.0.0.0", 9000), log_level="DEBUG", netns_dirs=("/a",), include=None
    ).settings
    assert (new.listen, new.log_level, new.netns_dirs) == (("0.0.0.0", 9000), "debug", ("/a",))
    assert config.with_overrides(listen="[::1]:5").settings.listen == ("::1", 5)
    with pytest.raises(ConfigError) as info:
        config.with_overrides(listen="nope", netlink_rcvbuf=-5)
    assert [str(p) for p in info.value.problems] == [
        '<command line>: listen: must be "HOST:PORT" or "[IPV6]:PORT"',
        "<command line>: netlink_rcvbuf: must be between 1 and 2147483647",
    ]
    with pytest.raises(TypeError):
        config.with_overrides(colour="blue")


# -- files and the check-config command ------------------------------------------------


def test_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing default file gives the defaults unless required; a missing named file is an error."""
    monkeypatch.setattr("nswatch.config.load.DEFAULT_CONFIG_PATH", str(tmp_path / "none.yaml"))
    assert load_config(None) == Config()
    assert load_config(str(tmp_path / "none.yaml")) == Config()
    with pytest.raises(ConfigError, match=r"none\.yaml: no such file"):
        load_config(None, required=True)
    with pytest.raises(ConfigError, match=r"other\.yaml: no such file"):
        load_config(str(tmp_path / "other.yaml"))
    assert DEFAULT_CONFIG_PATH == "/etc/nswatch/nswatch.yaml"


def test_unreadable_files(tmp_path: Path) -> None:
    """A directory or non-UTF-8 bytes are problems, not crashes."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"listen: a:1\nhost_label: \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad))
    assert [str(p) for p in info.value.problems] == [f"{bad}:2: not UTF-8 text"]


def test_check_config_ok(capsys: pytest.CaptureFixture[str]) -> None:
    """check-config prints OK with the profile count and returns 0 for a valid file."""
    path = str(DATA / "example.yaml")
    assert check_config_main(path) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (f"OK: {path} (2 profiles)\n", "")


def test_check_config_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config prints one line per problem to stderr and returns 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(profile(P2P + "      pool: 10.0.0.0/8\n      prefix: 31\n", head="bogus: 1\n"))
    assert check_config_main(str(bad)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{bad}:1: bogus: unknown key",
        f"{bad}:10: profiles[0].veth.prefix: must be between 8 and 30",
    ]


def test_check_config_host_overlap_and_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config also fails on host overlaps, and on a file that does not exist."""
    path = str(DATA / "example.yaml")
    assert check_config_main(path, [ipaddress.ip_network("198.18.0.0/15")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 2
    assert check_config_main(str(tmp_path / "none.yaml")) == 2
    assert capsys.readouterr().err == f"{tmp_path / 'none.yaml'}: no such file\n"


# -- hostile files ------------------------------------------------------------------------


def _refusal_cost(text: str) -> tuple[float, int, ConfigError]:
    """(CPU seconds, peak bytes allocated, the error) of refusing ``text``, which must be refused."""
    start = time.process_time()
    with pytest.raises(ConfigError):
        parse_config(text)
    cpu = time.process_time() - start
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as info:
            parse_config(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return cpu, peak, info.value


def _merge_bomb() -> str:
    """About 600 bytes of merge keys standing for 10**9 keys."""
    lines = ["x-a: &a {k0: 1, k1: 1, k2: 1, k3: 1, k4: 1, k5: 1, k6: 1, k7: 1, k8: 1, k9: 1}"]
    prev = "a"
    for name in "bcdefghij":
        lines.append(f"x-{name}: &{name} {{<<: [{', '.join([f'*{prev}'] * 10)}]}}")
        prev = name
    lines.append(f"profiles: [{{<<: *{prev}, name: p, match: x}}]")
    return "\n".join(lines) + "\n"


def _laughs() -> str:
    """Nested lists of aliases: a few hundred bytes standing for 10**9 values."""
    lines = ["x-0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        lines.append(f"x-{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
    lines.append("profiles: *l9")
    return "\n".join(lines) + "\n"


def test_deep_nesting_is_a_problem_not_a_crash() -> None:
    """Nesting thousands of levels deep is one located problem, not a RecursionError."""
    (problem,) = problems("profiles: " + "[" * 3000 + "]" * 3000 + "\n")
    assert problem[0] == 1 and problem[2].startswith("invalid YAML")
    block = "profiles:\n" + "".join("  " * i + "- \n" for i in range(100)) + "  " * 100 + "- x\n"
    (line, path, message) = only(block)
    assert path == "profiles" + "[0]" * 31 and message == "nests deeper than 32 levels"
    assert line == 33


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(_merge_bomb(), id="merge-keys"),
        pytest.param(_laughs(), id="alias-lists"),
        pytest.param("x-list: [" + "1," * 499_000 + "1]\n", id="flat-1MB"),
        pytest.param("x-a: &a 1\nx-list: [" + "*a," * 250_000 + "*a]\n", id="aliases-1MB"),
        pytest.param("profiles:\n" + "- {name: a, match: b}\n" * 45_000, id="profiles-1MB"),
    ],
)
def test_yaml_bombs_are_refused_quickly(text: str) -> None:
    """Any file under 1 MB is refused within 1 s of CPU and 50 MB, with its line and key path."""
    assert len(text) < 1_000_000
    cpu, peak, error = _refusal_cost(text)
    assert cpu < 1.0
    assert peak < 50_000_000
    assert len(error.problems) == 1
    assert "expands to more than 200000 values" in error.problems[0].message


def test_files_over_the_size_limit_are_refused(tmp_path: Path) -> None:
    """A file larger than MAX_FILE_BYTES is refused without being parsed."""
    big = tmp_path / "big.yaml"
    big.write_text("#" * MAX_FILE_BYTES + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(big))
    assert [str(p) for p in info.value.problems] == [
        f"{big}: larger than 4 MiB; a config file is at most that"
    ]


def _pools(n: int, same: bool = False) -> str:
    rows = ["profiles:"]
    for i in range(n):
        pool = "10.0.0.0/24" if same else f"10.{i // 256}.{i % 256}.0/24"
        rows.append(
            f"- {{name: p{i}, match: 'n{i}-*', veth: {{host_name: 'v{{id}}', netns_name: e,"
            f" pool: {pool}, prefix: 30}}}}"
        )
    return "\n".join(rows) + "\n"


def test_ten_thousand_pools_are_checked_in_near_linear_time() -> None:
    """10,000 profiles with pools load and check against the host in seconds (the pairwise checks took minutes)."""
    start = time.process_time()
    config = parse_config(_pools(10_000))
    host = [ipaddress.ip_network("10.39.0.0/16"), ipaddress.ip_network("10.0.7.128/25")]
    found = validate_against_host(config, host)
    assert time.process_time() - start < 20
    assert len(config.profiles) == 10_000
    assert [p.path for p in found] == ["profiles[7].veth.pool"] + [
        f"profiles[{i}].veth.pool" for i in range(39 * 256, 10_000)
    ]


def test_every_overlapping_pool_is_reported_once() -> None:
    """10,000 copies of one pool give one problem each, against the first: not one per pair."""
    start = time.process_time()
    found = problems(_pools(10_000, same=True))
    assert time.process_time() - start < 20
    assert len(found) == 9_999
    assert found[-1] == (
        10_001,
        "profiles[9999].veth.pool",
        "10.0.0.0/24 overlaps 10.0.0.0/24 (profiles[0].veth.pool)",
    )


small_networks = st.builds(
    lambda v, a, p: (
        ipaddress.IPv4Network((a << 24, p), strict=False)
        if v == 4
        else ipaddress.IPv6Network((a << 120, p + 96), strict=False)
    ),
    st.sampled_from([4, 6]),
    st.integers(0, 255),
    st.integers(0, 32),
)


@given(st.lists(small_networks, max_size=30))
def test_earliest_overlaps_is_the_pairwise_answer(nets: list[IPNetwork]) -> None:
    """The sweep finds, for every network, the first listed network overlapping it, as comparing every pair does."""
    want = {}
    for i, net in enumerate(nets):
        for j in range(i):
            if nets[j].version == net.version and nets[j].overlaps(net):
                want[i] = j
                break
    assert earliest_overlaps(nets) == want


def test_intervals_have_floors() -> None:
    """Intervals that would spin a core are refused with their key path; 0 still turns the optional ones off."""
    text = "rescan_interval: 0.000001\nreconcile_interval: 9.5\nstats_interval: 0.5\n"
    assert problems(text) == [
        (1, "rescan_interval", "must be at least 1 second"),
        (2, "reconcile_interval", "must be at least 10 seconds or 0 (disabled)"),
        (3, "stats_interval", "must be at least 1 second or 0 (disabled)"),
    ]
    ok = parse_config("rescan_interval: 1\nreconcile_interval: 0\nstats_interval: 0\n").settings
    assert (ok.rescan_interval, ok.reconcile_interval, ok.stats_interval) == (1.0, 0.0, 0.0)
    with pytest.raises(ConfigError, match="reconcile_interval: must be at least 10 seconds"):
        Config().with_overrides(reconcile_interval=0.000001)


# -- user regexes ---------------------------------------------------------------------------

CATASTROPHIC = "^x-(a+)+$"
NAME = "x-" + "a" * 37 + "b"  # 40 characters: backtracking would take hours


def _returns(fn: Callable[[], object]) -> object:
    """What ``fn`` returns, failing if it does not return within a (very generous) 10 s."""
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "a user regex backtracked"
    return out[0]


def test_user_regexes_run_in_linear_time() -> None:
    """A catastrophic pattern in include, exclude or a regex: match just returns on a 40-character name."""
    config = parse_config(
        f"include: '{CATASTROPHIC}'\nexclude: '{CATASTROPHIC}'\n"
        f"profiles: [{{name: p, match: 'regex:{CATASTROPHIC}'}}]\n"
    )
    s = config.settings
    assert _returns(lambda: NameFilter(s.include, None)(NAME)) is False
    assert _returns(lambda: NameFilter(None, s.exclude)(NAME)) is True
    assert _returns(lambda: config.profile_for(NAME)) is None
    assert NameFilter(s.include, None)("x-aaa") and config.profile_for("x-aaa") is not None


def test_regexes_re2_cannot_run_are_refused_with_their_key_path() -> None:
    """Backreferences and lookaround are refused when the file or the command line is read."""
    text = "include: '(a)\\1'\nexclude: 'a(?=b)'\nprofiles: [{name: p, match: 'regex:(?<!x)y'}]\n"
    hint = " (RE2 takes no backreferences or lookaround)"
    assert problems(text) == [
        (1, "include", "bad regular expression: invalid escape sequence: \\1" + hint),
        (2, "exclude", "bad regular expression: invalid perl operator: (?=" + hint),
        (3, "profiles[0].match", "bad regular expression: invalid perl operator: (?<!" + hint),
    ]
    with pytest.raises(ConfigError) as info:
        Config().with_overrides(include="(a)\\1")
    assert str(info.value.problems[0]).startswith("<command line>: include: bad regular")


def test_undecodable_names_still_match() -> None:
    """Names with bytes that are not UTF-8 (lone surrogates) are matched, the bytes as U+FFFD."""
    name = b"ns-\xff".decode("utf-8", "surrogateescape")
    assert NameFilter("^ns-.$", None)(name)
    assert Profile("p", "regex:^ns-").matches(name)


# -- the settings declaration -----------------------------------------------------------------


def test_readme_settings_table_is_the_generated_one() -> None:
    """README's settings table is exactly what nswatch.settings generates from the declaration."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    begin = "<!-- settings table: python -m nswatch.settings -->\n"
    end = "<!-- end of settings table -->\n"
    assert begin in readme and end in readme
    assert readme[readme.index(begin) + len(begin) : readme.index(end)] == settings_table()


def test_every_setting_is_a_top_level_key() -> None:
    """Each declared setting is read from the file by its field name, defaults as declared."""
    assert parse_config("").settings == DEFAULTS
    for name, _ in declared():
        assert only(f"{name}: [[1]]\n")[:2] == (1, name)
    assert only("bogus: 1\n") == (1, "bogus", "unknown key")
