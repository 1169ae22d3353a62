"""Out of file descriptors: namespaces that cannot be watched are reported, once, and retried."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap

import pytest

from nswatch.limits import raise_fd_limit
from tests.kernel import Lab, ip_batch

pytestmark = pytest.mark.kernel

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from collections import Counter
    from nswatch.daemon import Daemon, Settings
    from nswatch.dirwatch import DirWatcher
    from nswatch.limits import raise_fd_limit
    from nswatch.observer import BaseObserver

    prefix, low, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    class Errors(BaseObserver):
        def __init__(self):
            self.seen = []
        def error(self, netns, where, err):
            self.seen.append((netns, where))

    errors = Errors()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    d = Daemon(
        Settings(include="^" + prefix, reconcile_interval=0),
        dirwatch_factory=DirWatcher,
        observers=[errors],
    )
    d.start()
    # Several retries' worth of time (backoff 0.1, 0.3, 1, 2 s).
    time.sleep(4)
    out = {
        "watched": len(d.sessions) - 1,
        "unwatched": d.unwatched(),
        "counts": d.unwatched_counts(),
        "lines": Counter(w for _, w in errors.seen),
        "per_ns": max(Counter(errors.seen).values(), default=0),
    }
    raise_fd_limit()
    deadline = time.monotonic() + 15
    while d.unwatched() and time.monotonic() < deadline:
        time.sleep(0.1)
    out["after"] = {"watched": len(d.sessions) - 1, "unwatched": d.unwatched()}
    d.request_stop()
    d.loop_thread.join(3)
    print(json.dumps(out))
    """
)


def test_out_of_fds_is_reported_once_per_namespace_and_retried(lab: Lab) -> None:
    """Under a low fd limit the unwatched namespaces are listed with a reason, logged once, and picked up later."""
    total, low = 150, 100
    names = [lab.name(f"f{i}") for i in range(total)]
    ip_batch(f"netns add {n}" for n in names)
    lab.namespaces.extend(names)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, lab.prefix, str(low), str(total)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    missing = total - out["watched"]
    assert missing > 0, out
    assert len(out["unwatched"]) == missing
    assert set(out["unwatched"].values()) == {"out_of_fds"}
    assert out["counts"]["out_of_fds"] == missing
    # One line per namespace and reason, however often it was retried.
    assert out["lines"].get("out_of_fds") == missing and out["per_ns"] == 1, out["lines"]
    assert out["after"] == {"watched": total, "unwatched": {}}


def test_raise_fd_limit_lifts_the_soft_limit() -> None:
    """raise_fd_limit sets the soft RLIMIT_NOFILE to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        assert raise_fd_limit() == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
