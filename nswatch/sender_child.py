"""The body sender's child process: sends big response bodies from shared memory.

The daemon's HTTP thread shares one GIL with the event loop, the renders
and the /metrics thread: every send it makes waits for that lock again
when the system call returns. With 16 readers looping on a 6.7 MB state,
that serial sending was the limit (the machine stayed a quarter idle; the
state GET's p99 was 140-210 ms), while one Python process doing nothing
but sending the same bytes from memory served more GETs at a fifth of that
p99 (tests/bench/bench_readers.py). So the daemon hands each big body to
this process, which has a GIL of its own (:mod:`nswatch.sender` is the
daemon's side).

Over a ``SOCK_SEQPACKET`` socket pair it takes jobs: the client's
connection and a sealed memfd holding the body (``SCM_RIGHTS``), with the
job's number, where in the memfd the body lies (one or more extents, in
order: the daemon writes successive versions of the state into one memfd,
each part once, so a version is its parts wherever they were written) and
the response head. It sends head and
body, many connections at once from one epoll loop (each gets what its
socket takes, in turn), closes its copy of the connection, and answers
the job's number with 0 or the errno that ended it. The daemon keeps the
connection and reads the next request once the answer arrives.

It reads nothing from clients, imports only the standard library (this
file is run by path in isolated mode, without site: ``python -I -S
sender_child.py FD IDLE NICE``)
and ends when the daemon's end of the pair closes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import selectors
import socket
import struct
import sys

# A job: its number and how many extents the body has, then the extents
# (offset and length in the memfd, in body order), then the response head;
# two descriptors ride along (the connection, then the memfd).
JOB = struct.Struct("<QI")
EXTENT = struct.Struct("<QQ")
# The most extents a job may carry (the daemon starts a new memfd before a
# version would need more).
MAX_EXTENTS = 1024
# An answer: the job's number and 0 (sent) or the errno that ended it.
DONE = struct.Struct("<QI")
# The longest head a job may carry (a longer one is sent by the daemon itself).
MAX_HEAD = 32 * 1024
_FDS = 2
_ANCILLARY = socket.CMSG_SPACE(_FDS * struct.calcsize("i"))
# A sealed memfd cannot shrink under a mapping (which would make reading it
# SIGBUS): every body's memfd has at least MAPPABLE. A body of its own is
# sealed whole (SEALS); a memfd that versions are written into is not
# sealed against writes, but the daemon only ever writes where no extent
# it has handed over lies.
MAPPABLE = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
SEALS = MAPPABLE | fcntl.F_SEAL_WRITE
_NOBODY = 65534
# At most this much per send: with 16 readers each socket took up to 4 MB
# at once, so a round of sends, and a new job's wait for its first byte,
# lasted tens of milliseconds.
MAX_SEND = 1 << 20
# Buffers per send at most (Linux takes up to 1024).
_IOV = 256
_MAX_JOB = JOB.size + MAX_EXTENTS * EXTENT.size + MAX_HEAD


class _Map:
    __slots__ = ("mm", "refs", "view")

    def __init__(self, fd: int, size: int, whole: bool) -> None:
        # A body of its own is populated at once: one fault walk instead of
        # one fault per page sent. A memfd of versions is not: most of it is
        # not written yet, and a read fault on a hole in shared memory
        # allocates a page; its pages are faulted in as first sent, and stay.
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if whole else 0)
        self.mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
        self.view = memoryview(self.mm)
        self.refs = 0

    def release(self) -> None:
        self.view.release()
        self.mm.close()


class Maps:
    """Mapped bodies by memfd inode: each version of a document is mapped once.

    A body is unmapped as soon as no job sends it, except the one taken last
    while nothing else is being sent: that one stays mapped for the next
    reader of that version (one reader polling costs no mapping per GET)
    until the sender has been idle for a while. Kept while other bodies
    were being sent, it held one more whole body in the peak RSS (a state
    at 1,000 namespaces is 6.7 MB).
    """

    def __init__(self) -> None:
        self._maps: dict[int, _Map] = {}
        self._newest: int | None = None

    def __len__(self) -> int:
        return len(self._maps)

    def take(self, fd: int, extents: list[tuple[int, int]]) -> tuple[int, list[memoryview]]:
        """The ``(offset, length)`` extents of the memfd ``fd`` (which the caller still closes)."""
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if seals & MAPPABLE != MAPPABLE or any(
            off < 0 or n < 0 or off + n > st.st_size for off, n in extents
        ):
            raise OSError(errno.EINVAL, "not a sealed body of that length")
        m = self._maps.get(st.st_ino)
        if m is None:
            m = self._maps[st.st_ino] = _Map(fd, st.st_size, seals & SEALS == SEALS)
        m.refs += 1
        self._newest = st.st_ino
        self._trim()
        return st.st_ino, [m.view[off : off + n] for off, n in extents if n]

    def done(self, ino: int) -> None:
        """A job sending ``ino`` ended (its view of the body released)."""
        self._maps[ino].refs -= 1
        self._trim()

    def idle(self) -> None:
        """Unmap everything no job sends (the newest too)."""
        self._newest = None
        self._trim()

    def _trim(self) -> None:
        sending = any(m.refs for m in self._maps.values())
        for ino, m in list(self._maps.items()):
            if m.refs == 0 and (ino != self._newest or sending):
                del self._maps[ino]
                m.release()


class _Job:
    # A plain class: importing dataclasses costs this process 1.9 MB of RSS.
    __slots__ = ("at", "bufs", "ino", "number", "sock", "upto")

    def __init__(
        self, number: int, sock: socket.socket, head: memoryview, body: list[memoryview], ino: int
    ) -> None:
        self.number = number
        self.sock = sock
        # The head, then the body's extents: sent in order.
        self.bufs = [head, *body] if head else body
        self.ino = ino
        self.upto = 0  # the first buffer not wholly sent
        self.at = 0  # bytes of it sent

    def pieces(self, most: int) -> list[memoryview]:
        """What is left to send, up to ``most`` bytes (and IOV_MAX buffers)."""
        out: list[memoryview] = []
        bufs, i, at = self.bufs, self.upto, self.at
        while most > 0 and i < len(bufs) and len(out) < _IOV:
            piece = bufs[i][at : at + most]
            out.append(piece)
            most -= len(piece)
            i, at = i + 1, 0
        return out

    def sent(self, n: int) -> bool:
        """Counts ``n`` more bytes sent; whether all is."""
        bufs = self.bufs
        while n:
            left = len(bufs[self.upto]) - self.at
            if n < left:
                self.at += n
                break
            n -= left
            self.upto, self.at = self.upto + 1, 0
        return self.upto == len(bufs)

    def release(self) -> None:
        for b in self.bufs:
            b.release()


class Child:
    """The epoll loop: takes jobs, sends them, answers."""

    def __init__(self, control: socket.socket, idle: float) -> None:
        self.control = control
        self.idle = idle
        self.maps = Maps()
        self.jobs: dict[int, _Job] = {}  # by the connection's descriptor here
        self.sel = selectors.DefaultSelector()
        self._outbox: list[bytes] = []
        self._waiting_to_write = False

    def run(self) -> int:
        """Until the daemon closes its end (0)."""
        self.control.setblocking(False)
        self.sel.register(self.control, selectors.EVENT_READ)
        while True:
            timeout = self.idle if not self.jobs and len(self.maps) else None
            events = self.sel.select(timeout)
            if not events and not self.jobs:
                self.maps.idle()
            # New jobs first: their first bytes go out in this round, not the next.
            events.sort(key=lambda e: e[0].fileobj is not self.control)
            for key, mask in events:
                if key.fileobj is not self.control:
                    # (A job that ended earlier in this round is not sent to.)
                    job = self.jobs.get(key.fd)
                    if job is not None and job is key.data:
                        self._send(job)
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._flush()
                if mask & selectors.EVENT_READ and not self._take():
                    return 0

    def _take(self) -> bool:
        """Start every job waiting on the control socket; False once the daemon has gone."""
        while True:
            try:
                data, anc, flags, _ = self.control.recvmsg(_MAX_JOB, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return True
            except ConnectionError:
                return False
            fds: list[int] = []
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    n = len(raw) // struct.calcsize("i")
                    fds.extend(struct.unpack(f"{n}i", raw[: n * struct.calcsize("i")]))
            if not data:
                for fd in fds:
                    os.close(fd)
                return False
            count = JOB.unpack_from(data)[1] if len(data) >= JOB.size else 0
            if (
                len(data) < JOB.size + count * EXTENT.size
                or count > MAX_EXTENTS
                or len(fds) != _FDS
                or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
            ):
                # Only the daemon writes here: a garbled job is a bug there.
                # Its connection cannot be answered for, so end and be restarted.
                for fd in fds:
                    os.close(fd)
                print("nswatch sender: garbled job; exiting", file=sys.stderr, flush=True)
                return False
            number = JOB.unpack_from(data)[0]
            end = JOB.size + count * EXTENT.size
            extents = list(EXTENT.iter_unpack(data[JOB.size : end]))
            self._start(number, extents, data[end:], fds[0], fds[1])

    def _start(
        self, number: int, extents: list[tuple[int, int]], head: bytes, conn: int, memfd: int
    ) -> None:
        try:
            ino, body = self.maps.take(memfd, extents)
        except (OSError, ValueError) as e:
            os.close(conn)
            self._answer(number, getattr(e, "errno", None) or errno.EINVAL)
            return
        finally:
            os.close(memfd)
        # The descriptor shares its open file with the daemon's, O_NONBLOCK
        # included (asyncio set it): never make it blocking here.
        sock = socket.socket(fileno=conn)
        job = _Job(number, sock, memoryview(head), body, ino)
        self.jobs[sock.fileno()] = job
        self._send(job, fresh=True)

    def _send(self, job: _Job, fresh: bool = False) -> None:
        """One send of what ``job`` has left; ends the job when nothing is left or it failed."""
        done = job.upto == len(job.bufs)  # an empty body
        try:
            if not done:
                done = job.sent(job.sock.sendmsg(job.pieces(MAX_SEND)))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._end(job, e.errno or errno.EIO, fresh)
            return
        if done:
            self._end(job, 0, fresh)
        elif fresh:
            self.sel.register(job.sock, selectors.EVENT_WRITE, job)

    def _end(self, job: _Job, err: int, fresh: bool) -> None:
        fd = job.sock.fileno()
        del self.jobs[fd]
        if not fresh:
            self.sel.unregister(job.sock)
        # Closed before the answer: once the daemon reads it, the connection is its alone.
        job.sock.close()
        job.release()
        self.maps.done(job.ino)
        self._answer(job.number, err)

    def _answer(self, number: int, err: int) -> None:
        self._outbox.append(DONE.pack(number, err))
        if len(self._outbox) == 1:
            self._flush()

    def _flush(self) -> None:
        while self._outbox:
            try:
                self.control.send(self._outbox[0])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # The daemon went away: _take sees it next.
                self._outbox.clear()
                break
            self._outbox.pop(0)
        if bool(self._outbox) != self._waiting_to_write:
            self._waiting_to_write = bool(self._outbox)
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._outbox else 0)
            self.sel.modify(self.control, events)


def drop_privileges() -> None:
    """Become nobody if allowed: this process needs no privilege at all.

    The descriptors it is handed work whoever it is. Under the systemd
    unit the seccomp filter refuses setresuid (EPERM): it then keeps the
    unit's confinement, which is already tight.
    """
    if os.geteuid() != 0:
        return
    with contextlib.suppress(PermissionError):
        os.setgroups([])
        os.setresgid(_NOBODY, _NOBODY, _NOBODY)
        os.setresuid(_NOBODY, _NOBODY, _NOBODY)


def main(argv: list[str] | None = None) -> int:
    """``FD IDLE NICE``: the control socket's descriptor, seconds idle before unmapping,
    and the nice value to run at (raised to it if lower; never lowered)."""
    args = sys.argv[1:] if argv is None else argv
    control = socket.socket(fileno=int(args[0]))
    with contextlib.suppress(OSError):
        if int(args[2]) > os.getpriority(os.PRIO_PROCESS, 0):
            os.setpriority(os.PRIO_PROCESS, 0, int(args[2]))
    drop_privileges()
    try:
        return Child(control, float(args[1])).run()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
