"""The HTTP API: state, health, readiness and (injected) metrics.

One asyncio loop on its own thread owns every connection, so an idle or
slow client costs a socket and a few objects, never a thread. Requests are
parsed by h11. Against hostile clients: the request head has a deadline
(not a per-read timeout a byte every few seconds can stretch forever); at
the connection cap a newcomer displaces the longest-idle keep-alive
connection, then the slowest unfinished request, then the slowest reader,
so a scraper or a health check always gets in; the bytes queued to slow
readers have a budget. Large documents (state JSON, /metrics) render on
worker threads so the loop keeps answering everyone else, and handlers
never touch the live model: they take :meth:`Daemon.view`, a copy made
under the lock. A long-lived streaming response fits the same shape: a
connection in the ``write`` phase whose task feeds h11 ``Data`` events.

Bodies over 1 MiB over plain TCP (the state at scale) are sent by a child
process with a GIL of its own (:mod:`nswatch.sender`); TLS and basic auth
come from the web config (:mod:`nswatch.webconfig`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import ipaddress
import os
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from http import HTTPStatus
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import h11
import structlog

from nswatch import heap
from nswatch.model import Model
from nswatch.render_cache import (
    IOV_MAX,
    AgeCache,
    Body,
    Chunks,
    Document,
    StateRenderer,
    VersionCache,
    as_chunks,
    json_bytes,
)
from nswatch.sender import BodySender, SharedBody
from nswatch.sender_child import SERVED, KeepLimits, imf_fixdate
from nswatch.state import namespace_json
from nswatch.stream import StreamHub
from nswatch.topology import build as build_topology
from nswatch.webconfig import BasicAuth, TlsSettings, WebConfig

MetricsRenderer = Callable[[str | None], tuple[bytes | Iterable[bytes], str]]
"""Given the Accept header, return (body, content type) for /metrics."""

T = TypeVar("T")

SERVER_NAME = "nswatch"  # no versions: they only help an attacker pick exploits
_NS_PREFIX = "/api/v1/namespaces/"
EVENTS_PATH = "/api/v1/events"
TOPOLOGY_PATH = "/api/v1/topology"
# The page and its assets, from the package: nothing is fetched from elsewhere.
_PAGE = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/app.css": ("app.css", "text/css; charset=utf-8"),
}
_PAGE_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    ("Cache-Control", "no-cache"),
)
# A request line h11 would accept; anything else on the first line (such as
# HTTP/0.9's "GET /path") is answered 400 at once instead of waiting for a
# blank line that never comes.
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ \S+ HTTP/\d\.\d")

log = structlog.get_logger("nswatch.http")

# The threads that serve readers (the HTTP loop, renders, password checks)
# run this much nicer than the event loop, which follows the kernel: at
# 1,000 namespaces, 16 + 4 readers pulling documents as fast as they can
# kept the machine's two cores busy, and a link change waited for a core
# (tests/bench/bench_readers.py, 2026-12-05: link change p99 15.9 and
# 15.7 ms at nice 10 against 19.0-24.6 ms without, the state GET alike).
SERVING_NICE = 10


class _Nicer:
    """Makes its caller :data:`SERVING_NICE` nicer than its maker's thread (says once if not)."""

    def __init__(self) -> None:
        # On Linux a thread's nice value is its own (``who`` 0: the calling
        # thread), and a new thread starts with its creator's.
        self.nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + SERVING_NICE)
        self._told = threading.Event()

    def __call__(self) -> None:
        try:
            if os.getpriority(os.PRIO_PROCESS, 0) < self.nice:
                os.setpriority(os.PRIO_PROCESS, 0, self.nice)
        except OSError as e:
            # A seccomp filter without setpriority (systemd's @resources) says EPERM.
            if not self._told.is_set():
                self._told.set()
                log.warning(
                    "serving_priority_unchanged",
                    errno=errno.errorcode.get(e.errno or 0, e.errno),
                    hint="readers' threads compete with the event loop at equal priority",
                )


class Api:
    """What the HTTP server asks of the daemon."""

    def __init__(
        self,
        view: Callable[[], Model],
        alive: Callable[[], bool],
        ready: Callable[[], bool],
        metrics: MetricsRenderer | None = None,
        unwatched: Callable[[], dict[str, str]] = dict,
        events: StreamHub | None = None,
        shown_version: Callable[[], int] | None = None,
    ) -> None:
        self.view = view
        # The live model's shown version, read without its lock: a document
        # cached for that version is answered on the HTTP loop at once.
        self.shown_version = shown_version
        self.alive = alive
        self.ready = ready
        self.metrics = metrics
        # Namespaces that exist but cannot be watched (name -> reason): while
        # there are any, the picture is incomplete and /readyz says so.
        self.unwatched = unwatched
        self.events = events


@dataclass(frozen=True)
class Limits:
    """How much the server gives any one client, and all of them together."""

    max_connections: int = 512
    # From accept (or a keep-alive request's first byte) to the end of the request.
    head_timeout: float = 10.0
    idle_timeout: float = 60.0  # a keep-alive connection with no request under way
    write_timeout: float = 30.0  # to hand one whole response to the client
    max_head: int = 16 * 1024
    max_body: int = 64 * 1024  # a body (pointless on GET) is read and dropped up to this
    output_budget: int = 64 * 1024 * 1024  # response bytes queued to all slow readers together
    render_workers: int = 2
    max_pending_renders: int = 16  # distinct documents waiting for a worker thread, per lane
    max_pending_auth: int = 64  # password checks waiting for bcrypt
    # /metrics is made at most once per this many seconds per Accept header
    # (counters and process figures move without the model; see render_cache).
    metrics_max_age: float = 1.0
    # ... and reused long enough that its renders run at most this share of
    # the time (render_cache.AgeCache): scrapers in a loop cannot keep one
    # running, however slow the machine.
    metrics_busy_share: float = 0.2
    # Cached documents are dropped (and the heap trimmed) after this long
    # without a reader: a burst of readers must not leave the daemon fat.
    cache_idle: float = 10.0


@dataclass(frozen=True)
class Response:
    """A complete response; JSON unless said otherwise."""

    status: int
    body: Body
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False
    # A cached document (``body`` is its identity form): sent gzipped to
    # clients that accept it, see :func:`encoded`.
    document: Document | None = None
    # ``body`` in shared memory, for the sender's child (:mod:`nswatch.sender`).
    shared: SharedBody | None = None
    # The entity tag of this representation, quoted (also in ``headers``).
    etag: str | None = None
    # The cached document ``body`` comes from (set by :func:`encoded`).
    source: Document | None = None


_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header's value, made once a second (it shows whole seconds): made per
    response it was 5 % of the HTTP thread's time under 20 looping readers (py-spy)."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, imf_fixdate(now).decode())
    return _date[1]


