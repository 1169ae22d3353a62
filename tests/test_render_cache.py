"""Rendered documents are made once per model version (/metrics once per max age) and gzipped on request."""

from __future__ import annotations

import gzip
import http.client
import json
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nswatch.http import (
    Api,
    HttpServer,
    Limits,
    Renderer,
    Response,
    Router,
    accepts_gzip,
    encoded,
)
from nswatch.model import (
    Address,
    AddressDel,
    AddressNew,
    Event,
    Link,
    LinkDel,
    LinkNew,
    LinkStats,
    Model,
    Namespace,
    NamespaceGone,
    NamespaceSeen,
    Owner,
    Route,
    RouteDel,
    RouteNew,
    Rule,
    RuleDel,
    RuleNew,
    StatsUpdate,
    Synced,
)
from nswatch.render_cache import (
    AgeCache,
    Chunks,
    Document,
    StateRenderer,
    VersionCache,
    json_bytes,
)
from nswatch.state import LINK_SHOWN, link_json, state_json
from tests.bench.bench_metrics import HOST, synthetic


def _model() -> Model:
    m = Model()
    m.apply(NamespaceSeen(1, ("host",), is_host=True))
    m.apply(NamespaceSeen(2, ("lab-1", "alias")))
    m.apply(LinkNew(2, Link(index=1, name="lo", kind="loopback", admin_up=True)))
    for i in range(2, 60):
        m.apply(LinkNew(2, Link(index=i, name=f"veth{i}", kind="veth", mtu=1500)))
    m.apply(Synced(1))
    m.apply(Synced(2))
    return m


@dataclass
class Counting:
    """A daemon stand-in: the model's view, and how often the metrics renderer ran."""

    model: Model = field(default_factory=_model)
    lock: threading.Lock = field(default_factory=threading.Lock)
    metrics_calls: int = 0

    def view(self) -> Model:
        with self.lock:
            return self.model.copy()

    def metrics(self, accept: str | None) -> tuple[bytes, str]:
        with self.lock:
            self.metrics_calls += 1
            n = self.metrics_calls
        return (b"# metrics\n" + b"nswatch_x 1\n" * 2000 + f"calls {n}\n".encode(), "text/plain")

    def change(self) -> None:
        with self.lock:
            link = Link(index=5, name="veth5", kind="veth", mtu=9000)
            self.model.apply(LinkNew(2, link))


@pytest.fixture
def daemon() -> Counting:
    return Counting()


