"""Rendered documents shared by every reader: made once per model version (or per max age).

At 1,000 namespaces the state JSON is megabytes and takes tens of
milliseconds of CPU to build; made per request, a handful of clients
looping on it kept the GIL from the event loop for seconds and the heap
from shrinking. Readers of one model version all want the same bytes, so
each document (and its gzip form, made on first demand) is made once for
that version and handed out until the version moves on.

``/metrics`` also shows counters and process figures that move without
the model changing; it is instead made at most once per ``max_age``
seconds per Accept header (1 s in the daemon: a scrape is at most that old).
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import orjson

from nswatch.model import Link, Model, Namespace
from nswatch.state import link_refs, namespace_json, state_json, veth_pairs_json

# Level 6 (zlib's default) shrinks a 1,000-namespace /metrics about as well
# as 9 in a third of the time; it runs once per document, not per reader.
GZIP_LEVEL = 6


def json_bytes(obj: Any) -> bytes:
    """``obj`` as compact UTF-8 JSON with a trailing newline."""
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)


class Document:
    """A rendered body and its content type; its gzip form is made once, on first demand.

    The body may come in parts (``/metrics``: one per family). Then the
    gzip form is compressed part by part, the parts are let go, and the
    whole body is made only when a client that does not take gzip asks:
    Prometheus always takes gzip, and 11 MB held for nobody is held for nothing.
    With ``compress``, the parts are compressed as they are taken from
    ``body`` (which may make them as it goes) and never kept.
    """

    __slots__ = ("_body", "_gz", "_lock", "_parts", "content_type")

    def __init__(
        self, body: bytes | Iterable[bytes], content_type: str, *, compress: bool = False
    ) -> None:
        self._body: bytes | None = body if isinstance(body, bytes) else None
        self._parts: tuple[bytes, ...] | None = None
        self.content_type = content_type
        self._gz: bytes | None = None
        self._lock = threading.Lock()
        if self._body is None:
            assert not isinstance(body, bytes)
            if compress:
                self._gz = _gzip(body)
            else:
                self._parts = tuple(body)

    @property
    def body(self) -> bytes:
        """The whole body (joined from its parts, or inflated, on first demand)."""
        with self._lock:
            if self._body is None:
                if self._parts is not None:
                    self._body = b"".join(self._parts)
                    self._parts = None  # held once, not twice
                else:
                    assert self._gz is not None
                    self._body = zlib.decompress(self._gz, 31)
            return self._body

    def gzipped(self) -> bytes:
        """The body gzip-compressed (the same body always compresses to the same bytes)."""
        with self._lock:
            if self._gz is None:
                self._gz = _gzip((self._body,) if self._body is not None else self._parts or ())
                # The parts (11 MB for a 1,000-namespace scrape) are not kept
                # beside their gzip form (0.6 MB): a client without gzip, rare
                # for /metrics, costs an inflate (~20 ms) instead.
                self._parts = None
            return self._gz


def _gzip(parts: Iterable[bytes]) -> bytes:
    """``parts`` joined and gzip-compressed, one part at a time.

    zlib lets go of the GIL while it compresses. wbits 31: a gzip wrapper,
    with no file name and mtime 0, so the same body gives the same bytes.
    """
    z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    out = [z.compress(p) for p in parts]
    out.append(z.flush())
    return b"".join(out)


class VersionCache:
    """Documents of the newest model version seen; an older version's are never kept.

    ``make`` runs under the cache's lock, so readers of one document wait for
    the one render rather than each making their own. ``max_entries`` bounds
    a version's documents (per-namespace documents are keyed by the name asked
    for, and every alias is a name).
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._version: int | None = None
        self._docs: dict[Hashable, Document] = {}
        self._lock = threading.Lock()
        self.made = 0  # documents rendered, for tests and benchmarks

    def get(self, version: int, key: Hashable, make: Callable[[], Document]) -> Document:
        """The document ``key`` of ``version``, made by ``make`` unless already made."""
        with self._lock:
            if self._version is not None and version < self._version:
                # A reader that took its view before a newer one was cached:
                # the newer document is at least as fresh as it asked for.
                doc = self._docs.get(key)
                if doc is not None:
                    return doc
                self.made += 1
                return make()
            if version != self._version:
                self._version = version
                self._docs = {}
            doc = self._docs.get(key)
            if doc is None:
                doc = make()
                self.made += 1
                if len(self._docs) >= self.max_entries:
                    self._docs = {}
                self._docs[key] = doc
            return doc

    def drop(self, then: Callable[[], None] | None = None) -> bool:
        """Forget every document and run ``then`` under the lock; False while a render runs."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._version = None
            self._docs = {}
            if then is not None:
                then()
        finally:
            self._lock.release()
        return True


class AgeCache:
    """Documents reused for at most ``max_age`` seconds each (0: never reused)."""

    def __init__(
        self,
        max_age: float,
        max_entries: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age = max_age
        self.max_entries = max_entries
        self._clock = clock
        self._docs: dict[Hashable, tuple[float, Document]] = {}
        self._lock = threading.Lock()
        self.made = 0

    def get(self, key: Hashable, make: Callable[[], Document]) -> Document:
        """The document ``key`` if made less than ``max_age`` ago, else a new one from ``make``."""
        with self._lock:
            now = self._clock()
            hit = self._docs.get(key)
            if hit is not None and now - hit[0] < self.max_age:
                return hit[1]
            doc = make()
            self.made += 1
            if self.max_age > 0:
                # Keys come from a request header: a client varying it must
                # not grow the cache, only cost itself renders.
                if key not in self._docs and len(self._docs) >= self.max_entries:
                    self._docs = {}
                self._docs[key] = (self._clock(), doc)
            return doc

    def drop(self) -> bool:
        """Forget every document; False while a render runs."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._docs = {}
        finally:
            self._lock.release()
        return True