def json_response(status: int, obj: Any, **kw: Any) -> Response:
    """``obj`` as compact JSON with a trailing newline."""
    return Response(status, json_bytes(obj), **kw)


def document_response(doc: Document) -> Response:
    """A 200 carrying a cached document."""
    # The body is filled in by :func:`encoded`: a gzip client never needs the
    # identity form (which a document in parts only joins on demand).
    return Response(200, b"", doc.content_type, document=doc)


def entity_tag(tag: str, gzip: bool) -> str:
    """The quoted entity tag of a document's form: a strong validator names one
    representation, so the gzip form has its own."""
    return f'"{tag}-gzip"' if gzip else f'"{tag}"'


def none_match(header: str, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (weak comparison, RFC 9110
    13.1.2: ``W/`` is ignored; ``*`` names any current representation)."""
    if header.strip() == "*":
        return True
    tags = (t.strip() for t in header.split(","))
    return etag in (t[2:] if t.startswith("W/") else t for t in tags)


def not_modified(etag: str) -> Response:
    """The 304 for a client that holds the representation ``etag`` names already: the
    validator and Vary (every document with a tag comes gzipped or not), no body."""
    return Response(304, b"", headers=(("ETag", etag), ("Vary", "Accept-Encoding")), etag=etag)


def error_response(status: int, message: str | None = None, **kw: Any) -> Response:
    """The JSON error every garbled or refused request gets."""
    phrase = _phrase(status)
    return Response(status, json_bytes({"error": message or phrase.lower()}), **kw)


def accepts_gzip(header: str | None) -> bool:
    """Whether an Accept-Encoding header allows gzip (RFC 9110 12.5.3; ``q=0`` refuses)."""
    if not header:
        return False
    star: bool | None = None
    for item in header.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        if coding in ("gzip", "x-gzip"):
            return q > 0
        if coding == "*":
            star = q > 0
    return bool(star)


Share = Callable[[Body], SharedBody | None]
"""Puts a body in shared memory for the sender's child, or says None (then it is sent here)."""


def encoded(r: Response, gzip: bool, share: Share | None = None) -> Response:
    """``r`` as sent to a client that does (or does not) accept gzip.

    With ``share``, a document's body big enough for the sender's child
    (over :data:`SEND_HERE_MAX`) is also put in shared memory, once per
    document and form.
    """
    doc = r.document
    if doc is None:
        return r
    # Caches must keep the two forms apart, and HEAD gets the same headers.
    headers = (*r.headers, ("Vary", "Accept-Encoding"))
    if gzip:
        headers = (*headers, ("Content-Encoding", "gzip"))
        body: Body = doc.gzipped()
    else:
        body = doc.body
    etag = None
    if doc.etag is not None:
        etag = entity_tag(doc.etag, gzip)
        headers = (*headers, ("ETag", etag))
    shared = None
    if share is not None and len(body) > SEND_HERE_MAX:
        shared = doc.derived(("shared", gzip), lambda: share(body))
    return replace(
        r, body=body, headers=headers, document=None, shared=shared, etag=etag, source=doc
    )


def encoded_if_made(r: Response, gzip: bool, share: Share | None = None) -> Response | None:
    """:func:`encoded`, if that costs nothing more: the form asked for, and its shared copy,
    already made. Else None."""
    doc = r.document
    if doc is None or not doc.made(gzip):
        return None
    body = doc.gzipped() if gzip else doc.body
    if share is not None and len(body) > SEND_HERE_MAX and not doc.derived_made(("shared", gzip)):
        return None
    return encoded(r, gzip, share)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


class Router:
    """Paths to responses (blocking; the big ones run on a worker thread)."""

    HEAVY = ("/api/v1/state", "/metrics", TOPOLOGY_PATH)

    def __init__(self, api: Api, limits: Limits | None = None) -> None:
        self.api = api
        self._assets: dict[str, bytes] = {}
        # State and namespace documents are made once per model version
        # (the shown one: they show no counters), /metrics once per max age:
        # many readers cost one render.
        self.state_cache = VersionCache()
        self.state_renderer = StateRenderer()
        self.namespace_cache = VersionCache()
        limits = limits or Limits()
        self.metrics_cache = AgeCache(limits.metrics_max_age, busy_share=limits.metrics_busy_share)
        self.last_read = time.monotonic()
        self._held = False  # whether the caches may hold anything
        # In every entity tag: a restarted daemon counts versions from 0 again,
        # and a tag it gave before must not match a different document then.
        self._epoch = secrets.token_hex(4)

    def version_tag(self, version: int) -> str:
        """The entity tag (unquoted, identity form) of the documents of model ``version``."""
        return f"{self._epoch}-{version}"

    def state_etag(self, gzip: bool) -> str | None:
        """The state's entity tag as it would be sent now (None without ``shown_version``):
        a client that holds it is answered 304 without a render."""
        if self.api.shown_version is None:
            return None
        return entity_tag(self.version_tag(self.api.shown_version()), gzip)

    def release_idle(self, idle: float, also: Callable[[], None] = lambda: None) -> bool:
        """Drop every cached document if none was asked for in ``idle`` seconds, and what
        ``also`` lets go, before the heap is trimmed; True if done."""
        if not self._held or time.monotonic() - self.last_read < idle:
            return False
        if not self.forget():
            return False  # a render started meanwhile: next time
        also()
        heap.trim()
        return True

    def forget(self) -> bool:
        """Drop every cached document (and its shared memory); False while a render runs."""
        renderer = self.state_renderer
        if not (
            self.state_cache.drop(renderer.forget)
            and self.namespace_cache.drop()
            and self.metrics_cache.drop()
        ):
            return False
        self._held = False
        return True

    def asset(self, path: str, accept: str | None) -> Response | None:
        """The topology page or one of its files; None when ``path`` is none of them.

        ``/`` is the page for browsers and the list of endpoints for programs.
        """
        found = _PAGE.get(path)
        if found is None or (path == "/" and "text/html" not in (accept or "")):
            return None
        name, ctype = found
        body = self._assets.get(name)
        if body is None:
            body = self._assets[name] = (resources.files("nswatch") / "web" / name).read_bytes()
        return Response(200, body, ctype, headers=_PAGE_HEADERS)

    def endpoints(self) -> list[str]:
        """The paths the server answers."""
        eps = ["/healthz", "/readyz", "/api/v1/state", "/api/v1/namespaces/{name}", "/"]
        eps.append(TOPOLOGY_PATH)
        if self.api.metrics is not None:
            eps.append("/metrics")
        if self.api.events is not None:
            eps.append(EVENTS_PATH)
        return eps

    def streams(self, method: str, path: str) -> bool:
        """Whether the request is answered by a long-lived event stream."""
        return method == "GET" and path == EVENTS_PATH and self.api.events is not None

    def heavy(self, path: str) -> bool:
        """Whether answering may take long enough to hold up other clients."""
        return path in self.HEAVY or path.startswith(_NS_PREFIX)

    def route(self, method: str, path: str, accept: str | None, gzip: bool = False) -> Response:
        """The answer to ``method path``; a handler's bug becomes a 500, never a dead server.

        ``gzip``: the client takes gzip, so a document made for it may be
        made compressed (an identity client later costs an inflate).
        """
        try:
            if method in ("GET", "HEAD"):
                return self._get(path, accept, gzip)
            return self._not_allowed(path)
        except Exception as e:
            body = {"error": "internal error", "detail": type(e).__name__}
            return json_response(500, body, close=True)

    def _get(self, path: str, accept: str | None, gzip: bool) -> Response:
        api = self.api
        if self.heavy(path):
            self.last_read = time.monotonic()
            self._held = True
        if path == "/healthz":
            ok = api.alive()
            return json_response(200 if ok else 503, {"status": "ok" if ok else "stalled"})
        if path == "/readyz":
            unwatched = api.unwatched()
            ok = api.ready() and not unwatched
            status: dict[str, object] = {"ready": ok}
            if unwatched:
                status["unwatched"] = unwatched
            return json_response(200 if ok else 503, status)
        if path == "/api/v1/state":
            model = api.view()
            return document_response(
                self.state_cache.get(
                    model.shown_version,
                    None,
                    lambda: Document(
                        self.state_renderer.render_chunks(model),
                        "application/json",
                        etag=self.version_tag(model.shown_version),
                    ),
                )
            )
        if path.startswith(_NS_PREFIX):
            name = unquote(path[len(_NS_PREFIX) :])
            model = api.view()
            ns = model.get(name)
            if ns is None:
                return json_response(404, {"error": "namespace not found", "netns": name})
            return document_response(
                self.namespace_cache.get(
                    model.shown_version,
                    name,
                    lambda: _json_doc(
                        namespace_json(model, ns), etag=self.version_tag(model.shown_version)
                    ),
                )
            )
        if path == "/metrics" and api.metrics is not None:
            render = api.metrics
            return document_response(
                self.metrics_cache.get(accept, lambda: Document(*render(accept), compress=gzip))
            )
        if path == EVENTS_PATH and api.events is not None:  # HEAD: the headers only
            return Response(200, b"", "text/event-stream")
        if path == TOPOLOGY_PATH:
            return json_response(200, build_topology(api.view()))
        page = self.asset(path, accept)
        if page is not None:
            return page
        if path == "/":
            return json_response(200, {"endpoints": self.endpoints()})
        return json_response(404, {"error": "not found", "path": path})

    def cached(self, path: str, accept: str | None) -> Response | None:
        """A heavy GET's answer if a document for it is made and current, else None.

        Cheap enough for the HTTP loop itself, which then spares such a
        request the trip to a render thread and back (a thread wake-up each
        way, the GIL taken twice more): with this and the sender's child, a
        state GET cost the daemon 237–257 µs of CPU against 420 µs before
        (one client looping on a 100-namespace state, 2026-12-05).
        """
        doc = self.current(path, accept)
        return document_response(doc) if doc is not None else None

    def current(self, path: str, accept: str | None) -> Document | None:
        """The document a heavy GET gets now, if it is made and current, else None."""
        api = self.api
        doc = None
        if path == "/metrics" and api.metrics is not None:
            doc = self.metrics_cache.peek(accept)
        elif api.shown_version is not None and path == "/api/v1/state":
            doc = self.state_cache.peek(api.shown_version(), None)
        elif api.shown_version is not None and path.startswith(_NS_PREFIX):
            doc = self.namespace_cache.peek(api.shown_version(), unquote(path[len(_NS_PREFIX) :]))
        if doc is not None:
            self.last_read = time.monotonic()
        return doc

    def _not_allowed(self, path: str) -> Response:
        if path in self.endpoints() or path.startswith(_NS_PREFIX) or path in _PAGE:
            return Response(
                405, b'{"error":"method not allowed"}\n', headers=(("Allow", "GET, HEAD"),)
            )
        return json_response(404, {"error": "not found", "path": path})


def _json_doc(obj: Any, etag: str | None = None) -> Document:
    return Document(json_bytes(obj), "application/json", etag=etag)


class RateLimiter:
    """The web config's ``rate_limit``: a token bucket over every request (loop thread only)."""

    def __init__(self, interval: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self._interval = interval
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._last = clock()

    def allow(self) -> bool:
        """Take a token if there is one."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) / self._interval)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class TlsContexts:
    """The server's SSL context, rebuilt when a certificate file changes on disk."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self._stamp = settings.stamp()
        self._ctx = settings.context()

    def current(self) -> ssl.SSLContext:
        """The context for a new connection (the old one if the new files are unusable)."""
        try:
            stamp = self.settings.stamp()
        except OSError:
            return self._ctx  # a file is being replaced: keep serving the old certificate
        if stamp != self._stamp:
            self._stamp = stamp  # tried once per change, not on every connection
            try:
                self._ctx = self.settings.context()
            except (OSError, ssl.SSLError) as e:
                log.error("tls_certificate_reload_failed", error=str(e))
            else:
                log.info("tls_certificate_reloaded")
        return self._ctx


class Renderer:
    """Runs the big handlers on worker threads, one render per identical request at a time.

    Requests for the same document while it renders share the result (it is
    at most one render old), so a thousand clients asking for the state cost
    one render, not a queue of a thousand. /metrics has its own thread, so a
    scrape never queues behind state documents. Too many distinct renders
    waiting: 503 at once rather than an ever longer queue.
    """

    def __init__(
        self,
        router: Router,
        workers: int,
        max_pending: int,
        nicer: Callable[[], None] = lambda: None,
        share: Share | None = None,
    ) -> None:
        self.router = router
        self.max_pending = max_pending
        self._share = share
        self._lanes = {
            "metrics": ThreadPoolExecutor(1, "nswatch-http-metrics", initializer=nicer),
            "state": ThreadPoolExecutor(workers, "nswatch-http-render", initializer=nicer),
        }
        self._inflight: dict[tuple[str, str | None, bool], asyncio.Future[Response]] = {}
        self._waiters: dict[tuple[str, str | None, bool], int] = {}
        self._pending = dict.fromkeys(self._lanes, 0)

    def _answer(self, path: str, accept: str | None, gzip: bool) -> Response:
        return encoded(self.router.route("GET", path, accept, gzip), gzip, self._share)

    async def render(self, path: str, accept: str | None, gzip: bool = False) -> Response:
        """The answer to a GET (HEAD alike), made (and compressed) on a worker thread."""
        cached = self.router.cached(path, accept)
        if cached is not None:
            quick = encoded_if_made(cached, gzip, self._share)
            if quick is not None:
                return quick
        # Only /metrics differs by Accept (its format): one render serves all
        # the other documents' readers, whatever they accept.
        key = (path, accept if path == "/metrics" else None, gzip)
        future = self._inflight.get(key)
        if future is None:
            lane = "metrics" if path == "/metrics" else "state"
            if self._pending[lane] >= self.max_pending:
                return error_response(503, "busy", headers=(("Retry-After", "1"),))
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._lanes[lane], self._answer, path, accept, gzip)
            self._inflight[key] = future
            self._waiters[key] = 0
            self._pending[lane] += 1

            def done(_: object, lane: str = lane, future: Any = future) -> None:
                self._pending[lane] -= 1
                if self._inflight.get(key) is future:
                    del self._inflight[key]
                    del self._waiters[key]

            future.add_done_callback(done)
        self._waiters[key] += 1
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The last one waiting left (shed): a render still queued is dropped.
            if self._waiters.get(key) == 1:
                future.cancel()
            raise
        finally:
            if key in self._waiters and self._inflight.get(key) is future:
                self._waiters[key] -= 1

    async def housekeeping(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the state lane (its locks may wait for a render there)."""
        return await asyncio.get_running_loop().run_in_executor(self._lanes["state"], fn)

    def shutdown(self) -> None:
        """Wait for running renders; drop queued ones."""
        for pool in self._lanes.values():
            pool.shutdown(wait=True, cancel_futures=True)


# Connection phases, in the order they are shed at the cap (first the
# cheapest to lose); within a group the oldest goes, except that of the
# requests waiting for a render the newest goes (its render has likely not
# started, so no work is wasted).
IDLE, HANDSHAKE, HEAD, BODY, WRITE, BUSY = "idle", "handshake", "head", "body", "write", "busy"
# An event stream gives way like a slow reader: it resumes where it left off.
STREAM = "stream"
_SHED_ORDER = ((IDLE,), (HANDSHAKE, HEAD, BODY), (WRITE, STREAM))
# Under TLS a body goes to the transport this much at a time, each reader
# in turn. Each piece costs the HTTP thread a trip through the GIL, which
# the renders and the event loop also want: with 16 readers of a 6.7 MB
# state, 1 MiB pieces served 1.6 times the GETs of 256 KiB ones
# (tests/bench/bench_readers.py, 2026-12-05). A piece the socket does not
# take at once is copied into the transport: at most this much per reader.
_WRITE_PIECE = 1024 * 1024
# A plain-TCP body at least this big is sent straight from the document (or
# its parts: render_cache.Chunks) to the socket (Connection.raw_socket).
_DIRECT_MIN = 64 * 1024
# A body up to this big is sent by the HTTP thread, with its head, in one
# system call when the socket has room (a gzipped /metrics at 1,000
# namespaces: 0.6 MB); only a bigger one is put in shared memory for the
# sender's child. Handing the child a job costs the HTTP thread about as
# much as that send, and the answer waits for a process at nice 10.
SEND_HERE_MAX = 1024 * 1024
# How many of the child's distinct questions keep their last answer.
_ANSWERS_KEPT = 16


class Connection:
    """One client connection's bookkeeping: what it is doing and since when."""

    def __init__(self, writer: asyncio.StreamWriter, now: float) -> None:
        self.writer = writer
        self.task: asyncio.Task[None] | None = None
        self.phase = HANDSHAKE
        self.since = now
        self.shed = False
        # The body being sent: it stays in memory until sent, but once for
        # all the readers that share it (a cached document).
        self.sending: Body | None = None
        self._socket: socket.socket | None = None

    def enter(self, phase: str, now: float) -> None:
        """Move to ``phase`` (the clock restarts only when the phase changes)."""
        if phase != self.phase:
            self.phase = phase
            self.since = now

    def queued(self) -> int:
        """Bytes handed to the transport that the client has not taken yet."""
        return self.writer.transport.get_write_buffer_size()

    def raw_socket(self) -> socket.socket | None:
        """The connection's socket, to send big bodies on directly; None under TLS.

        A transport's write() copies whatever the socket does not take at
        once into its own buffer, holding the GIL, and sends it from there
        later: at 16 readers of a 6.7 MB state that was most of each body,
        and the HTTP thread's largest cost. :func:`send_parts` on a
        duplicate of the socket sends from the document itself, as much as
        the socket takes each time it has room, with no copy. It is a
        duplicate because the transport owns the socket (asyncio hands out
        no sending handle to it); it is used only while the transport has
        nothing queued, and closed with the connection (:meth:`close`): the
        client sees the connection end only once both are closed.
        """
        if self._socket is None:
            if self.writer.get_extra_info("ssl_object") is not None:
                return None
            own = self.writer.get_extra_info("socket")
            if own is None:
                return None
            try:
                fd = os.dup(own.fileno())
            except OSError:
                # Out of descriptors (EMFILE): this body goes through the
                # transport, as under TLS; the next one tries again.
                return None
            sock = socket.socket(own.family, own.type, own.proto, fd)
            sock.setblocking(False)
            self._socket = sock
        return self._socket

    def close(self) -> None:
        """Let go of the duplicate socket, if any (the transport is closed apart)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def drop(self) -> None:
        """Close at once, whatever is under way."""
        self.shed = True
        # The duplicate socket closes when the task ends: closed now, while
        # a send still waits on it, its descriptor could be reused by the
        # next connection before the loop stopped watching it.
        self.writer.transport.abort()
        if self.task is not None:
            self.task.cancel()


class ConnectionTable:
    """The live connections, the cap on them, and who gives way when it is reached."""

    def __init__(self, cap: int, budget: int) -> None:
        self.cap = cap
        self.budget = budget
        self.conns: set[Connection] = set()
        self.shed_total = 0

    def admit(self, conn: Connection) -> bool:
        """Add ``conn``, first shedding one other at the cap; False if none can go."""
        if len(self.conns) >= self.cap:
            victim = self.victim(exclude=conn)
            if victim is None:
                return False
            self.remove(victim)
            victim.drop()
            self.shed_total += 1
        self.conns.add(conn)
        return True

    def victim(self, exclude: Connection | None = None) -> Connection | None:
        """Who gives way: longest idle, slowest request, slowest reader, newest render."""
        for phases in _SHED_ORDER:
            candidates = [c for c in self.conns if c.phase in phases and c is not exclude]
            if candidates:
                return min(candidates, key=lambda c: c.since)
        busy = [c for c in self.conns if c.phase == BUSY and c is not exclude]
        return max(busy, key=lambda c: c.since) if busy else None

    def held(self, also: Body | None = None) -> int:
        """Bytes the responses under way hold: every transport's buffer, and each body
        still being sent once, however many readers share it (plus ``also``)."""
        bodies = {id(also): len(also)} if also is not None else {}
        total = 0
        for c in self.conns:
            total += c.queued()
            if c.sending is not None:
                bodies[id(c.sending)] = len(c.sending)
        return total + sum(bodies.values())

    def make_room(self, body: Body, exclude: Connection) -> None:
        """Shed the slowest readers until ``body`` fits the budget too.

        Sixteen readers of one cached 6 MB state hold 6 MB, not 96: counting
        each reader's share of it shed readers of the same document for nothing.
        """
        while self.held(body) > self.budget:
            writers = [
                c
                for c in self.conns
                if c is not exclude and (c.sending is not None or c.queued() > 0)
            ]
            if not writers:
                return
            slowest = min(writers, key=lambda c: c.since)
            self.remove(slowest)
            slowest.drop()
            self.shed_total += 1

    def remove(self, conn: Connection) -> None:
        """Forget ``conn``."""
        self.conns.discard(conn)


class _Request:
    def __init__(self, event: h11.Request, close: bool) -> None:
        self.method = event.method.decode("ascii", "replace").upper()
        target = event.target.decode("latin-1")
        self.path = urlsplit(target).path
        self.query = urlsplit(target).query
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
        self.accept = headers.get("accept")
        self.last_event_id = headers.get("last-event-id")
        self.gzip = accepts_gzip(headers.get("accept-encoding"))
        self.authorization = headers.get("authorization")
        self.if_none_match = headers.get("if-none-match")
        self.close = close  # the body was left unread: the connection cannot carry another request


def is_loopback(host: str) -> bool:
    """Whether a bound address is reachable from this host only."""
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class _Guard:
    """What a web config makes of the server: its TLS, password check and rate limit.

    Swapped whole on a reload, so a request sees one config, never a mix.
    """

    web: WebConfig
    auth: BasicAuth | None
    tls: TlsContexts | None
    limiter: RateLimiter | None

    @property
    def plain(self) -> bool:
        """Whether every request is answered alike: no TLS, password or rate limit
        (only then may the sender's child keep connections and answer them)."""
        return self.tls is None and self.auth is None and self.limiter is None

    @classmethod
    def of(cls, web: WebConfig) -> _Guard:
        """Build from ``web``; raises OSError or ssl.SSLError if the certificate will not load."""
        return cls(
            web,
            BasicAuth(web.users) if web.users else None,
            TlsContexts(web.tls) if web.tls is not None else None,
            RateLimiter(web.rate_limit.interval, web.rate_limit.burst)
            if web.rate_limit is not None
            else None,
        )


class HttpServer:
    """The HTTP API, served by an asyncio loop on its own thread."""

    def __init__(
        self,
        listen: tuple[str, int],
        api: Api,
        web: WebConfig | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.router = Router(api, self.limits)
        self.table = ConnectionTable(self.limits.max_connections, self.limits.output_budget)
        self._guard = _Guard.of(web or WebConfig())
        self._pending_auth = 0
        self._sock = self._bind(listen)
        self._nicer = _Nicer()
        # Started with the server unless under TLS (then on the first big
        # plain body, after a reload turned TLS off).
        self.sender = BodySender(
            idle=self.limits.cache_idle,
            nice=self._nicer.nice,
            keep=KeepLimits(
                self.limits.max_connections,
                self.limits.idle_timeout,
                self.limits.head_timeout,
                self.limits.write_timeout,
                self.limits.max_head,
            ),
        )
        self.sender.on_ask = self._asked
        self.sender.on_back = self._taken_back
        self._share_refused = False
        self._share_told: set[int | None] = set()
        self._render = Renderer(
            self.router,
            self.limits.render_workers,
            self.limits.max_pending_renders,
            self._nicer,
            self._share,
        )
        # Password checks get their own thread: a storm of wrong passwords
        # then slows only other password checks, never a render.
        self._bcrypt = ThreadPoolExecutor(1, "nswatch-http-auth", initializer=self._nicer)
        self._child_tasks: set[asyncio.Future[None]] = set()
        # The child's questions answered last: (path, Accept, Accept-Encoding) to the
        # document, the head and the shared body.
        self._answers: dict[tuple[str, str, str], tuple[Document, bytes, SharedBody]] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()

    @property
    def web(self) -> WebConfig:
        """The web config in force."""
        return self._guard.web

    def use_web(self, web: WebConfig) -> None:
        """Serve under ``web`` from the next connection (TLS) or request (users, limit, headers) on.

        Raises OSError or ssl.SSLError, changing nothing, when its certificate
        cannot be loaded. Requests under way finish under the config they began with.
        """
        guard = _Guard.of(web)
        self.warn_if_exposed(*self.address, web)
        # One reference, replaced whole: each handler reads it once.
        self._guard = guard
        self._answers = {}  # their heads carry the old config's headers

    def _forget_answers(self) -> None:
        # They hold the documents they answered with: freed after the heap was
        # trimmed, they left the daemon at 103-104 MB 20 s after 16 + 4 readers,
        # against 99 MB freed before (tests/bench/bench_readers.py).
        self._answers = {}

    def _share(self, body: Body) -> SharedBody | None:
        """``body`` in shared memory for the sender's child; None under TLS or without memfds."""
        if self._guard.tls is not None or self._share_refused:
            return None
        try:
            return SharedBody.of(body)
        except OSError as e:
            # The body is then sent by the HTTP thread. Out of memory or
            # descriptors, the next document tries again; refused outright
            # (a seccomp filter without memfd_create), none does. Said once
            # per errno either way.
            transient = e.errno in (errno.ENOMEM, errno.EMFILE, errno.ENFILE)
            self._share_refused = not transient
            if e.errno not in self._share_told:
                self._share_told.add(e.errno)
                log.warning("http_body_not_shared", error=str(e), again=transient)
            return None

    @staticmethod
    def _bind(listen: tuple[str, int]) -> socket.socket:
        host, port = listen
        family, _, _, _, addr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        # IPPROTO_TCP said outright: asyncio turns Nagle off (TCP_NODELAY)
        # only on sockets whose proto says TCP, and accepted sockets take
        # the listener's. With proto 0 every small keep-alive response (a
        # head, then its body) waited 40 ms for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), useful with port 0."""
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve on a background thread (returns once it accepts connections)."""
        self.warn_if_exposed(*self.address, self.web)
        if self._guard.tls is None:
            self.sender.start()
        self._thread = threading.Thread(target=self._run, name="nswatch-http", daemon=True)
        self._thread.start()
        self._started.wait(5)

    def stop(self) -> None:
        """Close every connection and the listening socket; join the threads."""
        if self._thread is not None:
            loop, stopping = self._loop, self._stopping
            if loop is not None and stopping is not None:
                with contextlib.suppress(RuntimeError):  # the loop already ended
                    loop.call_soon_threadsafe(stopping.set)
            self._thread.join(5)
            self._thread = None
        self._sock.close()
        self.sender.close()  # the loop closed it, unless it never ran
        self._render.shutdown()
        self._answers = {}
        self.router.forget()
        self._bcrypt.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def warn_if_exposed(host: str, port: int, web: WebConfig) -> None:
        """Log a warning when the API is reachable off this host without a password or TLS."""
        if is_loopback(host):
            return
        if not web.authenticates:
            log.warning(
                "http_open_to_network",
                listen=f"{host}:{port}",
                hint="anyone who can reach this address reads the API; "
                "set basic_auth_users or client certificates in --web.config.file",
            )
        elif web.users and web.tls is None:
            log.warning(
                "http_basic_auth_without_tls",
                listen=f"{host}:{port}",
                hint="passwords cross the network in clear; add tls_server_config",
            )

    def _run(self) -> None:
        self._nicer()
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(_loop_error)
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(
            self._client, sock=self._sock, backlog=1024, limit=self.limits.max_head
        )
        events = self.router.api.events
        if events is not None:
            events.attach(self._loop)
        self._started.set()
        release = asyncio.create_task(self._release_idle())
        try:
            await self._stopping.wait()
        finally:
            if events is not None:
                events.detach()
            release.cancel()
            server.close()
            self.sender.close()
            for c in list(self.table.conns):
                c.drop()
            # Also connections accepted but not yet admitted to the table.
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # An aborted transport closes its socket in a callback one turn
            # later; let those run before asyncio.run closes the loop.
            for _ in range(3):
                await asyncio.sleep(0)

    async def _release_idle(self) -> None:
        idle = self.limits.cache_idle
        while True:
            await asyncio.sleep(idle / 2)
            await self._render.housekeeping(
                lambda: self.router.release_idle(idle, also=self._forget_answers)
            )

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(writer, time.monotonic())
        conn.task = asyncio.current_task()
        if not self.table.admit(conn):
            writer.transport.abort()
            return
        clean = False
        try:
            clean = await self._serve(conn, reader, writer)
        except (ConnectionError, ssl.SSLError, TimeoutError, h11.LocalProtocolError):
            pass
        except asyncio.CancelledError:
            if not conn.shed:
                raise
        finally:
            self.table.remove(conn)
            conn.close()
            if clean:
                writer.close()
            else:
                writer.transport.abort()

    async def _serve(
        self, conn: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer requests until the client or a limit ends it; True if it ended cleanly."""
        limits = self.limits
        deadline = conn.since + limits.head_timeout
        tls = self._guard.tls
        if tls is not None:
            async with asyncio.timeout_at(self._loop_time(deadline)):
                await writer.start_tls(tls.current())
            if not tls.settings.peer_allowed(writer.get_extra_info("peercert")):
                return False
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
        fresh = True
        while True:
            got = await self._read(conn, h, reader, deadline if fresh else None)
            if got is None:
                return h.their_state is h11.CLOSED
            if isinstance(got, Response):
                await self._write(conn, h, writer, got, head=False)
                return True
            conn.enter(BUSY, time.monotonic())
            if self.router.streams(got.method, got.path):
                refused = await self._refusal(got)
                if refused is None:
                    await self._stream(conn, h, reader, writer, got)
                    return True
                response = refused
            else:
                response = await self._respond(got)
            await self._write(conn, h, writer, response, head=got.method == "HEAD")
            if response.close or got.close or h.our_state is not h11.DONE:
                return True
            if h.their_state is not h11.DONE:
                return True
            h.start_next_cycle()
            if self._hand_over(conn, h, reader, got, response):
                return True
            fresh = False

    def _hand_over(
        self,
        conn: Connection,
        h: h11.Connection,
        reader: asyncio.StreamReader,
        req: _Request,
        response: Response,
    ) -> bool:
        """Give a keep-alive connection just answered a document to the sender's child,
        which answers its next requests for documents itself; True if it took it.

        Only where every request is answered alike (no TLS, password or rate
        limit: the child checks none) and the request was a plain GET of a
        document the child answers. Looping readers then cost this thread
        one small question each (:meth:`_asked`), not a parse and a send.
        """
        if not (
            req.method == "GET"
            and req.path.encode("latin-1") in SERVED
            and response.status == 200
            and self._guard.plain
            and self.sender.ready()
            and self.sender.keeps()
        ):
            return False
        sock = conn.raw_socket()
        if sock is None:
            return False
        # What was read and not answered goes along: h11's leftovers, then the
        # stream's buffer (asyncio has no public way to take it).
        unread: bytearray = getattr(reader, "_buffer", bytearray())
        if not self.sender.keep(sock, bytes(h.trailing_data[0]) + bytes(unread)):
            return False
        # The transport closes only this process's descriptors: the client's
        # connection lives on in the child.
        unread.clear()
        return True

    def _asked(self, number: int, path: str, accept: str, encoding: str) -> None:
        """The sender's child asks for a document for a kept connection's request."""
        if not self._guard.plain:
            # A reload turned on TLS, passwords or a rate limit: the child hands
            # its connections back one request at a time, to be checked here.
            self.sender.answer(number, b"", None)
            return
        known = self._answers.get((path, accept, encoding))
        if known is not None and self.router.current(path, accept or None) is known[0]:
            # The answer given last for this document (its head made, its body
            # shared): most questions, since readers ask once per request and
            # documents change a few times a second at most. Made afresh each
            # time, an answer took ~140 µs of this thread (py-spy, 16 + 4 readers).
            self.sender.answer(number, known[1], known[2])
            return
        task = asyncio.ensure_future(self._answer_child(number, path, accept, encoding))
        self._child_tasks.add(task)
        task.add_done_callback(self._child_tasks.discard)

    async def _answer_child(self, number: int, path: str, accept: str, encoding: str) -> None:
        """Answer the child's question with the document as a reader here would get it
        (rendered if need be, shared once per document), or with None on any failure."""
        head, shared = b"", None
        try:
            gzip = accepts_gzip(encoding or None)
            r = await self._render.render(path, accept or None, gzip)
            self.router.last_read = time.monotonic()
            if r.status == 200 and not r.close:
                shared = r.shared
                doc = r.source
                if shared is None and doc is not None:
                    # A body small enough to be sent from here (/metrics)
                    # gets its shared copy once per document too.
                    body, key = r.body, ("shared", gzip)
                    if doc.derived_made(key):
                        shared = doc.derived(key, lambda: None)
                    else:
                        shared = await self._render.housekeeping(
                            lambda: doc.derived(key, lambda: self._share(body))
                        )
                if shared is not None and doc is not None:
                    head = self._head(r)
                    if len(self._answers) >= _ANSWERS_KEPT:
                        # Keys come from request headers: varying them only costs renders.
                        self._answers = {}
                    self._answers[(path, accept, encoding)] = (doc, head, shared)
        except Exception as e:
            # The child hands the connection back, and this thread answers
            # it as any request (a 500 if it fails again).
            log.warning("http_kept_request_failed", path=path, error=repr(e))
            shared = None
        self.sender.answer(number, head, shared)

    def _head(self, r: Response) -> bytes:
        """``r``'s status line and headers, but for Date and the blank line (the child
        adds them as it sends)."""
        headers = [
            ("Server", SERVER_NAME),
            ("Content-Type", r.content_type),
            ("Content-Length", str(len(r.body))),
            *r.headers,
            *self.web.headers,
        ]
        lines = [f"HTTP/1.1 {r.status} {_phrase(r.status)}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        return "".join(lines).encode("latin-1")

    def _taken_back(self, sock: socket.socket, pending: bytes) -> None:
        """A kept connection the child did not answer: served here from ``pending`` on."""
        task = asyncio.ensure_future(self._serve_taken_back(sock, pending))
        self._child_tasks.add(task)
        task.add_done_callback(self._child_tasks.discard)

    async def _serve_taken_back(self, sock: socket.socket, pending: bytes) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self.limits.max_head, loop=loop)
        if pending:
            reader.feed_data(pending)
        protocol = asyncio.StreamReaderProtocol(reader, self._client, loop=loop)
        try:
            sock.setblocking(False)
            await loop.connect_accepted_socket(lambda: protocol, sock)
        except OSError:
            sock.close()

    def _loop_time(self, monotonic_deadline: float) -> float:
        # asyncio's clock is time.monotonic too, but go through the loop's
        # own clock so the deadline means the same to both.
        loop = asyncio.get_running_loop()
        return loop.time() + (monotonic_deadline - time.monotonic())

    async def _read(
        self,
        conn: Connection,
        h: h11.Connection,
        reader: asyncio.StreamReader,
        deadline: float | None,
    ) -> _Request | Response | None:
        """The next request (its body read and dropped), an error response, or None to hang up."""
        limits = self.limits
        event_head: h11.Request | None = None
        body = 0
        if deadline is None:
            conn.enter(IDLE, time.monotonic())
        elif conn.phase != HEAD:
            conn.enter(HEAD, conn.since)
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as e:
                return error_response(e.error_status_hint, f"bad request: {e}", close=True)
            if event is h11.NEED_DATA:
                if h.their_state is h11.IDLE and self._not_http11(h.trailing_data[0]):
                    return error_response(400, "bad request: not an HTTP/1.x request", close=True)
                pending = bool(h.trailing_data[0]) or event_head is not None
                if deadline is None and pending:
                    deadline = time.monotonic() + limits.head_timeout
                    conn.enter(HEAD, time.monotonic())
                limit = deadline if deadline is not None else time.monotonic() + limits.idle_timeout
                try:
                    async with asyncio.timeout_at(self._loop_time(limit)):
                        data = await reader.read(65536)
                except TimeoutError:
                    if pending:
                        return error_response(408, "request took too long", close=True)
                    return None
                if data and deadline is None:
                    deadline = time.monotonic() + limits.head_timeout
                    conn.enter(HEAD, time.monotonic())
                h.receive_data(data)
            elif isinstance(event, h11.Request):
                event_head = event
                conn.enter(BODY, time.monotonic())
                if h.they_are_waiting_for_100_continue:
                    # Nothing here wants a body: answer without asking for it.
                    return _Request(event, close=True)
                length = _content_length(event)
                if length is not None and length > limits.max_body:
                    return error_response(413, "request body too large", close=True)
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > limits.max_body:
                    return error_response(413, "request body too large", close=True)
            elif isinstance(event, h11.EndOfMessage):
                assert event_head is not None
                return _Request(event_head, close=False)
            else:  # ConnectionClosed (or a Paused we never cause)
                return None

    @staticmethod
    def _not_http11(buffered: bytes) -> bool:
        start = buffered.lstrip(b"\r\n")
        nl = start.find(b"\n")
        if nl < 0:
            return False
        return _REQUEST_LINE.fullmatch(start[:nl].rstrip(b"\r")) is None

    async def _refusal(self, req: _Request) -> Response | None:
        """The answer when the rate limit or the password refuses ``req``, else None."""
        guard = self._guard
        if guard.limiter is not None and not guard.limiter.allow():
            return error_response(429, "too many requests")
        if guard.auth is not None:
            return await self._authenticate(guard.auth, req.authorization)
        return None

    async def _respond(self, req: _Request) -> Response:
        refused = await self._refusal(req)
        if refused is not None:
            return refused
        if req.method in ("GET", "HEAD") and self.router.heavy(req.path):
            held = req.if_none_match
            if held is not None and req.path == "/api/v1/state":
                # The state is one document per shown version: a client that
                # holds the live version's needs no render to be told so.
                tag = self.router.state_etag(req.gzip)
                if tag is not None and none_match(held, tag):
                    return not_modified(tag)
            r = await self._render.render(req.path, req.accept, req.gzip)
            if held is not None and r.etag is not None and none_match(held, r.etag):
                return not_modified(r.etag)
            return r
        return encoded(self.router.route(req.method, req.path, req.accept), req.gzip)

    async def _authenticate(self, auth: BasicAuth, header: str | None) -> Response | None:
        """None when the credentials are good, else the refusal."""
        known = auth.cached(header)
        if known is None:
            if self._pending_auth >= self.limits.max_pending_auth:
                return error_response(503, "too many password checks under way")
            self._pending_auth += 1
            try:
                loop = asyncio.get_running_loop()
                known = await loop.run_in_executor(self._bcrypt, auth.check, header)
            finally:
                self._pending_auth -= 1
        if known:
            return None
        return error_response(
            401, "unauthorized", headers=(("WWW-Authenticate", 'Basic realm="nswatch"'),)
        )

    async def _write(
        self,
        conn: Connection,
        h: h11.Connection,
        writer: asyncio.StreamWriter,
        r: Response,
        head: bool,
    ) -> None:
        now = time.monotonic()
        conn.enter(WRITE, now)
        if not head and len(r.body) > 65536:
            self.table.make_room(r.body, exclude=conn)
        headers = [("Server", SERVER_NAME), ("Date", http_date())]
        if r.status != 304:  # a 304 describes the 200 the client holds, not its empty self
            headers += [("Content-Type", r.content_type), ("Content-Length", str(len(r.body)))]
        headers += [*r.headers, *self.web.headers]
        if r.close:
            headers.append(("Connection", "close"))
        status = h11.Response(status_code=r.status, headers=headers, reason=_phrase(r.status))
        async with asyncio.timeout_at(self._loop_time(now + self.limits.write_timeout)):
            head_bytes = h.send(status) or b""
            if head:
                writer.write(head_bytes)
            else:
                conn.sending = r.body
                try:
                    await self._send_response(conn, h, writer, head_bytes, r)
                finally:
                    conn.sending = None
            writer.write(h.send(h11.EndOfMessage()) or b"")
            if r.close or h.our_state is h11.MUST_CLOSE:
                # Wait for the client to take every byte before closing; else
                # close() would keep the rest queued for as long as it dawdles.
                writer.transport.set_write_buffer_limits(high=0)
            await writer.drain()

    async def _send_response(
        self,
        conn: Connection,
        h: h11.Connection,
        writer: asyncio.StreamWriter,
        head: bytes,
        r: Response,
    ) -> None:
        """Send ``head`` and ``r``'s body: by the sender's child, straight to the socket, or
        through the transport, in that order of preference.

        Never handed to the transport whole: it copies what the socket does
        not take at once, so a shared document would be copied once per
        reader (16 readers of a 6 MB state: 100 MB that the heap then keeps).
        """
        sock = conn.raw_socket() if len(r.body) >= _DIRECT_MIN else None
        if sock is None:
            writer.write(head)
            await self._write_body(h, writer, r.body)
            return
        sender = self.sender if r.shared is not None and self.sender.ready() else None
        await self._send_body(h, writer, sock, head, r.body, sender, r.shared)

    @staticmethod
    async def _send_body(
        h: h11.Connection,
        writer: asyncio.StreamWriter,
        sock: socket.socket,
        head: bytes,
        body: Body,
        sender: BodySender | None = None,
        shared: SharedBody | None = None,
    ) -> None:
        """Send ``head`` and ``body`` on ``sock`` once the transport holds nothing
        (Connection.raw_socket): a body over :data:`SEND_HERE_MAX` by ``sender`` if it
        takes ``shared``, else (and any smaller body) from here."""
        transport = writer.transport
        if transport.get_write_buffer_size():
            low, high = transport.get_write_buffer_limits()
            transport.set_write_buffer_limits(high=0)
            try:
                await writer.drain()
            finally:
                transport.set_write_buffer_limits(high=high, low=low)
        # h11 only counts the body against Content-Length (it takes len());
        # with that framing it hands the body back as it came, unframed.
        data = h11.Data(data=body)  # type: ignore[arg-type]
        passed: list[object] = list(h.send_with_data_passthrough(data) or ())
        if len(passed) != 1 or passed[0] is not body:
            raise AssertionError("a body sent whole must go out unframed (Content-Length)")
        if len(body) <= SEND_HERE_MAX:
            # The socket mostly takes such a body in one go: one system call
            # here (the GIL let go while the kernel copies), where handing it
            # to the child costs a job, the wake-up of a nicer process and an answer.
            await send_parts(sock, Chunks((head, *as_chunks(body).parts)))
            return
        if sender is not None and shared is not None and await sender.send(sock, head, shared):
            return
        # Apart: the body's Chunks keep where each part ends, made once per document.
        await send_parts(sock, Chunks((head,)))
        await send_parts(sock, as_chunks(body))

    @staticmethod
    async def _write_body(h: h11.Connection, writer: asyncio.StreamWriter, body: Body) -> None:
        """Hand ``body`` to the transport a piece at a time, giving other clients a turn."""
        if isinstance(body, Chunks):
            pieces: Iterable[bytes | memoryview] = body.pieces(_WRITE_PIECE)
        else:
            view = memoryview(body)
            pieces = (view[at : at + _WRITE_PIECE] for at in range(0, len(view), _WRITE_PIECE))
        left = len(body)
        for piece in pieces:
            left -= len(piece)
            # h11 passes a memoryview through (it only takes len()); typed as bytes.
            data = h11.Data(data=piece)  # type: ignore[arg-type]
            for chunk in h.send_with_data_passthrough(data) or ():
                writer.write(chunk)
            if left:
                await writer.drain()
                # drain() returns at once while the socket takes everything:
                # without a turn for others here, each reader's whole
                # document (megabytes, up to the socket's buffer) went out
                # before the loop read the next request, and with 16 readers
                # of the state a /healthz waited 30 ms for its turn (p99 220 ms).
                await asyncio.sleep(0)

    async def _stream(
        self,
        conn: Connection,
        h: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        req: _Request,
    ) -> None:
        """Serve ``/api/v1/events`` until the client leaves, falls behind or the server stops."""
        hub = self.router.api.events
        assert hub is not None
        try:
            sub = hub.subscribe(req.query, req.last_event_id)
        except ValueError as e:
            await self._write(conn, h, writer, error_response(400, str(e), close=True), False)
            return
        conn.enter(STREAM, time.monotonic())
        headers = [
            ("Server", SERVER_NAME),
            ("Date", http_date()),
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-cache"),
            ("X-Accel-Buffering", "no"),  # nginx: pass each event on at once
            *self.web.headers,
        ]
        writer.write(h.send(h11.Response(status_code=200, headers=headers, reason="OK")))
        # Nothing more is expected from the client: reading only tells when it hangs up.
        gone = asyncio.ensure_future(_until_eof(reader))
        timeout = self.limits.write_timeout

        def send(chunk: bytes) -> bool:
            if writer.transport.is_closing():
                return True  # the client left; ``gone`` ends the stream
            writer.write(h.send(h11.Data(data=chunk)) or b"")
            return conn.queued() <= hub.client_buffer

        async def drain() -> None:
            async with asyncio.timeout(timeout):
                await writer.drain()

        try:
            await sub.run(send, drain, gone)
            if not writer.transport.is_closing():
                writer.write(h.send(h11.EndOfMessage()) or b"")
                writer.transport.set_write_buffer_limits(high=0)
                await drain()
        finally:
            hub.unsubscribe(sub)
            gone.cancel()


async def send_parts(sock: socket.socket, body: Chunks) -> None:
    """Send ``body``'s parts in order on the non-blocking ``sock``, as much as it takes each turn.

    One sendmsg() copies straight from the parts into the kernel (no join,
    no copy into a buffer of ours); when the socket is full, the loop goes
    on with other clients until it has room again. Like ``loop.sock_sendall``
    for a list of buffers, which asyncio lacks. The state is ~2,000 parts:
    where a send stopped is found by bisection and each batch is a slice,
    so a send costs the same few Python steps however many parts it took.
    """
    loop = asyncio.get_running_loop()
    parts, ends, total = body.parts, body.ends, body.size
    at = 0  # bytes sent
    while at < total:
        i = bisect.bisect_right(ends, at)
        stop = min(i + IOV_MAX, len(parts))
        first = memoryview(parts[i])[at - (ends[i] - len(parts[i])) :]
        with contextlib.suppress(BlockingIOError, InterruptedError):
            at += sock.sendmsg([first, *parts[i + 1 : stop]])
        if at < ends[stop - 1]:
            await _writable(loop, sock)
        elif at < total:
            # The socket took a whole batch: others get a turn before the next.
            await asyncio.sleep(0)


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Until ``sock`` has room to send (or is closed, which the next send reports)."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = sock.fileno()
    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


async def _until_eof(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while await reader.read(65536):
            pass


def _content_length(event: h11.Request) -> int | None:
    for name, value in event.headers:
        if name == b"content-length":
            return int(value)
    return None


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Out of file descriptors and the like: asyncio pauses accepting for a
    # second by itself; say so in our logs rather than on stderr.
    exc = context.get("exception")
    log.error("http_loop_error", message=context.get("message"), error=repr(exc) if exc else None)