@pytest.fixture
def server(daemon: Counting) -> Iterator[HttpServer]:
    api = Api(view=daemon.view, alive=lambda: True, ready=lambda: True, metrics=daemon.metrics)
    srv = HttpServer(("127.0.0.1", 0), api, limits=Limits(metrics_max_age=60))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def fetch(
    srv: HttpServer, path: str, method: str = "GET", encoding: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        headers = {"Accept-Encoding": encoding} if encoding is not None else {}
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_state_is_rendered_once_per_model_version(server: HttpServer, daemon: Counting) -> None:
    """Twenty requests for one model version render the state once; a change renders it once more."""
    for _ in range(20):
        assert fetch(server, "/api/v1/state")[0] == 200
    assert server.router.state_cache.made == 1
    daemon.change()
    _, _, body = fetch(server, "/api/v1/state")
    assert json.loads(body)["namespaces"]["lab-1"]["links"][4]["mtu"] == 9000
    for _ in range(5):
        fetch(server, "/api/v1/state")
    assert server.router.state_cache.made == 2


def test_a_current_document_is_answered_without_a_render_thread(
    daemon: Counting, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a version's state, namespace and /metrics documents are made, their readers are
    answered on the HTTP loop, not sent to a render thread and back; after a change the
    next reader gets the new document, never the one made before it."""
    renders: list[str] = []
    real = Renderer._answer

    def counted(self: Renderer, path: str, accept: str | None, gzip: bool) -> Response:
        renders.append(path)
        return real(self, path, accept, gzip)

    monkeypatch.setattr(Renderer, "_answer", counted)
    api = Api(
        view=daemon.view,
        alive=lambda: True,
        ready=lambda: True,
        metrics=daemon.metrics,
        shown_version=lambda: daemon.model.shown_version,
    )
    srv = HttpServer(("127.0.0.1", 0), api, limits=Limits(metrics_max_age=60))
    srv.start()
    paths = ("/api/v1/state", "/api/v1/namespaces/lab-1", "/metrics")
    try:
        first = {p: fetch(srv, p)[2] for p in paths}
        for _ in range(5):
            for p in paths:
                assert fetch(srv, p)[2] == first[p]
        assert renders == list(paths)
        daemon.change()
        _, _, body = fetch(srv, "/api/v1/state")
        assert json.loads(body)["namespaces"]["lab-1"]["links"][4]["mtu"] == 9000
        _, _, body = fetch(srv, "/api/v1/namespaces/lab-1")
        assert json.loads(body)["links"][4]["mtu"] == 9000
        assert renders == [*paths, *paths[:2]]
    finally:
        srv.stop()


def test_conditional_gets_of_the_state_and_a_namespace(daemon: Counting) -> None:
    """The state and namespace documents carry an entity tag per model version and form; a
    client that sends it back (If-None-Match, weak or in a list, or *) gets a 304 with no
    body, for the state without a render, until the model changes; other paths carry none."""
    api = Api(
        view=daemon.view,
        alive=lambda: True,
        ready=lambda: True,
        shown_version=lambda: daemon.model.shown_version,
    )
    srv = HttpServer(("127.0.0.1", 0), api)
    srv.start()

    def get(
        path: str, held: str | None = None, gzip: bool = False, method: str = "GET"
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(*srv.address, timeout=10)
        try:
            headers = {"If-None-Match": held} if held is not None else {}
            if gzip:
                headers["Accept-Encoding"] = "gzip"
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    try:
        status, headers, _ = get("/api/v1/state")
        tag = headers["etag"]
        assert status == 200 and tag.startswith('"') and headers["vary"] == "Accept-Encoding"
        for held in (tag, f"W/{tag}", f'"other", {tag}', "*"):
            status, headers, body = get("/api/v1/state", held)
            assert (status, body, headers["etag"]) == (304, b"", tag), held
            assert "content-length" not in headers and "content-type" not in headers
        assert get("/api/v1/state", tag, method="HEAD")[0] == 304
        assert srv.router.state_cache.made == 1  # the 304s rendered nothing
        zipped = get("/api/v1/state", gzip=True)[1]["etag"]
        assert zipped != tag
        assert get("/api/v1/state", tag, gzip=True)[0] == 200
        assert get("/api/v1/state", zipped, gzip=True)[0] == 304
        status, headers, _ = get("/api/v1/namespaces/lab-1")
        ns_tag = headers["etag"]
        assert status == 200 and get("/api/v1/namespaces/lab-1", ns_tag)[0] == 304
        daemon.change()
        status, headers, body = get("/api/v1/state", tag)
        assert status == 200 and headers["etag"] not in (tag, zipped) and body
        assert get("/api/v1/namespaces/lab-1", ns_tag)[0] == 200
        status, headers, _ = get("/healthz", "*")
        assert status == 200 and "etag" not in headers
    finally:
        srv.stop()


def test_namespace_documents_are_cached_per_version(server: HttpServer, daemon: Counting) -> None:
    """A namespace document is made once per version and name; a change shows at once."""
    for _ in range(10):
        assert fetch(server, "/api/v1/namespaces/lab-1")[0] == 200
    assert server.router.namespace_cache.made == 1
    daemon.change()
    _, _, body = fetch(server, "/api/v1/namespaces/lab-1")
    assert json.loads(body)["links"][4]["mtu"] == 9000
    assert fetch(server, "/api/v1/namespaces/nope")[0] == 404


def test_metrics_are_reused_within_max_age(server: HttpServer, daemon: Counting) -> None:
    """Scrapes within the max age get the one render's body; the renderer ran once."""
    bodies = {fetch(server, "/metrics")[2] for _ in range(10)}
    assert len(bodies) == 1 and daemon.metrics_calls == 1


def test_metrics_max_age_zero_renders_every_scrape() -> None:
    """With a max age of 0 every scrape renders afresh."""
    d = Counting()
    api = Api(view=d.view, alive=lambda: True, ready=lambda: True, metrics=d.metrics)
    srv = HttpServer(("127.0.0.1", 0), api, limits=Limits(metrics_max_age=0))
    srv.start()
    try:
        for _ in range(3):
            fetch(srv, "/metrics")
    finally:
        srv.stop()
    assert d.metrics_calls == 3


@pytest.mark.parametrize("path", ["/api/v1/state", "/metrics"])
def test_gzip_when_accepted(server: HttpServer, path: str) -> None:
    """With Accept-Encoding: gzip the body is gzip of the plain one, with Content-Encoding and Vary."""
    status, plain_h, plain = fetch(server, path)
    assert status == 200
    assert "content-encoding" not in plain_h
    assert plain_h["vary"] == "Accept-Encoding"
    status, gz_h, gz = fetch(server, path, encoding="gzip, deflate")
    assert status == 200
    assert gz_h["content-encoding"] == "gzip"
    assert gz_h["vary"] == "Accept-Encoding"
    assert gz_h["content-type"] == plain_h["content-type"]
    assert int(gz_h["content-length"]) == len(gz) < len(plain)
    assert gzip.decompress(gz) == plain


@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_head_matches_get(server: HttpServer, encoding: str | None) -> None:
    """HEAD gets GET's status and headers (length and encoding included) and no body."""
    _, get_h, _ = fetch(server, "/api/v1/state", encoding=encoding)
    status, head_h, body = fetch(server, "/api/v1/state", "HEAD", encoding=encoding)
    assert status == 200 and body == b""
    for name in ("content-length", "content-type", "vary"):
        assert head_h[name] == get_h[name]
    assert head_h.get("content-encoding") == get_h.get("content-encoding")


def test_gzip_refused_with_q_zero(server: HttpServer) -> None:
    """gzip;q=0 means not gzip, even with a wildcard."""
    _, headers, _ = fetch(server, "/api/v1/state", encoding="gzip;q=0, *;q=1")
    assert "content-encoding" not in headers


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),
        ("", False),
        ("gzip", True),
        ("GZIP", True),
        ("deflate, gzip;q=0.5", True),
        ("x-gzip", True),
        ("gzip;q=0", False),
        ("gzip; q=0.000", False),
        ("*", True),
        ("*;q=0", False),
        ("br, deflate", False),
        ("gzip;q=bogus", False),
        ("identity", False),
    ],
)
def test_accepts_gzip(header: str | None, expected: bool) -> None:
    """Accept-Encoding is read as RFC 9110 says: tokens, q-values, the wildcard."""
    assert accepts_gzip(header) is expected


