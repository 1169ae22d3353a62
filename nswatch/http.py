"""The HTTP API: state, health, readiness and (injected) metrics.

Handlers never touch the live model: they take :meth:`Daemon.view`, a copy
made under the lock, so a slow client can never hold up event handling.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from nswatch.model import Model
from nswatch.state import namespace_json, state_json

MetricsRenderer = Callable[[str | None], tuple[bytes, str]]
"""Given the Accept header, return (body, content type) for /metrics."""

MAX_CONNECTIONS = 64
CLIENT_TIMEOUT = 10.0


class Api:
    """What the HTTP server asks of the daemon."""

    def __init__(
        self,
        view: Callable[[], Model],
        alive: Callable[[], bool],
        ready: Callable[[], bool],
        metrics: MetricsRenderer | None = None,
    ) -> None:
        self.view = view
        self.alive = alive
        self.ready = ready
        self.metrics = metrics


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "nswatch"
    timeout = CLIENT_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        # Access logs would drown the change log; errors go through send_error.
        return None

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors the request parser finds, as JSON with a real status line."""
        # A garbled request line leaves the version at HTTP/0.9, which has no
        # status line at all; nobody speaks 0.9 to a metrics endpoint.
        self.request_version = "HTTP/1.1"
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        body = (json.dumps({"error": message or phrase}) + "\n").encode()
        self.send_response(code, message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    def _send(self, status: int, body: bytes, ctype: str, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, head: bool = False) -> None:
        body = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        self._send(status, body, "application/json", head)

    def _route(self, head: bool) -> None:
        api = self.server.api
        path = urlsplit(self.path).path
        if path == "/healthz":
            ok = api.alive()
            self._json(200 if ok else 503, {"status": "ok" if ok else "stalled"}, head)
        elif path == "/readyz":
            ok = api.ready()
            self._json(200 if ok else 503, {"ready": ok}, head)
        elif path == "/api/v1/state":
            self._json(200, state_json(api.view()), head)
        elif path.startswith("/api/v1/namespaces/"):
            name = unquote(path[len("/api/v1/namespaces/") :])
            model = api.view()
            ns = model.get(name)
            if ns is None:
                self._json(404, {"error": "namespace not found", "netns": name}, head)
            else:
                self._json(200, namespace_json(model, ns), head)
        elif path == "/metrics" and api.metrics is not None:
            body, ctype = api.metrics(self.headers.get("Accept"))
            self._send(200, body, ctype, head)
        elif path == "/":
            self._json(200, {"endpoints": self.server.endpoints()}, head)
        else:
            self._json(404, {"error": "not found", "path": path}, head)

    def do_GET(self) -> None:
        self._guarded(head=False)

    def do_HEAD(self) -> None:
        self._guarded(head=True)

    def _guarded(self, head: bool) -> None:
        try:
            self._route(head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug in one handler must not look like a dead server
            self.close_connection = True
            self._json(500, {"error": "internal error", "detail": type(e).__name__}, head)

    def _not_allowed(self) -> None:
        path = urlsplit(self.path).path
        if path in self.server.endpoints() or path.startswith("/api/v1/namespaces/"):
            self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
            body = b'{"error":"method not allowed"}\n'
            self.send_header("Allow", "GET, HEAD")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self._json(404, {"error": "not found", "path": path})
        # A body we did not read would be parsed as the next request.
        self.close_connection = True

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], api: Api) -> None:
        self.api = api
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)

    def endpoints(self) -> list[str]:
        eps = ["/healthz", "/readyz", "/api/v1/state", "/api/v1/namespaces/{name}"]
        if self.api.metrics is not None:
            eps.append("/metrics")
        return eps

    def process_request(self, request: Any, client_address: Any) -> None:
        # Bound the threads a flood of idle connections can tie up.
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-response is normal; never print tracebacks.
        return None


class HttpServer:
    """The HTTP API on its own thread."""

    def __init__(self, listen: tuple[str, int], api: Api) -> None:
        self._server = _Server(listen, api)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), useful with port 0."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve on a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="nswatch-http"
        )
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=2)
            self._thread = None
        self._server.server_close()
