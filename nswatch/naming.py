"""What a namespace is called: escaped file names, and names made from a holder process.

File names are bytes. Python reads them with ``os.fsdecode`` (surrogateescape),
so a byte that is not UTF-8 becomes a lone surrogate, which no JSON encoder,
Prometheus exposition or log line can carry. :func:`escape` turns each such
byte into the four characters ``\\xNN`` and a literal backslash into ``\\\\``,
so the result is plain text and :func:`unescape` gives back the exact name:
``x-\\xff\\xfe`` and ``x-\\xfe\\xff`` stay two names.

A namespace no file holds (LXC, ``PrivateNetwork=yes``, ``unshare -n``) is
named after one process living in it (see :func:`anonymous_name`):

- ``container:<first 12 hex digits of the id>`` when its cgroup path shows a
  container (Docker, containerd, CRI-O, Podman);
- ``unit:<unit>`` when it shows a systemd unit (``foo.service``, ``bar.scope``)
  other than a user's session or slice;
- ``pid:<pid>:<comm>`` otherwise.

The model makes labels unique (``<name>@<inode>`` on a clash, see
:class:`nswatch.model.Model`), so two namespaces of one unit stay apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SURROGATES = re.compile(r"[\\\udc80-\udcff]")
_ESCAPES = re.compile(r"\\(\\|x[0-9a-f]{2})")


def escape(name: str) -> str:
    """``name`` (from ``os.fsdecode``) as text: bytes not UTF-8 as ``\\xNN``, ``\\`` doubled."""

    def one(m: re.Match[str]) -> str:
        c = m.group()
        return "\\\\" if c == "\\" else f"\\x{ord(c) - 0xDC00:02x}"

    return _SURROGATES.sub(one, name)


def unescape(label: str) -> str:
    """The name :func:`escape` was given (``os.fsencode`` of it gives the file's bytes)."""

    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        return "\\" if e == "\\" else chr(0xDC00 + int(e[1:], 16))

    return _ESCAPES.sub(one, label)


@dataclass(frozen=True, slots=True)
class CgroupInfo:
    """What a process's cgroup path says it belongs to."""

    unit: str | None = None
    container_id: str | None = None
    pod_uid: str | None = None


# docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope,
# libpod-<id>.scope, or a bare /docker/<id> (cgroupfs driver).
_CONTAINER = re.compile(r"(?:^|[-/])([0-9a-f]{64})(?:\.scope)?$")
# kubepods-besteffort-pod<uid>.slice (systemd driver, "_" for "-") or /pod<uid>/.
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_UNIT = re.compile(r"^[^/]+\.(service|scope|socket|mount|swap)$")
# A login session's scope or a user's manager names nothing the operator set up.
_NOT_A_UNIT = re.compile(r"^(session-.*\.scope|user@\d+\.service|init\.scope)$")


def parse_cgroup(text: str) -> CgroupInfo:
    """The unit, container and pod a ``/proc/PID/cgroup`` text shows (cgroup v2 or v1)."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, p = rest.partition(":")
        paths.setdefault("v2" if hierarchy == "0" and not controllers else controllers, p)
    # The unified hierarchy's path, unless it is the root (a hybrid setup,
    # where systemd keeps its tree under name=systemd).
    path = paths.get("v2", "/")
    if path == "/":
        path = paths.get("name=systemd", "/")
    parts = [c for c in path.split("/") if c]
    container = pod = unit = None
    for part in parts:
        m = _CONTAINER.search(part)
        if m:
            container = m.group(1)
        m = _POD.search(part)
        if m:
            pod = m.group(1).replace("_", "-")
        if _UNIT.match(part) and not _NOT_A_UNIT.match(part):
            unit = part
    return CgroupInfo(unit=unit, container_id=container, pod_uid=pod)


def anonymous_name(pid: int, comm: str, unit: str | None, container_id: str | None) -> str:
    """The name of a namespace no file holds, made from one process in it (see module doc)."""
    if container_id is not None:
        return f"container:{container_id[:12]}"
    if unit is not None:
        return f"unit:{unit}"
    return f"pid:{pid}:{comm}"