def test_document_gzips_once() -> None:
    """The compressed form is made on first demand and then reused (the same object)."""
    doc = Document(b"x" * 10000, "text/plain")
    first = doc.gzipped()
    assert doc.gzipped() is first
    assert gzip.decompress(first) == doc.body


def test_document_in_parts_gzips_without_joining_them() -> None:
    """A document made in parts (a scrape, one per family) is gzipped part by part: a gzip
    client never costs the joined body, which is made only when an identity client asks."""
    parts = [bytes([65 + i % 26]) * 1_000_000 for i in range(8)]
    doc = Document(parts, "text/plain")
    tracemalloc.start()
    try:
        gz = doc.gzipped()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # 8 MB of parts, never held joined
    assert gzip.decompress(gz) == b"".join(parts)
    assert doc.body == b"".join(parts) and doc.gzipped() is gz
    # Joined first, then gzipped: the same bytes either way.
    other = Document(parts, "text/plain")
    assert other.body == doc.body and other.gzipped() == gz


def test_document_compressed_as_made_equals_the_one_gzipped_later() -> None:
    """Parts compressed as they are taken give the same gzip bytes as parts kept and gzipped
    later, and an identity client still gets the whole body (inflated)."""
    parts = [bytes([65 + i % 26]) * 100_000 for i in range(8)]
    taken: list[int] = []

    def made() -> Iterator[bytes]:
        for i, p in enumerate(parts):
            taken.append(i)
            yield p

    doc = Document(made(), "text/plain", compress=True)
    assert taken == list(range(8))
    assert doc.gzipped() == Document(parts, "text/plain").gzipped()
    assert doc.body == b"".join(parts)


def test_version_cache_answers_older_readers_with_the_newest_document() -> None:
    """A reader whose view is older than the newest document gets that document, made
    once: rendering each older view afresh made 16 state readers render ~40 times a
    second during a counter refresh, and undid the renderer's memo each time."""
    cache = VersionCache()
    new = cache.get(5, "k", lambda: Document(b"v5", "t"))
    assert cache.get(4, "k", lambda: Document(b"v4", "t")) is new
    assert cache.made == 1
    # A document the newest version has not made yet is made for the older view, not kept.
    assert cache.get(4, "other", lambda: Document(b"o4", "t")).body == b"o4"
    assert cache.get(5, "k", lambda: Document(b"again", "t")) is new
    assert cache.get(6, "k", lambda: Document(b"v6", "t")).body == b"v6"


