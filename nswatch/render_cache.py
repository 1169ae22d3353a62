"""Rendered documents shared by every reader: made once per model version (or per max age).

At 1,000 namespaces the state JSON is megabytes and takes tens of
milliseconds of CPU to build; made per request, a handful of clients
looping on it kept the GIL from the event loop for seconds and the heap
from shrinking. Readers of one model version all want the same bytes, so
each document (and its gzip form, made on first demand) is made once for
that version and handed out until the version moves on.

``/metrics`` also shows counters and process figures that move without
the model changing; it is instead made at most once per ``max_age``
seconds per Accept header (1 s in the daemon: a scrape is at most that old),
or less often when making it is slow (see :class:`AgeCache`).
"""

from __future__ import annotations

import bisect
import itertools
import operator
import os
import threading
import time
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import orjson

from nswatch.model import Link, Model, Namespace
from nswatch.state import (
    LINK_SHOWN,
    address_json,
    address_order,
    link_json,
    link_order,
    link_refs,
    namespace_head,
    namespace_json,
    route_json,
    route_order,
    rule_json,
    rule_order,
    state_json,
    state_top,
    veth_pairs_json,
)

# Level 6 (zlib's default) shrinks a 1,000-namespace /metrics about as well
# as 9 in a third of the time; it runs once per document, not per reader.
GZIP_LEVEL = 6

T = TypeVar("T")


def json_bytes(obj: Any) -> bytes:
    """``obj`` as compact UTF-8 JSON with a trailing newline."""
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)


