"""`nswatch run` stops within 2 s of SIGTERM whatever is in flight (issue 10, item 7)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from nswatch.cli import _teardown
from tests.conftest import require_root
from tests.kernel import wait_for

NSWATCH = [sys.executable, "-m", "nswatch"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.mark.kernel
def test_sigterm_during_a_reload_that_never_ends(tmp_path: Path) -> None:
    """With a reload stuck reading its config (a FIFO nobody writes), SIGTERM still ends nswatch with 0 within 2 s, and no apply failure is logged."""
    require_root()
    port = free_port()
    cfg = tmp_path / "nswatch.yaml"
    cfg.write_text("include: '^nswKnothing'\n")
    # The log goes to a file: a pipe read only at the end could fill up
    # (the host namespace is watched, and other tests churn it) and block nswatch.
    log = open(tmp_path / "nswatch.log", "w+")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            *NSWATCH,
            "run",
            "--config",
            str(cfg),
            "--listen",
            f"127.0.0.1:{port}",
            "--log-format=json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        wait_for(lambda: ready(port), timeout=30)
        cfg.unlink()
        os.mkfifo(cfg)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # the reload is now blocked opening the FIFO
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        took = time.monotonic() - t0
        log.seek(0)
        events = [json.loads(line)["event"] for line in log if line.startswith("{")]
        assert took < 2.0, (took, events)
        assert "stopped" in events
        assert not any(e.startswith("apply_failed") for e in events)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_teardown_gives_up_on_a_part_that_does_not_stop() -> None:
    """The teardown returns within its budget and names the part still running."""
    release = threading.Event()

    class Loop:
        def request_stop(self) -> None:
            pass

    loop_thread = threading.Thread(target=lambda: None)
    loop_thread.start()
    t0 = time.monotonic()
    stuck = _teardown(Loop(), loop_thread, lambda: release.wait(30), lambda: None, 0.3)  # type: ignore[arg-type]
    took = time.monotonic() - t0
    release.set()
    assert stuck == ["apply_engine"]
    assert took < 1.0