def test_version_cache_is_bounded() -> None:
    """One version's documents never exceed max_entries."""
    cache = VersionCache(max_entries=3)
    for i in range(10):
        cache.get(1, i, lambda i=i: Document(str(i).encode(), "t"))  # type: ignore[misc]
        assert len(cache._docs) <= 3


def test_age_cache_expires_and_is_bounded() -> None:
    """A document is reused until max_age has passed; keys from headers cannot grow the cache."""
    now = [0.0]
    cache = AgeCache(1.0, max_entries=2, clock=lambda: now[0])
    a = cache.get("a", lambda: Document(b"a1", "t"))
    now[0] = 0.9
    assert cache.get("a", lambda: Document(b"a2", "t")) is a
    now[0] = 1.0
    assert cache.get("a", lambda: Document(b"a3", "t")).body == b"a3"
    for i in range(10):
        cache.get(f"k{i}", lambda: Document(b"", "t"))
        assert len(cache._docs) <= 2


def test_age_cache_reuses_a_slow_document_longer() -> None:
    """A document whose render took 2 s is reused for 8 s (renders at most 20 % of the time); a quick one for max_age."""
    now = [0.0]

    def make(took: float, body: bytes) -> Callable[[], Document]:
        def slow() -> Document:
            now[0] += took
            return Document(body, "t")

        return slow

    cache = AgeCache(1.0, clock=lambda: now[0], busy_share=0.2)
    first = cache.get("a", make(2.0, b"1"))
    now[0] = 2.0 + 7.9
    assert cache.get("a", make(2.0, b"2")) is first
    now[0] = 2.0 + 8.0
    second = cache.get("a", make(0.01, b"3"))
    assert second.body == b"3"
    now[0] += 0.99
    assert cache.get("a", make(0.01, b"4")) is second
    now[0] += 0.01
    assert cache.get("a", make(0.01, b"5")).body == b"5"
    with pytest.raises(ValueError):
        AgeCache(1.0, busy_share=0)


def _pair_model() -> Model:
    """Two namespaces joined by a veth pair, with addresses and a route on each end."""
    return synthetic(3)


def _same_as_plain(renderer: StateRenderer, model: Model) -> None:
    assert renderer.render(model) == json_bytes(state_json(model))


@pytest.mark.parametrize("record_memo_min", [0, 10_000])
def test_state_renderer_matches_state_json_through_changes(record_memo_min: int) -> None:
    """The cached render (records kept or whole namespaces only) equals the plain one after renames of a link, of its veth peer, removals and additions."""
    live = _pair_model()
    renderer = StateRenderer(record_memo_min)
    view = live.snapshot()
    _same_as_plain(renderer, view)
    steps: list[Event] = [
        # The host end renamed: the namespace end's "peer" shows the new name.
        LinkNew(HOST, replace(live.namespaces[HOST].links[100], name="renamed")),
        # eth0 renamed inside a namespace: its addresses and routes show it.
        LinkNew(1001, replace(live.namespaces[1001].links[2], name="eth9")),
        AddressDel(1002, next(iter(live.namespaces[1002].addresses.values()))),
        AddressNew(1002, Address(2, "inet", "198.18.200.2", 24)),
        RouteDel(1000, next(iter(live.namespaces[1000].routes.values()))),
        LinkDel(HOST, 102),
    ]
    for ev in steps:
        live.apply(ev)
        view = live.snapshot(view)
        _same_as_plain(renderer, view)
    peer = orjson.loads(renderer.render(view))["namespaces"]["nswB0"]["links"][1]["peer"]
    assert peer["name"] == "renamed"


def test_a_new_state_version_copies_no_namespace_json() -> None:
    """The state after one namespace changed holds every other namespace's JSON as the very
    bytes the previous one held, and making it allocates a small part of its size (it was
    serialised whole for every version: 6.7 MB copied at 1,000 namespaces, ten times a
    second while links flap)."""
    live = synthetic(300)
    renderer = StateRenderer()
    view = live.snapshot()
    first = renderer.render_chunks(view)
    live.apply(AddressNew(1007, Address(2, "inet", "198.18.201.2", 24)))
    view = live.snapshot(view)
    tracemalloc.start()
    try:
        second = renderer.render_chunks(view)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bytes(second) == json_bytes(state_json(view))
    assert peak < len(second) / 4
    before = {id(p) for p in first.parts if len(p) > 500}
    kept = [p for p in second.parts if id(p) in before]
    assert len(kept) == len(before) - 1  # all but the changed namespace's


