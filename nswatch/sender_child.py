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
job's number, the body's length and the response head. It sends head and
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

# A job: its number and the body's length, then the response head; two
# descriptors ride along (the connection, then the memfd).
JOB = struct.Struct("<QQ")
# An answer: the job's number and 0 (sent) or the errno that ended it.
DONE = struct.Struct("<QI")
# The longest head a job may carry (a longer one is sent by the daemon itself).
MAX_HEAD = 32 * 1024
_FDS = 2
_ANCILLARY = socket.CMSG_SPACE(_FDS * struct.calcsize("i"))
# A sealed memfd cannot shrink under a mapping (which would make reading it SIGBUS).
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_NOBODY = 65534
# At most this much per send: with 16 readers each socket took up to 4 MB
# at once, so a round of sends, and a new job's wait for its first byte,
# lasted tens of milliseconds.
MAX_SEND = 1 << 20


class _Map:
    __slots__ = ("mm", "refs", "view")

    def __init__(self, fd: int, size: int) -> None:
        # Populated at once: one fault walk instead of one fault per page sent.
        self.mm = mmap.mmap(
            fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ
        )
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

    def take(self, fd: int, length: int) -> tuple[int, memoryview]:
        """The first ``length`` bytes of the memfd ``fd`` (which the caller still closes)."""
        st = os.fstat(fd)
        if length > st.st_size or fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS != SEALS:
            raise OSError(errno.EINVAL, "not a sealed body of that length")
        m = self._maps.get(st.st_ino)
        if m is None:
            m = self._maps[st.st_ino] = _Map(fd, st.st_size)
        m.refs += 1
        self._newest = st.st_ino
        self._trim()
        return st.st_ino, m.view[:length]

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
    __slots__ = ("at", "body", "head", "ino", "number", "sock")

    def __init__(
        self, number: int, sock: socket.socket, head: memoryview, body: memoryview, ino: int
    ) -> None:
        self.number = number
        self.sock = sock
        self.head = head
        self.body = body
        self.ino = ino
        self.at = 0  # bytes sent, head first


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
                data, anc, flags, _ = self.control.recvmsg(JOB.size + MAX_HEAD, _ANCILLARY)
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
            if (
                len(data) < JOB.size
                or len(fds) != _FDS
                or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
            ):
                # Only the daemon writes here: a garbled job is a bug there.
                # Its connection cannot be answered for, so end and be restarted.
                for fd in fds:
                    os.close(fd)
                print("nswatch sender: garbled job; exiting", file=sys.stderr, flush=True)
                return False
            number, length = JOB.unpack_from(data)
            self._start(number, length, data[JOB.size :], fds[0], fds[1])

    def _start(self, number: int, length: int, head: bytes, conn: int, memfd: int) -> None:
        try:
            ino, body = self.maps.take(memfd, length)
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
        try:
            head = len(job.head)
            if job.at < head:
                job.at += job.sock.sendmsg([job.head[job.at :], job.body[:MAX_SEND]])
            else:
                at = job.at - head
                job.at += job.sock.send(job.body[at : at + MAX_SEND])
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._end(job, e.errno or errno.EIO, fresh)
            return
        if job.at == len(job.head) + len(job.body):
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
        job.body.release()
        job.head.release()
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
    """Become nobody if allowed, and hold no capability: this process needs no privilege.

    The descriptors it is handed work whoever it is. Under the systemd
    unit the seccomp filter refuses setresuid (EPERM, and the unit's
    bounding set has no CAP_SETUID anyway): it then stays uid 0, but gives
    up every capability it inherited (CAP_SYS_ADMIN, CAP_NET_ADMIN,
    CAP_SYS_PTRACE under the unit), which the unit lets it do (``capset``).
    """
    if os.geteuid() != 0:
        return
    with contextlib.suppress(PermissionError):
        os.setgroups([])
        os.setresgid(_NOBODY, _NOBODY, _NOBODY)
        os.setresuid(_NOBODY, _NOBODY, _NOBODY)
    if os.geteuid() == 0:
        drop_capabilities()


# capset(2): _LINUX_CAPABILITY_VERSION_3 takes two 32-bit words per set.
_CAP_VERSION_3 = 0x20080522
_PR_SET_NO_NEW_PRIVS = 38


def drop_capabilities() -> bool:
    """Empty this process's effective, permitted and inheritable capabilities (any process
    may lower its own) for good; whether that was done (a seccomp filter may refuse capset).

    uid 0 regains every capability of the bounding set when it execs,
    unless no_new_privs is set (then an exec may not add to the permitted
    set): it is set first (the unit sets it too, NoNewPrivileges=).
    """
    import ctypes  # only here: 0.7 MB of RSS this process needs nowhere else

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # all zero: no capability in any set
    return bool(libc.capset(header, data) == 0)


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
