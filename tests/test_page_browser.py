"""The topology page in a real browser (headless Chromium) against a live daemon."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket

from nswatch.daemon import Settings
from nswatch.stream import StreamHub
from tests.conftest import Running, require_root, stop_daemon
from tests.kernel import Lab, ip
from tests.test_stream_kernel import start_streaming

pytestmark = pytest.mark.kernel

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--window-size=1200,900",
)


class Browser:
    """Headless Chromium showing one page, driven over the DevTools protocol."""

    def __init__(self, url: str) -> None:
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            pytest.fail("chromium is not installed (.ci/install installs it)")
        self.profile = tempfile.mkdtemp(prefix="nswT-chromium-")
        self.proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its helper processes go with it on close
        )
        self.ws: websocket.WebSocket | None = None
        self._id = 0
        try:
            self.ws = websocket.create_connection(self._page_socket(), timeout=10)
        except BaseException:
            self.close()
            raise

    def _page_socket(self) -> str:
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while True:
            if port_file.exists() and port_file.read_text().strip():
                port = port_file.read_text().split()[0]
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
                if pages:
                    return str(pages[0]["webSocketDebuggerUrl"])
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("chromium did not start (or opened no page) within 20 s")
            time.sleep(0.1)

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        assert self.ws is not None
        self._id += 1
        msg = {"expression": expression, "returnByValue": True}
        self.ws.send(json.dumps({"id": self._id, "method": "Runtime.evaluate", "params": msg}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                result = reply["result"]
                if "exceptionDetails" in result:
                    raise AssertionError(f"page error: {result['exceptionDetails']}")
                return result["result"].get("value")

    def wait(self, expression: str, timeout: float) -> float:
        """Seconds until ``expression`` is truthy in the page; fails after ``timeout``."""
        t0 = time.monotonic()
        while not self.eval(expression):
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"not true within {timeout}s: {expression}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # A helper process may still write its last files for a moment.
        for _ in range(50):
            shutil.rmtree(self.profile, ignore_errors=True)
            if not os.path.exists(self.profile):
                break
            time.sleep(0.1)


@pytest.fixture
def running(lab: Lab) -> Iterator[Running]:
    """A daemon with its event stream, watching this test's namespaces."""
    require_root()
    r = start_streaming(Settings(include=f"^{lab.prefix}", reconcile_interval=0), StreamHub())
    try:
        yield r
    finally:
        stop_daemon(r)


@pytest.fixture
def browser(running: Running) -> Iterator[Browser]:
    """The daemon's page, open and following the stream."""
    b = Browser(running.url + "/")
    try:
        b.wait("document.getElementById('status')?.classList.contains('live')", timeout=20)
        yield b
    finally:
        b.close()


def row(netns: str, link: str) -> str:
    return f"document.querySelector('.link[data-name=\"{netns}/{link}\"]')"


def test_new_veth_pair_appears_and_a_link_set_down_turns_red(lab: Lab, browser: Browser) -> None:
    """A namespace with a veth pair shows up within 2 s, joined by an edge; set down, it turns red."""
    ns = lab.netns("p")
    a, b = lab.name("a"), lab.name("b")
    lab.veth(a, b, b_ns=ns)
    ip("-n", ns, "link", "set", b, "up")
    ip("link", "set", a, "up")
    browser.wait(f"!!{row(ns, b)} && !!{row('host', a)}", timeout=2)
    edge = (
        f"document.querySelector('#edges path.veth[data-a=\"' + {row('host', a)}.dataset.id"
        f" + '\"][data-b=\"' + {row(ns, b)}.dataset.id + '\"], #edges path.veth[data-b=\"'"
        f" + {row('host', a)}.dataset.id + '\"][data-a=\"' + {row(ns, b)}.dataset.id + '\"]')"
    )
    browser.wait(f"!!{edge}", timeout=2)
    assert not browser.eval(f"{row(ns, b)}.classList.contains('down')")
    ip("-n", ns, "link", "set", b, "down")
    browser.wait(f"{row(ns, b)}.classList.contains('down')", timeout=2)
    color = browser.eval(f"getComputedStyle({row(ns, b)}.querySelector('.lname')).color")
    assert color == "rgb(221, 51, 51)"


def test_search_filters_namespaces_by_name(lab: Lab, browser: Browser) -> None:
    """Typing in the filter box leaves only the namespaces (or links) that match."""
    one, two = lab.netns("x1"), lab.netns("y1")
    browser.wait(f"!!document.querySelector('.ns[data-ns=\"{two}\"]')", timeout=3)
    browser.eval(
        f"(() => {{ const s = document.getElementById('search'); s.value = '{one}';"
        " s.dispatchEvent(new Event('input')); return true; })()"
    )
    shown = browser.eval("[...document.querySelectorAll('.ns')].map(e => e.dataset.ns)")
    assert one in shown and two not in shown