def test_chunks_cut_into_pieces_of_about_the_size_asked() -> None:
    """A kept body handed out in pieces (the TLS path) is the whole body in order, each piece
    at least the size asked but the last, and under twice it."""
    parts = [b"a" * 3, b"", b"b" * 10, b"c", b"d" * 25]
    chunks = Chunks(parts)
    assert len(chunks) == 39 and chunks == b"".join(parts) and b"".join(parts) == chunks
    for size in (1, 4, 8, 100):
        pieces = list(chunks.pieces(size))
        assert b"".join(pieces) == bytes(chunks)
        assert all(size <= len(p) < 2 * size for p in pieces[:-1])
        assert 0 < len(pieces[-1]) < 2 * size


@pytest.mark.parametrize(("record_memo_min", "afresh"), [(0, 2), (10_000, 1)])
def test_state_renderer_serialises_only_what_changed(record_memo_min: int, afresh: int) -> None:
    """After one address is added in one namespace, only that namespace (and with records kept, that address) is serialised again."""
    live = synthetic(50)
    renderer = StateRenderer(record_memo_min)
    view = live.snapshot()
    renderer.render(view)
    first = renderer.serialised
    renderer.render(view)
    assert renderer.serialised == first
    live.apply(AddressNew(1007, Address(2, "inet", "198.18.201.2", 24)))
    view = live.snapshot(view)
    renderer.render(view)
    assert renderer.serialised - first == afresh


def test_state_renderer_looks_again_only_where_peers_may_have_moved() -> None:
    """A link going down, or a counter refresh, looks no peer up again (no name or
    pointer moved); a rename makes every namespace look again (its peer may be it)."""
    live = synthetic(50)
    renderer = StateRenderer()
    view = live.snapshot()
    renderer.render(view)
    before = renderer.inspected
    live.apply(LinkNew(HOST, replace(live.namespaces[HOST].links[107], admin_up=False)))
    live.apply(StatsUpdate(1003, ((2, LinkStats(5)),)))
    view = live.snapshot(view)
    _same_as_plain(renderer, view)
    assert renderer.inspected - before == 0
    live.apply(LinkNew(HOST, replace(live.namespaces[HOST].links[107], name="vh7-renamed")))
    view = live.snapshot(view)
    _same_as_plain(renderer, view)
    assert renderer.inspected - before == 51


