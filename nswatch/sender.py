"""The daemon's side of the body sender: big bodies go to a child process to send.

Why a child at all, and what it does: :mod:`nswatch.sender_child`. Here:
:class:`SharedBody` puts a document's body in a sealed memfd once per
document (the render threads do it, with the GIL let go while the kernel
copies), and :class:`BodySender`, on the HTTP loop, starts the child, hands
it a connection and a body, and wakes the request's task when the child
answers. The connection stays the daemon's: the child sends on a copy of
its descriptor, closes that copy, then answers, so keep-alive, the write
deadline and shedding work as for any other response. A keep-alive
connection just answered a document may instead be given to the child to
keep (:meth:`BodySender.keep`): it then asks for the documents its next
requests want (``on_ask``, answered with :meth:`BodySender.answer`) and
hands back what it does not answer (``on_back``).

When the child cannot start or has died, :meth:`BodySender.ready` says
so and the HTTP thread sends the bodies itself, as it did before the
child existed, until a restart (after 1 s, doubling up to a minute while
children keep dying young).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import itertools
import os
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import structlog

from nswatch import sender_child
from nswatch.render_cache import IOV_MAX, Body, as_chunks
from nswatch.sender_child import (
    ASK,
    BACK,
    DOC,
    DONE,
    JOB,
    KEEP,
    KIND_ASK,
    KIND_BACK,
    KIND_DOC,
    KIND_DONE,
    KIND_JOB,
    KIND_KEEP,
    KIND_SELF,
    MAX_HEAD,
    MAX_MESSAGE,
    MAX_PENDING,
    SEALS,
    SELF,
    KeepLimits,
)

log = structlog.get_logger("nswatch.http")

CHILD = Path(sender_child.__file__)
_FIRST_BACKOFF = 1.0
_MAX_BACKOFF = 60.0
# A child that lived this long was not dying young: the backoff starts over.
_YOUNG = 60.0


class SharedBody:
    """A body in a sealed memfd the child can map; the descriptor closes when this is dropped."""

    __slots__ = ("__weakref__", "_closer", "fd", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._closer = weakref.finalize(self, os.close, fd)

    @classmethod
    def of(cls, body: Body) -> SharedBody:
        """``body`` copied into a new sealed memfd (OSError: no memfd, e.g. under seccomp)."""
        fd = os.memfd_create("nswatch-body", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            _write_all(fd, as_chunks(body).parts)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, len(body))

    def close(self) -> None:
        """Close the descriptor now (a job already handed over keeps its own)."""
        self._closer()


def _write_all(fd: int, parts: Sequence[bytes]) -> None:
    for start in range(0, len(parts), IOV_MAX):
        batch = parts[start : start + IOV_MAX]
        done = os.writev(fd, batch)
        # A memfd takes a whole writev unless out of memory or interrupted;
        # whatever it did not take goes part by part.
        for part in batch:
            if done >= len(part):
                done -= len(part)
                continue
            view = memoryview(part)[done:]
            done = 0
            while view:
                view = view[os.write(fd, view) :]


class SendFailed(ConnectionError):
    """The child could not send a body: the client left, or the child itself ended."""


class Spawn(Protocol):
    """Starts the child with the control socket's descriptor (tests count or break starts)."""

    def __call__(
        self, fd: int, idle: float, nice: int, keep: KeepLimits | None = None
    ) -> subprocess.Popen[bytes]: ...


def spawn_child(
    fd: int, idle: float, nice: int, keep: KeepLimits | None = None
) -> subprocess.Popen[bytes]:
    """``python -I -S sender_child.py FD IDLE NICE [KEEP…]``: no environment, no script
    directory on the path, no site (the child needs the standard library only; without
    site and dataclasses it is 11.0 MB resident at start, not 13.4)."""
    more = keep.args() if keep is not None else []
    return subprocess.Popen(
        [sys.executable, "-I", "-S", str(CHILD), str(fd), repr(idle), str(nice), *more],
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )


