"""pyroute2 NDB side of the benchmark, run as a child process by bench.py.

    python -m tests.bench.ndb_probe NAMES_FILE EXPECT_LINKS [--storm]

Starts NDB, adds one netns source per name in NAMES_FILE (namespaces that
exist; ``flags=0`` so pyroute2 never creates one), and waits until NDB holds
EXPECT_LINKS interfaces outside the host. Prints JSON lines on stdout with
CLOCK_MONOTONIC times (shared with the parent):

    {"event": "complete", "t": ..., "links": ..., "vmhwm_kb": ..., "tree_rss_kb": ...}

With ``--storm`` it then reads lines ``ADDRS ROUTES`` from stdin: wait until
NDB holds that many addresses and storm routes outside the host, print
``{"event": "converged", "t": ...}``; an empty line ends it. NDB is always
closed (ndb.close()) before exiting.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

POLL = 0.02


def say(**kw: Any) -> None:
    """One JSON line to the parent."""
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def status_kb(pid: int | str, key: str) -> int:
    """A ``/proc/PID/status`` field in kB (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb() -> int:
    """RSS of this process plus its children (NDB may fork helpers)."""
    me = os.getpid()
    total = status_kb(me, "VmRSS")
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != me:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == me:
                total += status_kb(pid, "VmRSS")
    return total


def count(ndb: Any, sql: str) -> int:
    """One ``SELECT count(*)`` against NDB's database, from the main thread."""
    row = ndb.db.fetchone(sql)
    return int(row[0]) if row else 0


def main() -> int:
    names_file, expect = sys.argv[1], int(sys.argv[2])
    storm = "--storm" in sys.argv[3:]
    with open(names_file) as f:
        names = [line.strip() for line in f if line.strip()]
    from pyroute2 import NDB

    ndb = NDB()
    try:
        for name in names:
            if os.path.exists(f"/run/netns/{name}"):
                ndb.sources.add(netns=name, flags=0)
        links_sql = "SELECT count(*) FROM interfaces WHERE f_target != 'localhost' AND f_index != 0"
        while (links := count(ndb, links_sql)) < expect:
            time.sleep(POLL)
        say(
            event="complete",
            t=time.monotonic(),
            links=links,
            vmhwm_kb=status_kb("self", "VmHWM"),
            tree_rss_kb=tree_rss_kb(),
        )
        addrs_sql = "SELECT count(*) FROM addresses WHERE f_target != 'localhost'"
        routes_sql = (
            "SELECT count(*) FROM routes WHERE f_target != 'localhost' AND f_table = 254 AND "
            "(f_RTA_DST LIKE '198.18.%' OR f_RTA_DST LIKE '2001:db8:b2:%')"
        )
        if storm:
            say(event="baseline", addresses=count(ndb, addrs_sql), routes=count(ndb, routes_sql))
            for line in sys.stdin:
                if not line.strip():
                    break
                want_a, want_r = (int(x) for x in line.split())
                while True:
                    a, r = count(ndb, addrs_sql), count(ndb, routes_sql)
                    if a == want_a and r == want_r:
                        break
                    time.sleep(POLL)
                say(event="converged", t=time.monotonic(), addresses=a, routes=r)
    finally:
        t0 = time.monotonic()
        ndb.close()
        say(event="closed", seconds=time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