def test_a_version_that_changed_one_namespace_looks_at_that_namespace_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A link set down among 51 namespaces makes the renderer look at the two namespaces
    that changed, not walk all 51 (it did, for each version: 1.3 ms at 1,000); a new
    namespace, which moves every slot, makes it walk them all again."""
    live = synthetic(50)
    renderer = StateRenderer()
    looked: list[int] = []
    real = renderer._namespace

    def counted(model: Model, ns: Namespace, old: Any) -> Any:
        looked.append(ns.inode)
        return real(model, ns, old)

    monkeypatch.setattr(renderer, "_namespace", counted)
    view = live.snapshot()
    _same_as_plain(renderer, view)
    looked.clear()
    live.apply(LinkNew(HOST, replace(live.namespaces[HOST].links[107], admin_up=False)))
    live.apply(LinkNew(1007, replace(live.namespaces[1007].links[2], carrier=False)))
    view = live.snapshot(view)
    _same_as_plain(renderer, view)
    assert sorted(looked) == [HOST, 1007]
    looked.clear()
    live.apply(NamespaceSeen(999, ("aaa-first",)))
    view = live.snapshot(view)
    _same_as_plain(renderer, view)
    assert len(looked) == 52


def test_state_renderer_keeps_the_lists_a_change_left_alone() -> None:
    """In a big namespace, one link set down re-serialises that link and the namespace
    only (its addresses and routes lists are kept); a counter refresh of every link
    re-serialises nothing."""
    live = synthetic(50)
    renderer = StateRenderer(record_memo_min=0)
    view = live.snapshot()
    renderer.render(view)
    before = renderer.serialised
    live.apply(LinkNew(HOST, replace(live.namespaces[HOST].links[107], admin_up=False)))
    view = live.snapshot(view)
    _same_as_plain(renderer, view)
    assert renderer.serialised - before == 2
    before = renderer.serialised
    for inode, ns in live.namespaces.items():
        live.apply(StatsUpdate(inode, tuple((i, LinkStats(9)) for i in ns.links)))
    view = live.snapshot(view)
    _same_as_plain(renderer, view)
    assert renderer.serialised == before


def test_a_link_set_down_after_a_counter_refresh_is_put_in_its_place() -> None:
    """In a big namespace, a link set down is patched into the list in place; after a
    counter refresh (new link objects that show the same, the list's JSON kept), the
    next link set down still gives the plain render and re-serialises only that link and
    its namespace (the kept entries hold the records from before the refresh)."""
    live = synthetic(50)
    renderer = StateRenderer(record_memo_min=0)
    view = live.snapshot()
    renderer.render(view)
    for index in (107, 120):
        for inode, ns in live.namespaces.items():
            live.apply(StatsUpdate(inode, tuple((i, LinkStats(index)) for i in ns.links)))
        view = live.snapshot(view)
        _same_as_plain(renderer, view)
        before = renderer.serialised
        link = live.namespaces[HOST].links[index]
        live.apply(LinkNew(HOST, replace(link, admin_up=False, oper_state="DOWN")))
        view = live.snapshot(view)
        _same_as_plain(renderer, view)
        live.apply(LinkNew(HOST, replace(link, admin_up=True)))
        view = live.snapshot(view)
        _same_as_plain(renderer, view)
        assert renderer.serialised - before == 4


def test_link_shown_names_every_field_link_json_shows() -> None:
    """Two links that differ in a field LINK_SHOWN leaves out give the same JSON, and
    in any field it names give different JSON (so the renderer may keep a link's JSON
    across a counter refresh, and only then)."""
    live = synthetic(1)
    ns = live.namespaces[1000]
    # A veth with a lower device too, so that every field has a say.
    link = replace(ns.links[2], parent_index=3, parent_netnsid=0)
    shown = set(LINK_SHOWN.__reduce__()[1])
    for f in fields(Link):
        value = getattr(link, f.name)
        other: object
        if f.name == "index":
            continue  # the namespace would hold no such link
        if isinstance(value, bool) or (value is None and f.name in ("admin_up", "carrier")):
            other = not value
        elif isinstance(value, int):
            other = value + 7
        elif f.name == "stats":
            other = LinkStats(42)
        else:
            other = f"x-{f.name}" if f.name not in ("master",) else 1
        changed = replace(link, **cast(dict[str, Any], {f.name: other}))
        same = link_json(live, ns, changed) == link_json(live, ns, link)
        assert same == (f.name not in shown), f.name


_NSES = st.integers(1000, 1005)


@st.composite
def _events(draw: st.DrawFn, live: Model) -> Event:
    """One event of any kind a namespace's JSON may or may not show."""
    kind = draw(
        st.sampled_from(
            [
                "rename",
                "flip",
                "carrier",
                "stats",
                "del",
                "addr",
                "lifetime",
                "addr-del",
                "route",
                "route-del",
                "rule",
                "rule-del",
                "seen",
                "synced",
                "gone",
                "host",
            ]
        )
    )
    inode = HOST if kind == "host" else draw(_NSES)
    ns = live.namespaces.get(inode)
    if kind == "seen":
        # A namespace (re)appears, possibly renamed or held by another process.
        owner = draw(st.none() | st.builds(Owner, st.integers(1, 3), st.sampled_from(["a", "b"])))
        return NamespaceSeen(
            inode, (draw(st.sampled_from([f"nswB{inode - 1000}", "other"])),), owner=owner
        )
    if ns is None or not ns.links or kind == "gone":
        return NamespaceGone(draw(_NSES))
    link = draw(st.sampled_from(sorted(ns.links.values(), key=lambda x: x.index)))
    addr = Address(link.index, "inet", f"198.18.9.{draw(st.integers(1, 9))}", 32)
    route = Route(
        254, "inet", "unicast", f"198.18.{draw(st.integers(10, 12))}.0/24", dev=link.index
    )
    rule = Rule("inet", draw(st.integers(100, 102)), "lookup", table=254)
    match kind:
        case "rename" | "host":
            return LinkNew(inode, replace(link, name=f"n{draw(st.integers(0, 99))}"))
        case "flip":
            return LinkNew(inode, replace(link, admin_up=not link.admin_up))
        case "carrier":
            # Fields left out of a link's equality that its JSON still shows.
            return LinkNew(
                inode,
                replace(
                    link,
                    carrier_changes=link.carrier_changes + 1,
                    carrier_up_count=link.carrier_up_count + 1,
                ),
            )
        case "stats":
            return StatsUpdate(inode, ((link.index, LinkStats(draw(st.integers(0, 9)))),))
        case "del":
            return LinkDel(inode, link.index)
        case "lifetime":
            # The same key with new lifetimes: equal to the old record, not the same JSON.
            return AddressNew(
                inode,
                replace(
                    addr, valid_lft=draw(st.integers(1, 9)), preferred_lft=draw(st.integers(1, 9))
                ),
            )
        case "addr-del":
            return AddressDel(inode, addr)
        case "route":
            return RouteNew(inode, route)
        case "route-del":
            return RouteDel(inode, route)
        case "rule":
            return RuleNew(inode, rule)
        case "rule-del":
            return RuleDel(inode, rule)
        case "synced":
            return Synced(inode)
    return AddressNew(inode, addr)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_state_renderer_equals_the_plain_render_whatever_happens(data: st.DataObject) -> None:
    """Through any sequence of renames, flips, carrier counts, counter updates, removals,
    addresses (and their lifetimes), routes, rules, namespaces renamed, re-held and going,
    the cached render equals ``state_json`` of the same view."""
    live = synthetic(6)
    renderer = StateRenderer(
        record_memo_min=data.draw(st.sampled_from([0, 10_000])),
        insert_max=data.draw(st.sampled_from([0, 16])),
    )
    view = live.snapshot()
    _same_as_plain(renderer, view)
    for _ in range(data.draw(st.integers(1, 20))):
        live.apply(data.draw(_events(live)))
        view = live.snapshot(view)
        _same_as_plain(renderer, view)


def test_a_counter_refresh_makes_no_new_state_document(daemon: Counting) -> None:
    """The state and namespace documents show no counters: a refresh round (a thousand
    StatsUpdates every stats_interval at 1,000 namespaces) is served from the document
    already made; a link set down makes a new one."""
    api = Api(view=daemon.view, alive=lambda: True, ready=lambda: True)
    router = Router(api)
    paths = ("/api/v1/state", "/api/v1/namespaces/lab-1")
    first = [encoded(router.route("GET", p, None), False).body for p in paths]
    with daemon.lock:
        ns = daemon.model.namespaces[2]
        stats = tuple((i, LinkStats(rx_bytes=i + 1)) for i in ns.links)
        daemon.model.apply(StatsUpdate(2, stats))
    assert [encoded(router.route("GET", p, None), False).body for p in paths] == first
    assert router.state_cache.made == 1 and router.namespace_cache.made == 1
    daemon.change()
    assert encoded(router.route("GET", paths[0], None), False).body != first[0]
    assert router.state_cache.made == 2


def test_idle_caches_are_dropped(daemon: Counting) -> None:
    """With no reader for the idle time, every cached document goes; the next reader gets a fresh render."""
    api = Api(view=daemon.view, alive=lambda: True, ready=lambda: True, metrics=daemon.metrics)
    router = Router(api, Limits(metrics_max_age=60))
    for path in ("/api/v1/state", "/api/v1/namespaces/lab-1", "/metrics"):
        assert router.route("GET", path, None).status == 200
    assert not router.release_idle(60)  # read just now
    assert router.release_idle(0)
    assert not router.release_idle(0)  # nothing held any more
    assert router.state_cache._docs == {} and router.namespace_cache._docs == {}
    assert router.metrics_cache._docs == {} and router.state_renderer._memo == {}
    router.route("GET", "/api/v1/state", None)
    router.route("GET", "/metrics", None)
    assert router.state_cache.made == 2 and daemon.metrics_calls == 2


def test_idle_release_waits_for_a_running_render(daemon: Counting) -> None:
    """A render holding the cache is not disturbed: the release says no and leaves the documents."""
    api = Api(view=daemon.view, alive=lambda: True, ready=lambda: True, metrics=daemon.metrics)
    router = Router(api)
    router.route("GET", "/api/v1/state", None)
    with router.state_cache._lock:
        assert not router.release_idle(0)
    assert router.state_cache._docs
