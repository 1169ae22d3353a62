"""A specialised encoder for the collectors' families, byte-identical to prometheus-client's.

A scrape of 1000 namespaces is ~57,000 samples, which prometheus-client's
generic encoders format several times slower than this one (measured side
by side by ``tests.bench.bench --codec``; see tests/bench/README.md). The
tests hold its output to prometheus-client's for every format
``choose_encoder`` negotiates.

Name escaping (the ``escaping`` of an Accept header, prometheus-client 0.23
and later) is written out here rather than taken from prometheus-client's
private helpers, which older releases within the declared range lack.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.exposition import generate_latest as text_latest
from prometheus_client.openmetrics.exposition import generate_latest as om_latest
from prometheus_client.utils import floatToGoString

from nswatch.metrics.family import Family, Labels

# The escaping schemes of the exposition formats (Prometheus' names).
UNDERSCORES = "underscores"
DOTS = "dots"
VALUES = "values"
ALLOWUTF8 = "allow-utf-8"
KNOWN_ESCAPINGS = (UNDERSCORES, DOTS, VALUES, ALLOWUTF8)

# The most integer values' strings a scrape keeps between families.
INT_MEMO_MAX = 4096


def _legacy_label_rune(c: str, i: int) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or c == "_" or ("0" <= c <= "9" and i > 0)


def _legacy_metric_rune(c: str, i: int) -> bool:
    return _legacy_label_rune(c, i) or c == ":"


def _is_legacy(name: str, rune: Callable[[str, int], bool]) -> bool:
    return bool(name) and all(rune(c, i) for i, c in enumerate(name))


def escape_value(v: str) -> str:
    """Backslash, newline and double quote escaped, as in label values and OpenMetrics help."""
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return v


def escape(s: str, escaping: str, rune: Callable[[str, int], bool]) -> str:
    """``s`` under one escaping scheme (``rune``: which characters are legal where)."""
    if escaping == ALLOWUTF8:
        return escape_value(s)
    out: list[str] = []
    if escaping == UNDERSCORES:
        out = [c if rune(c, i) else "_" for i, c in enumerate(s)]
    elif escaping == DOTS:
        for i, c in enumerate(s):
            if c == "_":
                out.append("__")
            elif c == ".":
                out.append("_dot_")
            else:
                out.append(c if rune(c, i) else "__")
    elif escaping == VALUES:
        out.append("U__")
        for i, c in enumerate(s):
            if c == "_":
                out.append("__")
            elif rune(c, i):
                out.append(c)
            elif 0xD800 <= ord(c) <= 0xDFFF:
                out.append("_FFFD_")
            else:
                out.append(f"_{ord(c):x}_")
    else:
        return s
    return "".join(out)


def _escape_name(s: str, escaping: str, rune: Callable[[str, int], bool]) -> str:
    """A metric or label name: escaped (quoted under allow-utf-8) unless already legal."""
    if not s:
        return s
    legacy = _is_legacy(s, rune)
    if escaping == ALLOWUTF8:
        return escape(s, escaping, rune) if legacy else f'"{escape(s, escaping, rune)}"'
    if escaping in (UNDERSCORES, VALUES):
        return s if legacy else escape(s, escaping, rune)
    if escaping == DOTS:
        return escape(s, escaping, rune)
    return s


def escape_metric_name(s: str, escaping: str) -> str:
    return _escape_name(s, escaping, _legacy_metric_rune)


def escape_label_name(s: str, escaping: str) -> str:
    return _escape_name(s, escaping, _legacy_label_rune)


@dataclass(frozen=True)
class FastEncoder:
    """Formats families exactly as prometheus-client's encoder for one format and escaping."""

    openmetrics: bool
    escaping: str

    def _sample_name(self, fam: Family) -> str:
        name = fam.sample_name
        if self.openmetrics:
            # prometheus-client escapes OpenMetrics sample names with the
            # label-name alphabet, legal or not.
            return escape(name, self.escaping, _legacy_label_rune)
        return escape_metric_name(name, self.escaping)

    def _header(self, fam: Family) -> str:
        esc = self.escaping
        if self.openmetrics:
            name = escape_metric_name(fam.base, esc)
            doc = escape_value(fam.doc)
            return f"# HELP {name} {doc}\n# TYPE {name} {fam.type}\n"
        name = escape_metric_name(fam.sample_name, esc)
        doc = fam.doc.replace("\\", r"\\").replace("\n", r"\n")
        return f"# HELP {name} {doc}\n# TYPE {name} {fam.type}\n"

    def encode(self, families: Iterable[Family]) -> bytes:
        """The whole exposition of ``families`` (see :meth:`parts`)."""
        return b"".join(self.parts(families))

    def parts(self, families: Iterable[Family]) -> Iterator[bytes]:
        """The exposition one family at a time, as each is taken from ``families``.

        A scrape of 1,000 namespaces is ~11 MB of text in ~136,000 lines:
        held as one list of lines, then one string, then its bytes, that was
        ~55 MB at once, and a heap that size stays fragmented after. One
        family's lines at a time is a few hundred KB.
        """
        esc = self.escaping
        # Whole label sets repeat (a device's netns and name label 31
        # families), and so do integer values (0, 1, an MTU, a counter of
        # idle devices): render each once. Only the label sets of label
        # names a second family uses are kept, and the ints memo is emptied
        # after a family that took it over INT_MEMO_MAX: at 1,000
        # namespaces, keeping every one held ~6 MB of strings until the
        # scrape's end (an info family's label sets and most counter values
        # are printed once), and memory a render takes at its peak stays in
        # the heap's arenas long after. Only ints are memoised: 0.0 == -0.0
        # but they print apart.
        labelsets: dict[tuple[str, ...], dict[Labels, str]] = {}
        once: set[tuple[str, ...]] = set()
        ints: dict[int, str] = {}
        go: Callable[[float], str] = floatToGoString

        def value(v: object) -> str:
            s = go(v)  # type: ignore[arg-type]
            if isinstance(v, int):
                ints[v] = s
            return s

        for fam in families:
            out = [self._header(fam)]
            sname = self._sample_name(fam)
            if not fam.labels:
                out.extend(
                    [
                        f"{sname} {(ints.get(v) if isinstance(v, int) else None) or value(v)}\n"
                        for v in fam.values
                    ]
                )
                yield "".join(out).encode("utf-8")
                continue
            # prometheus-client sorts the labels by name.
            order = sorted(range(len(fam.labels)), key=lambda i: fam.labels[i])
            keys = tuple(f'{escape_label_name(fam.labels[i], esc)}="' for i in order)
            if keys in labelsets:
                cache = labelsets[keys]
            elif keys in once:
                cache = labelsets[keys] = {}
            else:
                once.add(keys)
                cache = {}  # this family's own: let go with it
            pairs = tuple(zip(keys, order, strict=True))

            def labelset(
                lv: Labels,
                pairs: tuple[tuple[str, int], ...] = pairs,
                cache: dict[Labels, str] = cache,
            ) -> str:
                ls = "{" + '",'.join([k + escape_value(lv[i]) for k, i in pairs]) + '"} '
                cache[lv] = ls
                return ls

            out.extend(
                [
                    sname
                    + (cache.get(lv) or labelset(lv))
                    + ((ints.get(v) if isinstance(v, int) else None) or value(v))
                    + "\n"
                    for lv, v in zip(fam.keys, fam.values, strict=True)
                ]
            )
            if len(ints) > INT_MEMO_MAX:
                ints.clear()
            yield "".join(out).encode("utf-8")


def fast_encoder(encoder: Callable[..., Any]) -> FastEncoder | None:
    """The fast equivalent of an encoder returned by ``choose_encoder`` (None: none known)."""
    func: Any = encoder
    kw: dict[str, Any] = {}
    if isinstance(encoder, functools.partial):
        func, kw = encoder.func, dict(encoder.keywords)
        if encoder.args:
            return None
    escaping = kw.pop("escaping", UNDERSCORES)
    # The OpenMetrics version only changes native histograms, which no family is.
    kw.pop("version", None)
    if kw or escaping not in KNOWN_ESCAPINGS:
        return None
    if func is text_latest:
        return FastEncoder(openmetrics=False, escaping=escaping)
    if func is om_latest:
        return FastEncoder(openmetrics=True, escaping=escaping)
    return None
