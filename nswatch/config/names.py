"""Host-side interface names: the ``host_name`` templates and the namespace id hash."""

from __future__ import annotations

import hashlib
import re
import string
from typing import NamedTuple

from nswatch.values import Invalid

__all__ = [
    "HASH_LEN",
    "ID_LEN",
    "IFNAME_MAX",
    "host_name_pattern",
    "netns_id",
    "parse_template",
    "render_host_name",
]

IFNAME_MAX = 15  # IFNAMSIZ (16) minus the NUL
ID_LEN = 8  # hex digits of {id}
HASH_LEN = 4  # hex digits appended to a shortened {netns}

# Conservative: what `ip`, udev and friends handle without surprises.
_SAFE_CHARS = re.compile(r"[A-Za-z0-9_.\-]")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


class Template(NamedTuple):
    """A parsed template: its parts and the bytes left for ``{netns}``."""

    parts: tuple[tuple[str, str | None], ...]  # (literal, "netns" | "id" | None)
    budget: int  # bytes left for {netns}


def netns_id(netns: str) -> str:
    """The short stable id of a namespace name: 8 hex digits of its BLAKE2b hash."""
    raw = netns.encode("utf-8", "surrogateescape")
    return hashlib.blake2b(raw, digest_size=ID_LEN // 2).hexdigest()


def parse_template(template: str) -> Template:
    """The parts of a ``host_name`` template; raises Invalid for one that could not always fit."""
    if not isinstance(template, str) or not template:
        raise Invalid("must be a non-empty string")
    parts: list[tuple[str, str | None]] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise Invalid(f"bad template: {e}") from None
    fixed = 0
    seen: list[str] = []
    for literal, name, spec, conv in parsed:
        bad = sorted({c for c in literal if not _SAFE_CHARS.fullmatch(c)})
        if bad:
            raise Invalid(f"character {bad[0]!r} is not allowed in an interface name")
        fixed += len(literal.encode())
        if name is None:
            parts.append((literal, None))
            continue
        if name not in ("netns", "id"):
            raise Invalid(f"unknown variable {{{name}}} (use {{netns}} or {{id}})")
        if spec or conv:
            raise Invalid(f"{{{name}}} takes no format spec or conversion")
        if name == "netns" and "netns" in seen:
            raise Invalid("{netns} may appear only once")
        seen.append(name)
        if name == "id":
            fixed += ID_LEN
        parts.append((literal, name))
    if not seen:
        raise Invalid("must contain {id} or {netns} so each namespace gets its own name")
    if fixed > IFNAME_MAX:
        what = "is {} bytes without {{netns}}" if "netns" in seen else "renders to {} bytes"
        raise Invalid(f"{what.format(fixed)}; interface names are at most {IFNAME_MAX} bytes")
    budget = IFNAME_MAX - fixed
    if "netns" in seen and budget < HASH_LEN + 1:
        raise Invalid(
            f"leaves {budget} bytes for {{netns}}; needs at least {HASH_LEN + 1} "
            f"(interface names are at most {IFNAME_MAX} bytes)"
        )
    return Template(tuple(parts), budget)


def _netns_part(netns: str, budget: int) -> str:
    if _SAFE_NAME.fullmatch(netns) and len(netns) <= budget and netns not in (".", ".."):
        return netns
    clean = "".join(c if _SAFE_CHARS.fullmatch(c) else "_" for c in netns)
    return clean[: budget - HASH_LEN] + netns_id(netns)[:HASH_LEN]


def _parsed(template: str) -> Template:
    try:
        return parse_template(template)
    except Invalid as e:
        raise ValueError(f"host_name template {template!r}: {e.message}") from None


def render_host_name(template: str, netns: str) -> str:
    """The host-side veth name for ``netns``: always a valid name of at most 15 bytes.

    ``{id}`` becomes :func:`netns_id` (8 hex digits).  ``{netns}`` becomes the
    name itself when it fits the bytes the rest of the template leaves (B) and
    uses only ``[A-Za-z0-9_.-]``; otherwise its first B-4 characters (others
    replaced by ``_``) followed by the first 4 hex digits of its id, so the
    result stays stable and distinct names rarely collide.  Templates that
    could not always fit (fixed part over 15 bytes, or B < 5 with
    ``{netns}``) are refused at load time; here they raise ValueError.
    """
    parsed = _parsed(template)
    out: list[str] = []
    for literal, name in parsed.parts:
        out.append(literal)
        if name == "id":
            out.append(netns_id(netns))
        elif name == "netns":
            out.append(_netns_part(netns, parsed.budget))
    return "".join(out)


def host_name_pattern(template: str) -> re.Pattern[str]:
    """A regex matching every name :func:`render_host_name` can produce from ``template``."""
    parsed = _parsed(template)
    rx: list[str] = []
    for literal, name in parsed.parts:
        rx.append(re.escape(literal))
        if name == "id":
            rx.append(f"[0-9a-f]{{{ID_LEN}}}")
        elif name == "netns":
            rx.append(f"[A-Za-z0-9_.\\-]{{1,{parsed.budget}}}")
    return re.compile("".join(rx))