# Namespaces with fewer records than this are serialised whole when they change.
RECORD_MEMO_MIN = 200


class StateRenderer:
    """``state_json`` as bytes, each namespace and record serialised once while unchanged.

    A model version differs from the previous one in a few records, but the
    state document holds all of them (1,000 namespaces: 3 MB, 50-100 ms of
    Python per render). Namespaces unchanged since the last snapshot are the
    same objects, and records (links, addresses, routes, rules) are immutable
    and shared, so each one's JSON is kept as an ``orjson.Fragment`` for as
    long as it is in the model and what else the JSON shows is unchanged:
    the names of its namespace's links, and for a link its veth peer and
    lower device (:func:`nswatch.state.link_refs`).
    Not thread-safe: call under one lock (the state's :class:`VersionCache`).
    """

    def __init__(self, record_memo_min: int = RECORD_MEMO_MIN) -> None:
        self.record_memo_min = record_memo_min
        self._memo: dict[int, _NsMemo] = {}  # by inode
        self._pairs: tuple[int, Any] | None = None  # (refs_version, veth_pairs fragment)
        self.serialised = 0  # namespaces and records serialised afresh, for tests
        self.inspected = 0  # namespaces whose peers were looked up again, for tests

    def render(self, model: Model) -> bytes:
        """The bytes of ``json_bytes(state_json(model))``."""
        used: dict[int, _NsMemo] = {}

        refs_version = model.refs_version

        def namespace(ns: Namespace) -> Any:
            old = self._memo.get(ns.inode)
            if old is not None and old.ns is ns and old.refs_version == refs_version:
                # Unchanged, and nothing it shows of other namespaces moved.
                used[ns.inode] = old
                return old.fragment
            self.inspected += 1
            names = tuple((i, link.name) for i, link in ns.links.items())
            refs = tuple(link_refs(model, ns, link) for link in ns.links.values())
            if old is not None and old.names != names:
                old = None  # every record showing a link name may be stale
            if old is not None and old.ns is ns and old.refs == refs:
                used[ns.inode] = replace(old, refs_version=refs_version)
                return old.fragment
            before = old.records if old is not None else {}
            now: dict[int, tuple[object, object, Any]] = {}
            if _records(ns) < self.record_memo_min:
                # Small: made afresh in well under a millisecond, and a
                # memo would cost more memory than the namespace's JSON.
                frag = _fragment(namespace_json(model, ns))
                self.serialised += 1
                used[ns.inode] = _NsMemo(ns, names, refs, now, frag, refs_version)
                return frag

            def fragment(record: object, make: Callable[[], dict[str, Any]]) -> Any:
                deps = link_refs(model, ns, record) if isinstance(record, Link) else None
                hit = before.get(id(record))
                if hit is None or hit[0] is not record or hit[1] != deps:
                    hit = (record, deps, _fragment(make()))
                    self.serialised += 1
                now[id(record)] = hit
                return hit[2]

            frag = _fragment(namespace_json(model, ns, fragment))
            self.serialised += 1
            used[ns.inode] = _NsMemo(ns, names, refs, now, frag, refs_version)
            return frag

        # The pairs show namespace and link names and who is whose peer:
        # all of it moves only with refs_version.
        if self._pairs is None or self._pairs[0] != refs_version:
            self._pairs = (refs_version, _fragment(veth_pairs_json(model)))
        body = json_bytes(state_json(model, namespace, self._pairs[1]))
        # Only what this model holds is kept: namespaces and records gone are let go.
        self._memo = used
        return body

    def forget(self) -> None:
        """Drop every kept fragment (the next render makes them all again)."""
        self._memo = {}
        self._pairs = None


def _records(ns: Namespace) -> int:
    return len(ns.links) + len(ns.addresses) + len(ns.routes) + len(ns.rules)


def _fragment(obj: Any) -> Any:
    # orjson leaves its output in a buffer of at least 4 KiB whatever the
    # length; kept for long, a few hundred bytes of JSON would hold 4 KiB
    # each (150 MB at 1,000 namespaces). A copy holds only the bytes.
    return orjson.Fragment(bytes(memoryview(orjson.dumps(obj))))


@dataclass(frozen=True, slots=True)
class _NsMemo:
    ns: Namespace
    names: tuple[tuple[int, str], ...]
    refs: tuple[tuple[object, object], ...]
    records: dict[int, tuple[object, object, Any]]  # id(record) -> (record, its refs, fragment)
    fragment: Any
    refs_version: int  # the model's refs_version ``refs`` were checked against
