"""Network namespaces as /proc shows them: which processes live in which (like ``lsns -t net``).

A namespace no file holds (LXC, ``PrivateNetwork=yes``, rootless containers,
``unshare -n``) lives as long as a process in it does, and is found only
here. Reading ``/proc/PID/ns/net`` needs ptrace-read access to PID: some
processes answer EACCES (in a sandbox, its PID 1); they are skipped, and
another holder of the same namespace, if any, serves instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from nswatch.model import Owner
from nswatch.naming import parse_cgroup

PROC = "/proc"


def net_holders(proc: str = PROC) -> dict[int, list[int]]:
    """Namespace inode -> the PIDs living in it (ascending), for every process we may look at."""
    out: dict[int, list[int]] = {}
    try:
        entries = os.listdir(proc)
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        inode = ns_inode(int(name), proc)
        if inode is not None:
            out.setdefault(inode, []).append(int(name))
    for pids in out.values():
        pids.sort()
    return out


def ns_inode(pid: int, proc: str = PROC) -> int | None:
    """The inode of the network namespace ``pid`` lives in, or None (gone, or not ours to see)."""
    try:
        link = os.readlink(f"{proc}/{pid}/ns/net")
    except OSError:
        return None
    # "net:[4026531840]"
    if not link.startswith("net:[") or not link.endswith("]"):
        return None
    return int(link[5:-1])


def ns_path(pid: int, proc: str = PROC) -> str:
    """The file to enter ``pid``'s network namespace through."""
    return f"{proc}/{pid}/ns/net"


def owner_of(pid: int, proc: str = PROC) -> Owner | None:
    """Who ``pid`` is (command, and the unit/container/pod its cgroup shows), or None when gone."""
    try:
        # Bytes that are not UTF-8 become "\xNN" text: owner fields go to JSON and labels.
        with open(f"{proc}/{pid}/comm", "rb") as f:
            comm = f.read().rstrip(b"\n").decode("utf-8", "backslashreplace")
        with open(f"{proc}/{pid}/cgroup", "rb") as f:
            cgroup = parse_cgroup(f.read().decode("utf-8", "backslashreplace"))
    except OSError:
        return None
    return Owner(pid, comm, cgroup.unit, cgroup.container_id, cgroup.pod_uid)


def first_alive(pids: Iterable[int], inode: int, proc: str = PROC) -> int | None:
    """The first of ``pids`` still living in namespace ``inode``."""
    for pid in pids:
        if ns_inode(pid, proc) == inode:
            return pid
    return None
