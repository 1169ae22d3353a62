"""The ``nswatch`` command: run, snapshot, check-config, apply."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import structlog

from nswatch import __version__, logs
from nswatch.config import Config, ConfigError, check_config_main, load_config
from nswatch.daemon import Daemon, Settings
from nswatch.dirwatch import DirWatcher
from nswatch.http import Api, HttpServer, MetricsRenderer
from nswatch.model import Model
from nswatch.observer import Observer
from nswatch.state import state_json, table_name

DEFAULT_CONFIG = "/etc/nswatch/nswatch.yaml"
STOP_TIMEOUT = 2.0
# /healthz turns 503 when the loop has not turned for this long (it turns
# at least twice a second when idle).
STALL_AFTER = 10.0


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (flags are a stable interface)."""
    p = argparse.ArgumentParser(prog="nswatch", description="Watch Linux network namespaces.")
    p.add_argument("--version", action="version", version=f"nswatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help=f"config file (default {DEFAULT_CONFIG} if present)")
        sp.add_argument(
            "--netns-dir",
            action="append",
            dest="netns_dirs",
            metavar="DIR",
            help="directory of named namespaces (repeatable; default /run/netns)",
        )
        sp.add_argument("--include", metavar="REGEX", help="watch only namespaces matching")
        sp.add_argument("--exclude", metavar="REGEX", help="never watch these (wins)")

    run = sub.add_parser("run", help="run the daemon")
    common(run)
    run.add_argument("--listen", type=_listen, metavar="HOST:PORT", help="default 127.0.0.1:9442")
    run.add_argument("--log-format", choices=("json", "console"))
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    run.add_argument("--netlink-rcvbuf", type=int, metavar="BYTES")
    run.add_argument("--reconcile-interval", type=float, metavar="SECONDS")

    snap = sub.add_parser("snapshot", help="print every namespace once and exit")
    common(snap)
    snap.add_argument("--json", action="store_true", help="the state JSON of /api/v1/state")

    chk = sub.add_parser("check-config", help="validate a config file")
    chk.add_argument("file", nargs="?", default=None)
    return p


def load(args: argparse.Namespace) -> Config:
    """The config file (if any) with command-line flags on top."""
    path = args.config
    config = load_config(path or DEFAULT_CONFIG, required=path is not None)
    overrides: dict[str, Any] = {}
    for key in (
        "netns_dirs",
        "include",
        "exclude",
        "listen",
        "log_format",
        "log_level",
        "netlink_rcvbuf",
        "reconcile_interval",
    ):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = tuple(value) if isinstance(value, list) else value
    return config.with_overrides(**overrides) if overrides else config


def settings_from(config: Config) -> Settings:
    """The daemon's settings out of a loaded config."""
    return Settings(
        netns_dirs=tuple(config.netns_dirs),
        include=config.include,
        exclude=config.exclude,
        host_label=config.host_label,
        netlink_rcvbuf=config.netlink_rcvbuf,
        reconcile_interval=config.reconcile_interval,
        rescan_interval=config.rescan_interval,
    )


def make_observers(config: Config) -> tuple[list[Observer], MetricsRenderer | None]:
    """The sinks for ``run``: logs, metrics, systemd (when present)."""
    observers: list[Observer] = [logs.LogObserver()]
    renderer: MetricsRenderer | None = None
    from nswatch import metrics

    sink = metrics.MetricsSink()
    observers.append(sink)
    renderer = sink.render
    return observers, renderer


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT."""
    config = load(args)
    logs.configure(config.log_format, config.log_level)
    log = structlog.get_logger("nswatch")
    observers, renderer = make_observers(config)
    daemon = Daemon(settings_from(config), observers=observers, dirwatch_factory=DirWatcher)
    for o in observers:
        bind = getattr(o, "bind", None)
        if bind is not None:
            bind(daemon)
    api = Api(
        view=daemon.view,
        alive=lambda: time.monotonic() - daemon.last_tick < STALL_AFTER,
        ready=daemon.ready.is_set,
        metrics=renderer,
    )
    server = HttpServer(config.listen, api)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        daemon.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("starting", version=__version__, listen=f"{config.listen[0]}:{config.listen[1]}")
    server.start()
    thread = daemon.start()
    try:
        while thread.is_alive() and not stop.is_set():
            stop.wait(0.5)
    finally:
        daemon.request_stop()
        thread.join(STOP_TIMEOUT)
        server.stop()
    log.info("stopped")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    """Build the model once from dumps and print it."""
    config = load(args)
    logs.configure("console", "warning")
    daemon = Daemon(settings_from(config))
    try:
        complete = daemon.sync_once()
        model = daemon.model
        if args.json:
            json.dump(state_json(model), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(render_table(model))
    finally:
        daemon.close()
    return 0 if complete else 1


def render_table(model: Model) -> str:
    """A human-readable listing of the model."""
    lines: list[str] = []
    for ns in sorted(model.namespaces.values(), key=lambda n: (not n.is_host, n.name)):
        alias = f" (also {', '.join(ns.names[1:])})" if len(ns.names) > 1 else ""
        lines.append(f"netns {ns.name}{alias}  inode {ns.inode}")
        for link in sorted(ns.links.values(), key=lambda link: link.index):
            state = "UP" if link.admin_up else "down"
            extra = ""
            if link.kind == "veth":
                peer = model.peer_of(ns.inode, link.index)
                extra = f"  peer {peer.netns}/{peer.name}" if peer else "  peer ?"
            master = ns.link_name(link.master)
            if master:
                extra += f"  master {master}"
            lines.append(
                f"  {link.index:>4}: {link.name:<16} {link.kind:<9} {state:<4} "
                f"{link.oper_state:<15} mtu {link.mtu}{extra}"
            )
            for a in sorted(ns.addresses.values(), key=lambda a: (a.family, a.address)):
                if a.link == link.index:
                    lines.append(f"        {a.family:<5} {a.address}/{a.prefixlen} scope {a.scope}")
        for r in sorted(ns.routes.values(), key=lambda r: (r.family, r.table, r.dst)):
            if r.table == 255:
                continue
            via = f" via {r.gateway}" if r.gateway else ""
            dev = f" dev {ns.link_name(r.dev)}" if r.dev is not None else ""
            metric = f" metric {r.priority}" if r.priority is not None else ""
            table = "" if r.table == 254 else f" table {table_name(r.table)}"
            lines.append(f"  route {r.dst}{via}{dev}{metric}{table}")
    pairs = [
        f"  {model.namespaces[a[0]].name}/{model.namespaces[a[0]].links[a[1]].name} <-> "
        f"{model.namespaces[b[0]].name}/{model.namespaces[b[0]].links[b[1]].name}"
        for a, b in model.veth_pairs()
    ]
    if pairs:
        lines.append("veth pairs")
        lines.extend(sorted(pairs))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nswatch`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "snapshot":
            return cmd_snapshot(args)
        if args.command == "check-config":
            return check_config_main(args.file or DEFAULT_CONFIG)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    return 2
