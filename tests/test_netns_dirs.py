"""Namespace directories: late-appearing directories, filters, and the pending-mount window."""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

from nswatch.daemon import Settings
from nswatch.netns import NameFilter, NetnsEnterer, probe, scan_dirs
from tests.conftest import start_daemon, stop_daemon
from tests.kernel import Lab, wait_for


def test_name_filter_exclude_wins() -> None:
    """--exclude beats --include, and no include means everything."""
    f = NameFilter(include="^ctr-", exclude="-tmp$")
    assert f("ctr-1") and not f("ctr-1-tmp") and not f("lab")
    assert NameFilter()("anything")


def test_unmounted_file_is_pending(tmp_path: os.PathLike[str]) -> None:
    """A plain file in a namespace directory is not a namespace until something is mounted on it."""
    enterer = NetnsEnterer()
    try:
        d = str(tmp_path)
        open(os.path.join(d, "early"), "w").close()
        s = scan_dirs([d, "/nonexistent-nswatch-dir"], enterer.home.dev, NameFilter())
        assert s.found == [] and s.pending == [os.path.join(d, "early")]
        assert probe(os.path.join(d, "early"), enterer.home.dev) is None
    finally:
        enterer.close()


@pytest.mark.kernel
def test_directory_created_after_start(lab: Lab) -> None:
    """A namespace directory that does not exist at start is watched once it appears."""
    base = tempfile.mkdtemp(prefix=f"{lab.prefix}-")
    nsdir = os.path.join(base, "netns")
    ns = lab.netns("late")
    target = os.path.join(nsdir, "bound")
    running = start_daemon(Settings(netns_dirs=(nsdir,), reconcile_interval=0))
    try:
        os.mkdir(nsdir)
        open(target, "w").close()
        subprocess.run(["mount", "--bind", f"/run/netns/{ns}", target], check=True)
        wait_for(lambda: running.daemon.view().get("bound") is not None, timeout=5)
        subprocess.run(["umount", target], check=True)
        os.unlink(target)
        wait_for(lambda: running.daemon.view().get("bound") is None, timeout=5)
    finally:
        stop_daemon(running)
        subprocess.run(["umount", target], capture_output=True)
        for p in (target, nsdir, base):
            if os.path.isdir(p):
                os.rmdir(p)
            elif os.path.exists(p):
                os.unlink(p)
