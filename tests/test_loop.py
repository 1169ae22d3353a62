"""The event loop's own rules: callbacks from other threads, and its worker thread."""

from __future__ import annotations

import os
import threading
import time

from nswatch.loop import Loop


def _loop() -> tuple[Loop, list[tuple[str, BaseException]]]:
    errors: list[tuple[str, BaseException]] = []
    return Loop(time.monotonic, lambda where, e: errors.append((where, e))), errors


def test_a_wake_after_close_writes_to_no_descriptor_that_took_its_number() -> None:
    """After close, call_soon (a worker finishing late) must not write its wake byte to
    whatever file now has the wake pipe's old descriptor number."""
    loop, _ = _loop()
    number = loop._wake_w
    r, w = os.pipe()  # before close: numbers of their own
    loop.close()
    try:
        os.dup2(w, number)
        loop.call_soon(lambda: None)
        os.set_blocking(r, False)
        try:
            got = os.read(r, 16)
        except BlockingIOError:
            got = b""
        assert got == b""
    finally:
        for fd in (r, w, number):
            os.close(fd)


def test_offloaded_work_runs_off_the_loop_and_its_result_comes_back_on_it() -> None:
    """offload runs the work on another thread and hands the result, or the exception it
    raised, to ``then`` on the loop's own turn."""
    loop, errors = _loop()
    got: list[tuple[object, str]] = []
    try:
        loop.offload(lambda: threading.current_thread().name, lambda r: got.append((r, "ok")))

        def fail() -> None:
            raise OSError("gone")

        loop.offload(fail, lambda r: got.append((r, threading.current_thread().name)))
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            loop.run_once(0.05)
        assert got[0] == ("nswatch-loop-worker_0", "ok")
        assert isinstance(got[1][0], OSError) and got[1][1] == threading.current_thread().name
        assert errors == []
    finally:
        loop.close()


def test_an_error_in_what_takes_offloaded_work_back_is_reported_where_it_was_offloaded() -> None:
    """An exception raised by ``then`` (a rescan comparing what it found) is reported under
    the name the work was offloaded with, not as the loop's generic inbox, and the loop
    goes on."""
    loop, errors = _loop()
    ran: list[str] = []
    try:

        def compare(_: object) -> None:
            raise ValueError("a bug")

        loop.offload(lambda: 1, compare, where="rescan")
        loop.call_soon(lambda: ran.append("after"))
        deadline = time.monotonic() + 5
        while not errors and time.monotonic() < deadline:
            loop.run_once(0.05)
        loop.run_once(0.05)
        assert [(w, type(e)) for w, e in errors] == [("rescan", ValueError)]
        assert ran == ["after"]
    finally:
        loop.close()
