"""The ``nswatch`` command: run, snapshot, check-config, apply, watch, graph."""

from __future__ import annotations

import argparse
import fnmatch
import ipaddress
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

from nswatch import __version__, logs, settings
from nswatch.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    Problem,
    check_config_main,
    is_own_network,
    load_config,
)
from nswatch.daemon import Daemon
from nswatch.dirwatch import DirWatcher
from nswatch.gcschedule import CollectionSchedule
from nswatch.heap import fix_mmap_threshold, limit_arenas
from nswatch.http import Api, HttpServer
from nswatch.limits import raise_fd_limit
from nswatch.model import Model
from nswatch.observer import Observer
from nswatch.state import state_json, table_name
from nswatch.stream import KINDS, StreamHub
from nswatch.watch import DEFAULT_URL, Watcher
from nswatch.webconfig import WebConfig, load_web_config

if TYPE_CHECKING:
    from nswatch.procnet import ProcNetPoller

STOP_TIMEOUT = 2.0
# What the teardown may take of STOP_TIMEOUT; the rest is the interpreter's exit.
STOP_BUDGET = 1.5
# /healthz turns 503 when the loop has not turned for this long (it turns
# at least twice a second when idle).
STALL_AFTER = 10.0


def _add_setting_flags(sp: argparse.ArgumentParser, command: str) -> None:
    """The flags of the settings that ``command`` takes, from their declaration."""
    for name, s in settings.declared():
        if s.flag is None or command not in s.commands:
            continue
        text = f"{s.help} (default {settings.default_text(name)})"
        kw: dict[str, Any] = {"dest": name, "help": text.replace("`", "").replace("%", "%%")}
        if s.repeat:
            kw["action"] = "append"
        if s.choices is not None:
            kw["choices"] = s.choices
        else:
            kw["type"] = s.flag_type
            kw["metavar"] = s.metavar
        sp.add_argument(s.flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (flags are a stable interface)."""
    p = argparse.ArgumentParser(prog="nswatch", description="Watch Linux network namespaces.")
    p.add_argument("--version", action="version", version=f"nswatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, **kw: Any) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, **kw)
        sp.add_argument(
            "--config",
            metavar="FILE",
            help=f"config file (default {DEFAULT_CONFIG_PATH} if present)",
        )
        _add_setting_flags(sp, name)
        return sp

    with_config("run", help="run the daemon")

    snap = with_config("snapshot", help="print every namespace once and exit")
    snap.add_argument("--json", action="store_true", help="the state JSON of /api/v1/state")
    snap.add_argument(
        "--netns",
        action="append",
        metavar="NAME",
        help="only namespaces with a name matching this glob (e.g. 'lab*'), repeatable"
        " (default all)",
    )

    chk = sub.add_parser("check-config", help="validate a config file")
    chk.add_argument(
        "file",
        nargs="?",
        default=None,
        metavar="FILE",
        help=f"config file (default {DEFAULT_CONFIG_PATH})",
    )

    app = with_config("apply", help="apply the profiles once, without the daemon")
    app.add_argument(
        "--netns", metavar="NAME", help="only this namespace (default every namespace)"
    )
    app.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")

    watch = sub.add_parser("watch", help="follow a running daemon's changes, like ip monitor")
    watch.add_argument("--url", default=DEFAULT_URL, help=f"the daemon (default {DEFAULT_URL})")
    watch.add_argument(
        "--netns",
        metavar="NAME",
        action="append",
        help="only these namespaces (globs; repeat) (default all)",
    )
    watch.add_argument(
        "--kind",
        action="append",
        choices=sorted(KINDS),
        help="only these kinds of change (repeat) (default all)",
    )
    watch.add_argument("--json", action="store_true", help="JSON lines, the events' own fields")

    graph = with_config("graph", help="print the topology once (DOT, SVG or JSON) and exit")
    graph.add_argument(
        "--format",
        choices=("dot", "svg", "json"),
        default="dot",
        help="Graphviz DOT, an SVG picture, or the graph as JSON (default dot)",
    )
    graph.add_argument(
        "--netns",
        metavar="NAME",
        action="append",
        help="only these namespaces (globs; repeat) (default all)",
    )
    return p


def load(args: argparse.Namespace) -> Config:
    """The config file (if any) with the command's setting flags on top."""
    path = args.config
    config = load_config(path or DEFAULT_CONFIG_PATH, required=path is not None)
    overrides: dict[str, Any] = {}
    for name, _ in settings.declared():
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = tuple(value) if isinstance(value, list) else value
    return config.with_overrides(**overrides) if overrides else config


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT; SIGHUP reloads the config."""
    from nswatch import metrics
    from nswatch.apply import Applier, ApplyEngine
    from nswatch.procnet import ProcNetPoller

    # One socket per namespace: the default soft limit (1,024) is far too low.
    raise_fd_limit()
    fix_mmap_threshold()
    limit_arenas()
    config = load(args)
    web = web_config_of(config)
    logs.configure(config.settings.log_format, config.settings.log_level)
    log = structlog.get_logger("nswatch")
    sink = metrics.MetricsSink(
        max_objects_per_namespace=config.settings.metrics_max_objects_per_namespace
    )
    # A sink from the daemon's start: the hub numbers every change the model
    # makes, so its ids match the state's event_id.
    hub = StreamHub(history=config.settings.stream_history)
    daemon = Daemon(
        config.settings,
        observers=[logs.LogObserver(), sink, hub],
        dirwatch_factory=DirWatcher,
    )
    sink.bind(daemon)
    sink.bind_stream(hub)
    # Per-namespace /proc statistics; started once the daemon is ready.
    procnet: ProcNetPoller | None = None
    if config.settings.procnet_interval > 0:
        procnet = ProcNetPoller(
            daemon.view, daemon.sessions.path_of, interval=config.settings.procnet_interval
        )
        sink.bind_procnet(procnet)
    # The engine hands its config's host label to its applier, now and on reload.
    engine = ApplyEngine(config, daemon.view, Applier(daemon.enterer, daemon.path_of))
    daemon.observers.append(engine)
    sink.bind_apply(engine)
    for extra in _service_observers(daemon):
        daemon.observers.append(extra)
    daemon.observers.append(CollectionSchedule())
    # Renders and the HTTP loop run on other threads; a thread waiting for
    # the GIL gets it after a switch interval (default 5 ms), and the event
    # loop waits again after each of its system calls. At 0.5 ms the link
    # change -> model p99 under 16 + 4 readers was 15.0 and 16.7 ms, against
    # 18.0 and 28.6 ms at 1 ms (tests/bench/bench_readers.py, two runs each).
    sys.setswitchinterval(0.0005)
    api = Api(
        view=daemon.view,
        alive=lambda: time.monotonic() - daemon.last_tick < STALL_AFTER,
        ready=daemon.ready.is_set,
        metrics=sink.render_parts,
        unwatched=daemon.unwatched,
        events=hub,
        shown_version=daemon.shown_version,
    )
    listen = config.settings.listen
    server = HttpServer(listen, api, web)
    if sys.stderr.isatty():
        # A person at a terminal first learns what is watched and where to look.
        tls = web.tls is not None
        sys.stderr.write(startup_summary(config, server.address, tls=tls))
    stop = threading.Event()
    reload = threading.Event()
    wake = threading.Event()  # the main thread waits on this alone

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            reload.set()
        else:
            stop.set()
            daemon.request_stop()
        wake.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    bound = server.address
    log.info("starting", version=__version__, listen=f"{bound[0]}:{bound[1]}")
    server.start()
    engine.start()
    thread = daemon.start()
    try:
        while thread.is_alive() and not stop.is_set():
            wake.wait(0.5)
            wake.clear()
            if reload.is_set() and not stop.is_set():
                reload.clear()
                config = _reload(args, config, daemon, engine, sink, log, stop, server, procnet)
    finally:
        died = not stop.is_set()
        stuck = _teardown(daemon, thread, engine.stop, server.stop, STOP_BUDGET)
    code = 0
    if died:
        # The loop ended without being asked to: exit non-zero so that
        # systemd's Restart=on-failure restarts us.
        log.error("event_loop_died")
        code = 1
    if stuck:
        # Something ignores the stop (a kernel call, an apply under way):
        # leave now rather than wait for it at the interpreter's exit,
        # and before it can act on a half torn-down daemon.
        # Said from another thread: a log pipe nobody reads (a stalled
        # journal) must not hold the exit up either.
        said = threading.Thread(target=_say_stuck, args=(log, stuck), daemon=True)
        said.start()
        said.join(0.2)
        os._exit(code)
    log.info("stopped")
    return code


def _say_stuck(log: Any, stuck: list[str]) -> None:
    log.warning("stop_timeout", waiting_for=stuck, seconds=STOP_BUDGET)
    sys.stdout.flush()
    sys.stderr.flush()


def _teardown(
    daemon: Daemon,
    loop_thread: threading.Thread,
    stop_engine: Callable[[], None],
    stop_server: Callable[[], None],
    budget: float,
) -> list[str]:
    """Stop the loop, the apply engine and the server together; what had not stopped in time."""
    deadline = time.monotonic() + budget
    daemon.request_stop()
    parts = {"event_loop": loop_thread}
    for name, fn in (("apply_engine", stop_engine), ("http_server", stop_server)):
        t = threading.Thread(target=fn, name=f"nswatch-stop-{name}", daemon=True)
        t.start()
        parts[name] = t
    for t in parts.values():
        t.join(max(0.0, deadline - time.monotonic()))
    return sorted(name for name, t in parts.items() if t.is_alive())


def startup_summary(config: Config, address: tuple[str, int], *, tls: bool) -> str:
    """What ``nswatch run`` watches and where it serves, in two lines for a terminal."""
    s = config.settings
    dirs = ", ".join(s.netns_dirs)
    watched = f"the host and every namespace in {dirs}" if dirs else "the host"
    if s.discover_processes:
        watched += " or held by a process"
    elif not dirs:
        watched += " only"
    only = [f"names matching {s.include}"] if s.include else []
    if s.exclude:
        only.append(f"except {s.exclude}")
    if only:
        watched += f" ({', '.join(only)})"
    n = len(config.profiles)
    applies = f"applies {n} profile{'s' if n != 1 else ''}" if n else "applies no profile"
    source = f"config {config.source}" if config.source else "no config file"
    host, port = address
    url = f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"
    return (
        f"nswatch {__version__} watches {watched}; {applies} ({source})\n"
        f"serving {url}/ (the state: /api/v1/state, metrics: /metrics); Ctrl-C stops\n"
    )


def _reload(
    args: argparse.Namespace,
    config: Config,
    daemon: Daemon,
    engine: Any,
    sink: Any,
    log: Any,
    stop: threading.Event | None = None,
    server: HttpServer | None = None,
    procnet: ProcNetPoller | None = None,
) -> Config:
    """Re-read the config and hand it to every consumer; keep the old one (and say why) when bad.

    The file is read and checked on a thread of its own: a stop (``stop`` set)
    ends the wait for it, however long a huge file or a FIFO would take.
    With a ``server``, the web config file is read again too (users, TLS,
    headers, rate limit: what exporter-toolkit users expect to change without
    a restart); the two apply together or not at all. A running ``procnet``
    poller (:class:`nswatch.procnet.ProcNetPoller`) takes a new interval;
    turning it on or off takes a restart, and the log says so.
    """
    for o in daemon.observers:
        hook = getattr(o, "reloading", None)
        if hook is not None:
            hook()
    try:
        loaded = _load_unless_stopped(args, stop or threading.Event(), web=server is not None)
        if loaded is None:
            return config  # stopping: the old config serves until the end
        new, web = loaded
        if server is not None and web is not None:
            _use_web(server, web)  # first: if it cannot be used, nothing changes
    except ConfigError as e:
        log.error("config_reload_failed", problems=[str(p) for p in e.problems])
        sink.config_reloaded(False)
        new = config
    else:
        listen = new.settings.listen
        if listen != config.settings.listen:
            log.warning("listen_change_needs_restart", listen=f"{listen[0]}:{listen[1]}")
        interval = new.settings.procnet_interval
        if interval != config.settings.procnet_interval:
            if procnet is not None and interval > 0:
                procnet.set_interval(interval)
            else:
                log.warning("procnet_change_needs_restart", procnet_interval=interval)
        logs.configure(new.settings.log_format, new.settings.log_level)
        daemon.reconfigure(new.settings)
        engine.reload(new)
        sink.config_reloaded(True)
        log.info("config_reloaded", profiles=len(new.profiles), source=new.source)
    for o in daemon.observers:
        hook = getattr(o, "reloaded", None)
        if hook is not None:
            hook()
    return new


def web_config_of(config: Config) -> WebConfig:
    """The web config file ``config`` names, read and checked; an empty one (plain HTTP) if none."""
    path = config.settings.web_config_file
    return load_web_config(path) if path else WebConfig()


def _use_web(server: HttpServer, web: WebConfig) -> None:
    """``server.use_web(web)``; a certificate that will not load is a problem of the file."""
    try:
        server.use_web(web)
    except OSError as e:  # ssl.SSLError too
        where = web.source or "web config"
        raise ConfigError([Problem(where, None, "tls_server_config", str(e))]) from e


def _load_unless_stopped(
    args: argparse.Namespace, stop: threading.Event, web: bool = False
) -> tuple[Config, WebConfig | None] | None:
    """``load(args)`` and, with ``web``, the web config it names (an empty one if none);
    None if ``stop`` is set first (the read is left to finish alone)."""
    done = threading.Event()
    result: list[tuple[Config, WebConfig | None] | BaseException] = []

    def both() -> tuple[Config, WebConfig | None]:
        config = load(args)
        return config, web_config_of(config) if web else None

    def read() -> None:
        try:
            result.append(both())
        except BaseException as e:  # handed to the caller, who re-raises it
            result.append(e)
        finally:
            done.set()

    threading.Thread(target=read, name="nswatch-reload", daemon=True).start()
    while not done.wait(0.05):
        if stop.is_set():
            return None
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _service_observers(daemon: Daemon) -> list[Observer]:
    """systemd's notify protocol (a no-op outside systemd)."""
    from nswatch import systemd

    return [systemd.observer_for(daemon)]


def cmd_check_config(path: str) -> int:
    """Validate a config file, including its pools against the host's addresses."""
    nets = []
    try:
        config: Config | None = load_config(path, required=True)
    except ConfigError:
        config = None  # check_config_main reports the problems
    if config is not None and config.profiles:
        # Only the host's own addresses matter here: no directories, no timers.
        only_host = replace(config.settings, netns_dirs=(), reconcile_interval=0, stats_interval=0)
        daemon = Daemon(only_host)
        try:
            daemon.sync_once()
            host = daemon.model.get(only_host.host_label)
            for a in host.addresses.values() if host else ():
                ifname = host.link_name(a.link) if host else None
                net = ipaddress.ip_network(f"{a.address}/{a.prefixlen}", strict=False)
                # Addresses nswatch itself gave out of a pool are not a clash.
                if ifname is None or not is_own_network(config, ifname, net):
                    nets.append(net)
        finally:
            daemon.close()
    return check_config_main(path, nets)


def cmd_snapshot(args: argparse.Namespace) -> int:
    """Build the model once from dumps and print it."""
    config = load(args)
    logs.configure("console", "warning")
    daemon = Daemon(config.settings)
    try:
        complete = daemon.sync_once()
        model = daemon.model
        shown = selected(model, args.netns)
        if not shown:
            print(f"no namespace matches {' '.join(args.netns)}", file=sys.stderr)
            return 1
        if args.json:
            json.dump(select_state(state_json(model), model, shown), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(render_table(model, shown))
    finally:
        daemon.close()
    return 0 if complete else 1


def selected(model: Model, globs: Sequence[str] | None) -> set[int]:
    """Inodes of the namespaces with a name (any of them) matching one of ``globs`` (None: all)."""
    return {
        inode
        for inode, ns in model.namespaces.items()
        if globs is None or any(fnmatch.fnmatchcase(n, g) for n in ns.names for g in globs)
    }


def select_state(state: dict[str, Any], model: Model, shown: set[int]) -> dict[str, Any]:
    """The state JSON cut down to the ``shown`` namespaces and the veth pairs with an end in one."""
    names = {model.namespaces[inode].name for inode in shown}
    return {
        **state,
        "namespaces": {k: v for k, v in state["namespaces"].items() if k in names},
        "veth_pairs": [
            p for p in state["veth_pairs"] if {p["a"]["netns"], p["b"]["netns"]} & names
        ],
    }


def cmd_graph(args: argparse.Namespace) -> int:
    """Build the model once from dumps and print its topology graph."""
    from nswatch import topology

    config = load(args)
    logs.configure("console", "warning")
    daemon = Daemon(config.settings)
    try:
        complete = daemon.sync_once()
        graph = topology.build(daemon.model, args.netns or ())
    finally:
        daemon.close()
    if args.format == "json":
        sys.stdout.write(json.dumps(graph, indent=2) + "\n")
    elif args.format == "svg":
        sys.stdout.write(topology.to_svg(graph))
    else:
        sys.stdout.write(topology.to_dot(graph))
    return 0 if complete else 1


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow the daemon's event stream until interrupted."""
    watcher = Watcher(
        args.url,
        netns=args.netns or (),
        kinds=args.kind or (),
        as_json=args.json,
        out=lambda line: print(line, flush=True),
        err=lambda line: print(line, file=sys.stderr, flush=True),
    )
    try:
        watcher.run()
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    """Plan (and unless --dry-run, apply) every matching namespace once."""
    from nswatch.apply import Applier, ApplyEngine

    config = load(args)
    logs.configure("console", "warning")
    daemon = Daemon(config.settings)
    status = 0
    try:
        if not daemon.sync_once():
            print("could not read every namespace", file=sys.stderr)
            return 1
        model = daemon.model
        names = sorted(ns.name for ns in model.namespaces.values() if not ns.is_host)
        if args.netns:
            if model.get(args.netns) is None:
                print(f"{args.netns}: no such namespace", file=sys.stderr)
                return 1
            names = [args.netns]
        # The daemon's own engine plans (and applies) here too: the same
        # allocation, under the same host-wide lock as a running nswatch.
        engine = ApplyEngine(config, lambda: model, Applier(daemon.enterer, daemon.path_of))
        for name in names:
            profile, steps, error = engine.once(name, dry_run=args.dry_run)
            if profile is None:
                if args.netns:
                    print(f"{name}: no profile matches")
                continue
            print(f"# {name} (profile {profile.name}): {len(steps)} step(s)")
            for step in steps:
                print(f"  {step}")
            if error is not None:
                print(f"{name}: failed: {error}", file=sys.stderr)
                status = 1
    finally:
        daemon.close()
    return status


def render_table(model: Model, shown: set[int] | None = None) -> str:
    """A human-readable listing of the model (only the ``shown`` namespaces, when given)."""
    lines: list[str] = []
    namespaces = [ns for i, ns in model.namespaces.items() if shown is None or i in shown]
    for ns in sorted(namespaces, key=lambda n: (not n.is_host, n.name)):
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
        if shown is None or a[0] in shown or b[0] in shown
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
        if args.command == "apply":
            return cmd_apply(args)
        if args.command == "graph":
            return cmd_graph(args)
        if args.command == "watch":
            return cmd_watch(args)
        if args.command == "check-config":
            return cmd_check_config(args.file or DEFAULT_CONFIG_PATH)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `nswatch snapshot | head`: the reader left; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 2