class Chunks:
    """A body kept as the parts it was made of, sent part by part and never joined.

    The state at 1,000 namespaces is 6.7 MB, nearly all of it namespaces'
    JSON that :class:`StateRenderer` keeps anyway: joined, each model version
    cost a 6.7 MB copy in fresh pages (at ten versions a second under 16
    readers, the render threads took about a fifth of a core, page faults,
    page clearing and memmove among their top symbols in ``perf``) and held
    6.7 MB more for as long as a reader was still being sent it.
    """

    __slots__ = ("ends", "parts", "size")

    def __init__(self, parts: Iterable[bytes]) -> None:
        self.parts = tuple(filter(None, parts))
        # Where each part ends in the body: made once per document, not per
        # reader, for senders that look up where a send stopped.
        self.ends = tuple(itertools.accumulate(map(len, self.parts)))
        self.size = self.ends[-1] if self.ends else 0

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Chunks):
            return self.size == other.size and bytes(self) == bytes(other)
        if isinstance(other, bytes | bytearray | memoryview):
            return self.size == len(other) and bytes(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def pieces(self, size: int) -> Iterator[bytes]:
        """The body in pieces of about ``size`` bytes (parts joined, or cut, to that size)."""
        group: list[memoryview] = []
        held = 0
        for part in self.parts:
            view = memoryview(part)
            for start in range(0, len(view), size):
                piece = view[start : start + size]
                group.append(piece)
                held += len(piece)
                if held >= size:
                    yield b"".join(group)
                    group, held = [], 0
        if group:
            yield b"".join(group)


Body = bytes | Chunks

# sendmsg() and writev() take at most this many buffers at once (Linux:
# 1024): whoever sends a Chunks' parts sends them in batches of this many.
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16


def as_chunks(body: Body) -> Chunks:
    """``body`` as :class:`Chunks` (bytes: in one part)."""
    return body if isinstance(body, Chunks) else Chunks((body,))


class Document:
    """A rendered body and its content type; its gzip form is made once, on first demand.

    A body given as :class:`Chunks` is kept and served as such. The body
    may also come in parts to be let go (``/metrics``: one per family). Then the
    gzip form is compressed part by part, the parts are let go, and the
    whole body is made only when a client that does not take gzip asks:
    Prometheus always takes gzip, and 11 MB held for nobody is held for nothing.
    With ``compress``, the parts are compressed as they are taken from
    ``body`` (which may make them as it goes) and never kept.
    """

    __slots__ = (
        "_body",
        "_derived",
        "_derived_lock",
        "_gz",
        "_lock",
        "_parts",
        "content_type",
        "etag",
    )

    def __init__(
        self,
        body: Body | Iterable[bytes],
        content_type: str,
        *,
        compress: bool = False,
        etag: str | None = None,
    ) -> None:
        self._body: Body | None = body if isinstance(body, Body) else None
        self._parts: tuple[bytes, ...] | None = None
        self.content_type = content_type
        # What names this body among the document's versions (the model's
        # shown version); None: no validator (/metrics moves without it).
        self.etag = etag
        self._gz: bytes | None = None
        self._derived: dict[Hashable, Any] = {}
        # Apart from _lock: ``make`` may well read the body.
        self._derived_lock = threading.Lock()
        self._lock = threading.Lock()
        if self._body is None:
            assert not isinstance(body, Body)
            if compress:
                self._gz = _gzip(body)
            else:
                self._parts = tuple(body)

    @property
    def body(self) -> Body:
        """The whole body: its :class:`Chunks` as given, else bytes (joined from its
        parts, or inflated, on first demand)."""
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
                body = self._body
                self._gz = _gzip(as_chunks(body).parts if body is not None else self._parts or ())
                # The parts (11 MB for a 1,000-namespace scrape) are not kept
                # beside their gzip form (0.6 MB): a client without gzip, rare
                # for /metrics, costs an inflate (~20 ms) instead.
                self._parts = None
            return self._gz

    def made(self, gzip: bool) -> bool:
        """Whether the form asked for is already made (serving it costs nothing more)."""
        return (self._gz if gzip else self._body) is not None

    def derived_made(self, key: Hashable) -> bool:
        """Whether :meth:`derived` has made ``key``."""
        return key in self._derived

    def derived(self, key: Hashable, make: Callable[[], T]) -> T:
        """What ``make`` makes of this document, made once per ``key`` and kept as long as it is
        (its body in shared memory, for :mod:`nswatch.sender`)."""
        with self._derived_lock:
            if key not in self._derived:
                self._derived[key] = make()
            return cast(T, self._derived[key])


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

    def peek(self, version: int, key: Hashable) -> Document | None:
        """The document ``key`` of ``version`` if already made; None also while one is made
        (the caller then goes the slow way, :meth:`get`, off its thread)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._docs.get(key) if version == self._version else None
        finally:
            self._lock.release()

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
    """Documents reused for ``max_age`` seconds each (0: never reused), or longer if slow to make.

    With ``busy_share``, a document is reused until making it again would
    keep a render running at most that share of the time: for
    max(``max_age``, its render's time × (1/``busy_share`` − 1)). A render
    holds the GIL for most of its time, and every thread waiting for the GIL
    (the event loop, the HTTP thread) waits longer while one runs: at 1,000
    namespaces a /metrics render took 0.5 s under 16 state readers, so
    looping scrapers kept one running half the time (tests/bench/bench_readers.py).
    """

    def __init__(
        self,
        max_age: float,
        max_entries: int = 8,
        clock: Callable[[], float] = time.monotonic,
        busy_share: float = 1.0,
    ) -> None:
        if not 0 < busy_share <= 1:
            raise ValueError(f"busy_share must be in (0, 1], not {busy_share}")
        self.max_age = max_age
        self.max_entries = max_entries
        self._clock = clock
        self._stretch = 1 / busy_share - 1
        # key -> (reused until, document)
        self._docs: dict[Hashable, tuple[float, Document]] = {}
        self._lock = threading.Lock()
        self.made = 0

    def get(self, key: Hashable, make: Callable[[], Document]) -> Document:
        """The document ``key`` while it may be reused (see the class), else a new one."""
        with self._lock:
            hit = self._docs.get(key)
            if hit is not None and self._clock() < hit[0]:
                return hit[1]
            began = self._clock()
            doc = make()
            self.made += 1
            if self.max_age > 0:
                # Keys come from a request header: a client varying it must
                # not grow the cache, only cost itself renders.
                if key not in self._docs and len(self._docs) >= self.max_entries:
                    self._docs = {}
                now = self._clock()
                reuse = max(self.max_age, (now - began) * self._stretch)
                self._docs[key] = (now + reuse, doc)
            return doc

    def peek(self, key: Hashable) -> Document | None:
        """The document ``key`` while it may still be reused; None also while one is made."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            hit = self._docs.get(key)
            return hit[1] if hit is not None and self._clock() < hit[0] else None
        finally:
            self._lock.release()

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

_SECTIONS = ("links", "addresses", "routes", "rules")


class StateRenderer:
    """``state_json`` as bytes, each namespace, list and record serialised once while unchanged.

    A model version differs from the previous one in a few records, but the
    state document holds all of them (1,000 namespaces: 6.7 MB). Namespaces
    unchanged since the last snapshot are the same objects, and records
    (links, addresses, routes, rules) are immutable and shared, so a
    namespace's JSON is kept for as long as its records are the same objects
    and what else the JSON shows is unchanged: the names of its namespace's
    links, and for a link its veth peer and lower device
    (:func:`nswatch.state.link_refs`), which move only with the model's
    ``refs_version``. A namespace changed in one list (a host with 1,000
    veths, one of them set down) keeps its other lists, and in a big
    namespace each record's JSON is kept too. A counter refresh makes new
    link records that show the same (:data:`nswatch.state.LINK_SHOWN`): it
    changes no JSON and none is made again.
    Not thread-safe: call under one lock (the state's :class:`VersionCache`).
    """

    def __init__(self, record_memo_min: int = RECORD_MEMO_MIN, insert_max: int = 16) -> None:
        self.record_memo_min = record_memo_min
        # New records put in place one by one up to this many (or an eighth
        # of the list); more, and the list is sorted again.
        self.insert_max = insert_max
        self._memo: dict[int, _NsMemo] = {}  # by inode
        self._pairs: tuple[int, bytes] | None = None  # (refs_version, veth_pairs JSON)
        self._last: _Frame | None = None  # the last document's parts, to patch
        self.serialised = 0  # namespaces and records serialised afresh, for tests
        self.inspected = 0  # namespaces whose peers were looked up again, for tests

    def render(self, model: Model) -> bytes:
        """The bytes of ``json_bytes(state_json(model))``."""
        return bytes(self.render_chunks(model))

    def render_chunks(self, model: Model) -> Chunks:
        """``json_bytes(state_json(model))`` as the kept JSON of each namespace, between
        the document's own few bytes (keys, commas, braces): nothing is copied."""
        patched = self._patch(model)
        if patched is not None:
            return patched
        used: dict[int, _NsMemo] = {}
        kept: list[bytes] = []
        order: list[Namespace] = []

        def namespace(ns: Namespace) -> Any:
            memo = self._namespace(model, ns, self._memo.get(ns.inode))
            used[ns.inode] = memo
            kept.append(memo.json)
            order.append(ns)
            return _SLOT

        refs_version = model.refs_version
        # The pairs show namespace and link names and who is whose peer:
        # all of it moves only with refs_version.
        if self._pairs is None or self._pairs[0] != refs_version:
            self._pairs = (refs_version, _json(veth_pairs_json(model)))
        # The document's frame comes from state_json itself, each kept JSON
        # standing in as a NUL byte: orjson writes a NUL inside a string as
        # \u0000, so every raw NUL in its output is a slot, in document order.
        frame = json_bytes(state_json(model, namespace, _SLOT)).split(b"\0")
        kept.append(self._pairs[1])
        if len(frame) != len(kept) + 1:
            raise AssertionError(f"{len(frame) - 1} slots in the state frame for {len(kept)}")
        parts = [frame[0]]
        for json, after in zip(kept, frame[1:], strict=True):
            parts.append(json)
            parts.append(after)
        # Only what this model holds is kept: namespaces and records gone are let go.
        self._memo = used
        self._last = _Frame(
            refs_version,
            parts,
            {ns.inode: 1 + 2 * i for i, ns in enumerate(order)},
            order[0].name if order else "",
        )
        return Chunks(parts)

    def _patch(self, model: Model) -> Chunks | None:
        """The last document with the namespaces changed since put in their places; None
        when that cannot be (namespaces came, went or were renamed, or peers moved).

        The same ``refs_version`` means the same namespaces under the same names
        (each NamespaceSeen and NamespaceGone moves it, and a name comes only
        with those), so every slot stays where it was and only the namespaces
        that are new objects need a look: a link flapping among 1,000
        namespaces is one namespace's work, not a walk of all of them through
        the frame (1.3 ms a version, measured alone).
        """
        last = self._last
        refs_version = model.refs_version
        if last is None or last.refs_version != refs_version or not last.slots:
            return None
        namespaces = model.namespaces
        if len(namespaces) != len(last.slots):
            return None
        memos = self._memo
        olds = list(map(memos.get, namespaces))
        try:
            seen = list(map(_ns_of, olds))
        except AttributeError:
            return None  # a namespace without a memo (not one the last document had)
        now = list(namespaces.values())
        parts = list(last.parts)
        # Walked in C: at 1,000 namespaces a Python loop here was a fifth of a version's render.
        for i in itertools.compress(range(len(now)), map(operator.is_not, now, seen)):
            ns, memo = now[i], self._namespace(model, now[i], olds[i])
            memos[ns.inode] = memo
            parts[last.slots[ns.inode]] = memo.json
        # The frame's first part holds what moves with every version
        # (state_top), then the first namespace's name, unchanged.
        head = {**state_top(model), "namespaces": {last.first: _SLOT}}
        parts[0] = json_bytes(head).split(b"\0", 1)[0]
        self._last = _Frame(refs_version, parts, last.slots, last.first)
        return Chunks(parts)

    def _namespace(self, model: Model, ns: Namespace, old: _NsMemo | None) -> _NsMemo:
        """``ns``'s memo: ``old`` if it still holds, else one with what changed made again."""
        refs_version = model.refs_version
        if old is not None and old.ns is ns and old.refs_version == refs_version:
            return old  # unchanged, and nothing it shows of other namespaces moved
        if old is not None and old.refs_version == refs_version:
            # No link came, went, was renamed or re-pointed anywhere since
            # (each bumps refs_version): the names and peers are as they were.
            names, refs = old.names, old.refs
        else:
            self.inspected += 1
            names = tuple((i, link.name) for i, link in ns.links.items())
            refs = tuple(link_refs(model, ns, link) for link in ns.links.values())
            if old is not None and old.names != names:
                old = None  # every list shows link names: all may be stale
        lists = (
            tuple(ns.links.values()),
            tuple(ns.addresses.values()),
            tuple(ns.routes.values()),
            tuple(ns.rules.values()),
        )
        head = namespace_head(ns)

        def memo(sections: tuple[tuple[Any, list[_Entry]], ...] | None, json: bytes) -> _NsMemo:
            return _NsMemo(ns, head, names, refs, refs_version, lists, sections, json)

        if old is not None:
            same = (
                old.refs == refs and _links_alike(old.lists[0], lists[0]),
                *(_same_records(a, b) for a, b in zip(old.lists[1:], lists[1:], strict=True)),
            )
            if all(same) and old.head == head:
                return memo(old.sections, old.json)
        else:
            same = (False,) * len(_SECTIONS)
        if _records(ns) < self.record_memo_min:
            # Small: made afresh in well under a millisecond, and a memo of
            # its lists and records would cost more memory than its JSON.
            self.serialised += 1
            return memo(None, _json(namespace_json(model, ns)))
        by_index = dict(zip(ns.links, refs, strict=True))
        kinds = (
            _Kind(link_order, lambda r: link_json(model, ns, r), by_index),
            _Kind(address_order, lambda r: address_json(ns, r)),
            _Kind(route_order, lambda r: route_json(ns, r)),
            _Kind(rule_order, rule_json),
        )
        sections = []
        for i, kind in enumerate(kinds):
            prior = old.sections[i] if old is not None and old.sections is not None else None
            if same[i] and prior is not None:
                sections.append(prior)
                continue
            was = None
            if prior is not None and old is not None and old.refs_version == refs_version:
                # The same names and peers as then: only the records that are
                # new objects can show anything new.
                was = old.lists[i]
            entries = self._entries(lists[i], prior[1] if prior is not None else None, kind, was)
            sections.append((_fragment(list(map(_json_of, entries))), entries))
        self.serialised += 1
        body = {**head, **{name: sec[0] for name, sec in zip(_SECTIONS, sections, strict=True)}}
        return memo(tuple(sections), _json(body))

    def _entries(
        self,
        records: tuple[Any, ...],
        prior: list[_Entry] | None,
        kind: _Kind,
        was: tuple[Any, ...] | None = None,
    ) -> list[_Entry]:
        """One list's entries in order: ``prior``'s where they still hold, the rest made.

        ``was``: the records ``prior`` was made from, in the namespace's order,
        when nothing a record shows of other links has moved since.
        """
        if prior is not None and was is not None and len(was) == len(records):
            patched = self._patch_entries(records, prior, kind, was)
            if patched is not None:
                return patched
        deps_of = kind.deps
        if prior is not None:
            # A few records came or went (a link set down: its own two
            # routes and address, among a host's thousands): the rest keep
            # their place, and the new ones are put in theirs.
            ids = {id(r) for r in records}
            kept = [
                e
                for e in prior
                if id(e[1]) in ids and (deps_of is None or deps_of[e[1].index] == e[2])
            ]
            if len(records) - len(kept) <= max(self.insert_max, len(records) // 8):
                have = {id(e[1]) for e in kept}
                for r in records:
                    if id(r) not in have:
                        e = self._entry(r, kind, None)
                        kept.insert(bisect.bisect_right(kept, e[0], key=_first), e)
                return kept
        # Many changed (a counter refresh made every link anew): sort them
        # all, reusing the JSON of each record that still shows the same.
        before: dict[object, _Entry] = {}
        if prior is not None:
            before = {_memo_key(e[1]): e for e in prior}
        out = [self._entry(r, kind, before.get(_memo_key(r))) for r in records]
        out.sort(key=_first)
        return out

    def _patch_entries(
        self, records: tuple[Any, ...], prior: list[_Entry], kind: _Kind, was: tuple[Any, ...]
    ) -> list[_Entry] | None:
        """``prior`` with the records replaced in place (a link set down: the same key,
        a new object) put in their places; None when that is not what happened.

        A host with 1,000 veths had its whole links list walked three times
        in Python for each link that changed; this looks (in C) for the
        positions that hold new objects and touches only those.
        """
        changed = _differing(was, records)
        if len(changed) > max(self.insert_max, len(records) // 8):
            return None
        entries = list(prior)
        gone = []
        for i in changed:
            at = bisect.bisect_left(entries, kind.order(was[i]), key=_first)
            if at == len(entries) or entries[at][1] is not was[i]:
                return None  # prior was made from other records (kept across a refresh)
            gone.append(entries.pop(at))
        for i, e in zip(changed, gone, strict=True):
            r = records[i]
            e = self._entry(r, kind, e if _memo_key(e[1]) == _memo_key(r) else None)
            entries.insert(bisect.bisect_right(entries, e[0], key=_first), e)
        return entries

    def _entry(self, record: Any, kind: _Kind, was: _Entry | None) -> _Entry:
        deps = kind.deps[record.index] if kind.deps is not None else None
        if was is not None and was[2] == deps and _record_alike(was[1], record):
            return (was[0], record, deps, was[3])
        self.serialised += 1
        return (kind.order(record), record, deps, _fragment(kind.make(record)))

    def forget(self) -> None:
        """Drop every kept fragment (the next render makes them all again)."""
        self._memo = {}
        self._pairs = None
        self._last = None


def _records(ns: Namespace) -> int:
    return len(ns.links) + len(ns.addresses) + len(ns.routes) + len(ns.rules)


def _same_records(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """The same record objects in the same order (equal is not enough: an
    address's lifetimes, which its JSON shows, are left out of its equality)."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _link_alike(a: object, b: Link) -> bool:
    return a is b or (isinstance(a, Link) and LINK_SHOWN(a) == LINK_SHOWN(b))


def _links_alike(a: tuple[object, ...], b: tuple[Link, ...]) -> bool:
    """The same links, or links that show the same (a counter refresh), in the same order."""
    return len(a) == len(b) and all(_link_alike(a[i], b[i]) for i in _differing(a, b))


def _differing(a: tuple[object, ...], b: tuple[object, ...]) -> list[int]:
    """The positions where two tuples of one length hold different objects (walked in C)."""
    return list(itertools.compress(range(len(a)), map(operator.is_not, a, b)))


_json_of = operator.itemgetter(3)
_ns_of = operator.attrgetter("ns")


# Fragments at least this long are kept as orjson made them.
_COPY_MAX = 64 * 1024


def _json(obj: Any) -> bytes:
    # orjson leaves its output in a buffer of at least 4 KiB whatever the
    # length; kept for long, a few hundred bytes of JSON would hold 4 KiB
    # each (150 MB at 1,000 namespaces). A copy holds only the bytes. A big
    # one (a host's routes, 1 MB) holds only the pages it wrote (measured:
    # 1.07 MB resident for 1.06 MB), and copying it cost fresh pages: each
    # render at 1,000 namespaces took 2,800 page faults, 5 ms of system time.
    out = orjson.dumps(obj)
    return out if len(out) >= _COPY_MAX else bytes(memoryview(out))


def _fragment(obj: Any) -> Any:
    return orjson.Fragment(_json(obj))


# Where a namespace's kept JSON (or the pairs') goes in the state's frame.
_SLOT = orjson.Fragment(b"\0")


# (place in its list, record, what of other links it shows, its JSON)
_Entry = tuple[Any, Any, object, Any]


def _first(e: _Entry) -> Any:
    return e[0]


def _memo_key(record: object) -> object:
    # A link's JSON may be kept across a new record for the same link
    # (a counter refresh); other records' only while they are the same object.
    return ("link", record.index) if isinstance(record, Link) else id(record)


def _record_alike(a: object, b: object) -> bool:
    return a is b or (isinstance(b, Link) and _link_alike(a, b))


@dataclass(frozen=True, slots=True)
class _Kind:
    """How one of a namespace's lists is ordered and made, and (links) each record's refs."""

    order: Callable[[Any], Any]
    make: Callable[[Any], dict[str, Any]]
    deps: Mapping[int, object] | None = None  # link index -> link_refs (links only)


@dataclass(frozen=True, slots=True)
class _Frame:
    """The last state document's parts, and where each namespace's JSON sits among them."""

    refs_version: int  # the model's refs_version it was made at
    parts: list[bytes]  # frame bytes and namespaces' JSON, alternating (never changed)
    slots: dict[int, int]  # inode -> index of its JSON in ``parts``
    first: str  # the first namespace's name (it is in the first part)


@dataclass(frozen=True, slots=True)
class _NsMemo:
    """A namespace's JSON and what it was made from."""

    ns: Namespace
    head: dict[str, Any]  # namespace_head(ns)
    names: tuple[tuple[int, str], ...]  # (index, name) of each link
    refs: tuple[tuple[object, object], ...]  # link_refs of each link, in ns.links order
    refs_version: int  # the model's refs_version ``names`` and ``refs`` were taken at
    lists: tuple[tuple[object, ...], ...]  # the records of each of _SECTIONS, as held
    # Each list's JSON and its entries in order (big namespaces only).
    sections: tuple[tuple[Any, list[_Entry]], ...] | None
    json: bytes  # the namespace's JSON