class BodySender:
    """Starts the sender's child, hands it jobs and wakes their tasks; one per HTTP loop.

    The child runs at ``nice`` (the serving threads' value): it serves
    readers, who must not crowd out the event loop that follows the kernel.
    Measured, the choice is within the noise: link-change p99 under 16 + 4
    readers 18.3 and 28.3 ms with the child at the daemon's own nice value,
    13.5, 22.8 and 19.3 ms at nice 10 (tests/bench/bench_readers.py,
    2026-12-05, one run each).
    """

    def __init__(
        self,
        idle: float,
        nice: int = 0,
        spawn: Spawn = spawn_child,
        clock: Callable[[], float] = time.monotonic,
        keep: KeepLimits | None = None,
    ) -> None:
        self.idle = idle
        self.nice = nice
        # With limits, the child keeps connections handed to it (keep()) and
        # asks for their documents through ``on_ask``; ``on_back`` takes back
        # those it does not answer. Both run on the HTTP loop.
        self.keep_limits = keep
        self.on_ask: Callable[[int, str, str, str], None] | None = None
        self.on_back: Callable[[socket.socket, bytes], None] | None = None
        self._spawn = spawn
        self._clock = clock
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: dict[int, asyncio.Future[None]] = {}
        self._numbers = itertools.count(1)
        self._retry_at = 0.0
        self._backoff = _FIRST_BACKOFF
        self._started_at = 0.0
        self._told = False
        self._told_privileged = False
        # Whether the child still holds a capability (None: it has not said yet).
        self.privileged: bool | None = None
        self.starts = 0
        self.sent = 0
        self.failed = 0
        self.kept = 0  # connections handed to the child to keep
        self.asked = 0  # documents the child asked for
        self.back = 0  # connections the child handed back

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> bool:
        """Start the child unless it runs or a restart is not due yet; whether it runs.

        Any thread may call this, before the HTTP loop runs too.
        """
        if self._proc is not None:
            return True
        now = self._clock()
        if now < self._retry_at:
            return False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = self._spawn(theirs.fileno(), self.idle, self.nice, self.keep_limits)
        except OSError as e:
            ours.close()
            self._retry_at = now + self._backoff
            self._backoff = min(_MAX_BACKOFF, self._backoff * 2)
            self._say("http_sender_unavailable", error=str(e))
            return False
        finally:
            theirs.close()
        ours.setblocking(False)
        self._control = ours
        self.privileged = None
        self._started_at = now
        self.starts += 1
        return True

    def ready(self) -> bool:
        """Whether jobs can be handed over now (on the HTTP loop); starts the child if due."""
        if not self.start():
            return False
        if self._loop is None:
            assert self._control is not None
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._control.fileno(), self._messages)
        return True

    async def send(self, sock: socket.socket, head: bytes, body: SharedBody) -> bool:
        """Have the child send ``head`` then ``body`` on ``sock``; False if it took no job.

        Raises :class:`SendFailed` when the job failed part-way: the
        connection must then be closed. Cancelled (the write deadline, a
        shed, shutdown), the connection is shut down, so the child's next
        send fails at once instead of holding on to a reader that stalls.
        """
        control, loop = self._control, self._loop
        if control is None or loop is None or len(head) > MAX_HEAD:
            return False
        number = next(self._numbers)
        fds = array.array("i", (sock.fileno(), body.fd))
        try:
            control.sendmsg(
                [JOB.pack(KIND_JOB, number, body.size), head],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)],
            )
        except (BlockingIOError, InterruptedError):
            return False  # a backlog of jobs: this one is sent here
        except OSError as e:
            self._lost(f"handing over a job: {e}")
            return False
        done = self._jobs[number] = loop.create_future()
        try:
            await done
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            raise
        finally:
            self._jobs.pop(number, None)
        return True

    def keeps(self) -> bool:
        """Whether a connection may be handed over to keep now (the child runs and keeps)."""
        return (
            self.keep_limits is not None
            and self._control is not None
            and self._loop is not None
            and self.on_ask is not None
        )

    def keep(self, sock: socket.socket, pending: bytes) -> bool:
        """Hand ``sock`` to the child to keep, with ``pending``, what was read of it and not
        answered; False if it did not take it (the caller keeps serving it). Once True,
        the caller closes its own descriptor and forgets the connection."""
        control = self._control
        if not self.keeps() or control is None or len(pending) > MAX_PENDING:
            return False
        rights = array.array("i", (sock.fileno(),))
        try:
            control.sendmsg(
                [KEEP.pack(KIND_KEEP), pending], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
            )
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            self._lost(f"handing over a connection: {e}")
            return False
        self.kept += 1
        return True

    def answer(self, number: int, head: bytes, body: SharedBody | None) -> None:
        """Answer the child's question ``number``: the response's head (without Date and
        the blank line) and its body, or None: the child hands its askers back."""
        control = self._control
        if control is None:
            return  # that child is gone, and its connections with it
        if body is None or len(head) > MAX_HEAD:
            message, rights = [DOC.pack(KIND_DOC, number, 0)], []
        else:
            fds = array.array("i", (body.fd,))
            message = [DOC.pack(KIND_DOC, number, body.size), head]
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
        try:
            control.sendmsg(message, rights)
        except OSError as e:
            # A full socket too: the child would wait for this answer for ever.
            self._lost(f"answering a question: {e}")

    def _messages(self) -> None:
        control = self._control
        assert control is not None
        ancillary = socket.CMSG_SPACE(array.array("i").itemsize)
        # (Until the child is lost, answering a question included.)
        while self._control is control:
            try:
                data, anc, flags, _ = control.recvmsg(MAX_MESSAGE, ancillary)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._lost(f"reading answers: {e}")
                return
            fds = array.array("i")
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
            tag = data[:1]
            if tag == KIND_BACK and len(fds) == 1 and not flags & socket.MSG_TRUNC:
                self._back(fds[0], data[BACK.size :])
                continue
            for fd in fds:
                os.close(fd)
            if tag == KIND_ASK and len(data) >= ASK.size and not flags & socket.MSG_TRUNC:
                self._ask(data)
                continue
            if tag == KIND_SELF and len(data) == SELF.size:
                self._self(*SELF.unpack(data)[1:])
                continue
            if tag != KIND_DONE or len(data) != DONE.size:
                self._lost("ended" if not data else f"a garbled message of {len(data)} bytes")
                return
            _, number, err = DONE.unpack(data)
            done = self._jobs.pop(number, None)
            if err:
                self.failed += 1
            else:
                self.sent += 1
            if done is None or done.done():
                continue  # its task was cancelled
            if err:
                done.set_exception(SendFailed(err, os.strerror(err)))
            else:
                done.set_result(None)

    def _ask(self, data: bytes) -> None:
        _, number = ASK.unpack_from(data)
        fields = data[ASK.size :].decode("latin-1").split("\0")
        if len(fields) != 4 or self.on_ask is None:
            self.answer(number, b"", None)
            return
        self.asked += 1
        self.on_ask(number, fields[0], fields[1], fields[2])

    def _self(self, euid: int, privileged: bool) -> None:
        self.privileged = privileged
        if privileged and not self._told_privileged:
            # Once per daemon: a restarted child meets the same refusal.
            self._told_privileged = True
            log.warning(
                "http_sender_privileged",
                pid=self.pid,
                euid=euid,
                hint="the body sender could neither become nobody nor give up its "
                "capabilities (setresuid and capset refused); it sends bodies only",
            )

    def _back(self, fd: int, pending: bytes) -> None:
        self.back += 1
        sock = socket.socket(fileno=fd)
        if self.on_back is None:
            sock.close()
            return
        self.on_back(sock, pending)

    def _lost(self, why: str) -> None:
        """The child is gone (or must go): fail its jobs; restart later."""
        code = self._stop_child(kill=True)
        now = self._clock()
        if now - self._started_at >= _YOUNG:
            self._backoff = _FIRST_BACKOFF
        self._retry_at = now + self._backoff
        self._backoff = min(_MAX_BACKOFF, self._backoff * 2)
        log.warning("http_sender_exited", why=why, returncode=code, retry_in=self._retry_at - now)
        jobs, self._jobs = self._jobs, {}
        for done in jobs.values():
            if not done.done():
                done.set_exception(SendFailed(errno.ECONNABORTED, "the sender's child ended"))

    def _stop_child(self, kill: bool = False) -> int | None:
        control, proc, loop = self._control, self._proc, self._loop
        self._control = self._proc = self._loop = None
        if control is not None:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(control.fileno())
            control.close()
        if proc is None:
            return None
        if kill:
            proc.kill()  # gone already, or not to be trusted: either way not waited for
        # Else it ends by itself once its end of the pair reads end-of-file.
        try:
            return proc.wait(1)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def close(self) -> None:
        """Stop the child (jobs under way end with their connections)."""
        self._stop_child()
        jobs, self._jobs = self._jobs, {}
        for done in jobs.values():
            if not done.done():
                done.cancel()

    def _say(self, event: str, **fields: object) -> None:
        # Said once at warning; each later retry only at debug.
        if self._told:
            log.debug(event, **fields)
        else:
            self._told = True
            log.warning(event, **fields, hint="bodies are sent by the HTTP thread meanwhile")
