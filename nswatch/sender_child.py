"""The body sender's child process: sends big response bodies from shared memory,
and answers the next requests of the connections the daemon lets it keep.

The daemon's HTTP thread shares one GIL with the event loop, the renders
and the /metrics thread: every send it makes waits for that lock again
when the system call returns. With 16 readers looping on a 6.7 MB state,
that serial sending was the limit (the machine stayed a quarter idle; the
state GET's p99 was 140-210 ms), while one Python process doing nothing
but sending the same bytes from memory served more GETs at a fifth of that
p99 (tests/bench/bench_readers.py). So the daemon hands each big body to
this process, which has a GIL of its own (:mod:`nswatch.sender` is the
daemon's side).

Over a ``SOCK_SEQPACKET`` socket pair, every message led by its kind:

- ``S`` (self), its first: the user it runs as and whether it still holds
  a capability (it could neither become nobody nor drop them), which the
  daemon logs, as this process has no log of its own.
- ``J`` (job): the client's connection and a sealed memfd holding the body
  (``SCM_RIGHTS``), with the job's number, the body's length and the
  response head. It sends head and body, many connections at once from one
  epoll loop (a round at a time: see Child._send_round), closes its copy of
  the connection, and answers ``D`` with the job's number and 0 or the errno
  that ended it. The daemon keeps the connection and reads the next request
  once the answer arrives.
- ``K`` (keep): a keep-alive connection that has just been answered a
  document (``/metrics``, ``/api/v1/state``), with whatever the daemon read
  of it beyond that request. The connection is now this process's: it reads
  the next requests itself, and each plain ``GET`` of those documents
  (nothing a header could change the meaning of: no body, no password, no
  validator) is asked of the daemon (``A``: the path, ``Accept`` and
  ``Accept-Encoding``; one question for all the readers of the same
  document at once). The daemon answers ``O`` with the document's head and
  memfd (made once per model version, as for its own readers), and the body
  is sent from here. Anything else (another path, a malformed or slow head,
  a refusal from the daemon) goes back to the daemon with the bytes read
  (``B``), which answers it as any request, on the same connection.

  Why: with 4 scrapers and 16 state readers looping, the daemon's HTTP
  thread spent most of its time parsing requests and sending /metrics, and
  every one of those steps took the GIL the event loop needs. A kept
  connection costs the daemon one small question per request.

It imports only the standard library (this file is run by path in isolated
mode, without site: ``python -I -S sender_child.py FD IDLE NICE [KEEP]``)
and ends when the daemon's end of the pair closes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import mmap
import os
import selectors
import socket
import struct
import sys
import time

# A job: its number and the body's length, then the response head; two
# descriptors ride along (the connection, then the memfd).
JOB = struct.Struct("<cQQ")
# An answer: the job's number and 0 (sent) or the errno that ended it.
DONE = struct.Struct("<cQI")
# A connection to keep (one descriptor), then the bytes read from it beyond
# the request just answered.
KEEP = struct.Struct("<c")
# A question for a document: its number, then path, Accept and Accept-Encoding
# (latin-1, each ended by NUL).
ASK = struct.Struct("<cQ")
# The answer: the question's number and the body's length, then the head
# without Date and the blank line; with a memfd, or none: not answered here
# (the connections asking go back to the daemon).
DOC = struct.Struct("<cQQ")
# A connection handed back (one descriptor), then the bytes read from it
# that no answer has consumed.
BACK = struct.Struct("<c")
# The child's first message: the user it runs as, and whether it still holds
# any capability (it could neither become nobody nor drop them).
SELF = struct.Struct("<cI?")
KIND_JOB, KIND_DONE, KIND_KEEP, KIND_ASK, KIND_DOC, KIND_BACK = b"J", b"D", b"K", b"A", b"O", b"B"
KIND_SELF = b"S"
# The longest head a job may carry (a longer one is sent by the daemon itself).
MAX_HEAD = 32 * 1024
_FDS = 2
_ANCILLARY = socket.CMSG_SPACE(_FDS * struct.calcsize("i"))
# The most a kept connection may have read and not answered: a longer
# request (or a client sending ahead) goes back to the daemon, whose limits
# say what it gets. Also the most a K or B message carries.
MAX_PENDING = 64 * 1024
# A control message is at most a head or pending bytes, and a few numbers.
MAX_MESSAGE = 64 + max(MAX_HEAD, MAX_PENDING)
# A sealed memfd cannot shrink under a mapping (which would make reading it SIGBUS).
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_NOBODY = 65534
# At most this much per send: with 16 readers each socket took up to 4 MB
# at once, so a round of sends, and a new job's wait for its first byte,
# lasted tens of milliseconds.
MAX_SEND = 1 << 20
# At most this much is sent in one round of the loop, to the connections
# that took the least lately first (Child._send_round).
ROUND = 2 << 20
# How fast a connection's past sends are forgotten in that order.
LOAD_HALF_LIFE = 1.0
# ... but a body not sent to for this long goes first.
STARVED = 0.05


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
    __slots__ = ("at", "body", "head", "ino", "kept", "last", "number", "sock")

    def __init__(
        self,
        number: int,
        sock: socket.socket,
        head: memoryview,
        body: memoryview,
        ino: int,
        kept: _Kept | None = None,
    ) -> None:
        self.number = number
        self.sock = sock
        self.head = head
        self.body = body
        self.ino = ino
        self.at = 0  # bytes sent, head first
        self.kept = kept  # the kept connection it answers (None: the daemon's job)
        self.last = time.monotonic()  # when it was last sent to (or began)


class KeepLimits:
    """What a kept connection is allowed: the daemon's own limits (http.Limits)."""

    __slots__ = ("cap", "head_timeout", "idle_timeout", "max_head", "write_timeout")

    def __init__(
        self,
        cap: int,
        idle_timeout: float,
        head_timeout: float,
        write_timeout: float,
        max_head: int,
    ) -> None:
        self.cap = cap
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.write_timeout = write_timeout
        self.max_head = max_head

    def args(self) -> list[str]:
        """As the child's command line takes them."""
        return [
            str(self.cap),
            repr(self.idle_timeout),
            repr(self.head_timeout),
            repr(self.write_timeout),
            str(self.max_head),
        ]

    @classmethod
    def parse(cls, args: list[str]) -> KeepLimits:
        """The inverse of :meth:`args`."""
        cap, idle, head, write, max_head = args
        return cls(int(cap), float(idle), float(head), float(write), int(max_head))


# Kept connections' phases.
IDLE, HEAD, ASKED, SENDING = "idle", "head", "asked", "sending"

# The documents answered here, as their request line names them.
SERVED = (b"/metrics", b"/api/v1/state")
# Headers that change what a GET means to the daemon (a body, a password,
# a validator, a protocol switch, a stream position): such a request is
# the daemon's to answer.
_THE_DAEMONS = frozenset(
    (
        b"authorization",
        b"content-length",
        b"expect",
        b"if-none-match",
        b"last-event-id",
        b"transfer-encoding",
        b"upgrade",
    )
)
_TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Bytes no header line may hold (h11 refuses them; the daemon says how).
_BAD_IN_LINE = bytes(range(0, 9)) + bytes(range(10, 32)) + b"\x7f"


def plain_get(head: bytes) -> tuple[bytes, str, str, bool] | None:
    """``head`` (a request's head without its blank line) if it is a plain GET of a
    document answered here: (path, Accept, Accept-Encoding, whether the client asked
    to close). None: the daemon answers it, garbled or not.

    Strict on purpose: whatever is not plainly one of these requests goes
    to the daemon's parser (h11), which knows every rule and says 400 or
    431 as it does to any client.
    """
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target, _, version = rest.partition(b" ")
    if method != b"GET" or version != b"HTTP/1.1" or target not in SERVED:
        return None
    seen: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if (
            not colon
            or not name
            or name.translate(None, _TOKEN)
            or line.translate(None, _BAD_IN_LINE) != line
        ):
            return None
        key = name.lower()
        if key in _THE_DAEMONS or key in seen:
            return None
        seen[key] = value.strip(b" \t")
    if b"host" not in seen:
        return None  # HTTP/1.1 requires it: the daemon says 400
    connection = [t.strip().lower() for t in seen.get(b"connection", b"").split(b",")]
    if b"upgrade" in connection:
        return None
    return (
        target,
        seen.get(b"accept", b"").decode("latin-1"),
        seen.get(b"accept-encoding", b"").decode("latin-1"),
        b"close" in connection,
    )


class _Kept:
    """A connection this process keeps between requests."""

    __slots__ = (
        "close_after",
        "consumed",
        "load",
        "load_at",
        "pending",
        "phase",
        "since",
        "sock",
        "watched",
    )

    def __init__(self, sock: socket.socket, pending: bytes, now: float) -> None:
        self.sock = sock
        self.pending = bytearray(pending)  # read, not yet answered
        self.phase = IDLE
        self.since = now  # when the phase began
        self.consumed = 0  # bytes of ``pending`` the request being answered took
        self.close_after = False
        self.watched = 0  # the events the selector watches for it (0: not registered)
        # Bytes sent lately, halved every LOAD_HALF_LIFE seconds (as of load_at).
        self.load = 0.0
        self.load_at = now

    def load_now(self, now: float) -> float:
        """:attr:`load` as of ``now``."""
        return self.load * float(2.0 ** ((self.load_at - now) / LOAD_HALF_LIFE))

    def took(self, sent: int) -> None:
        """``sent`` more bytes went to this connection."""
        now = time.monotonic()
        self.load = self.load_now(now) + sent
        self.load_at = now


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def imf_fixdate(now: float) -> bytes:
    """The Date header's value for ``now`` (RFC 9110 5.6.7's IMF-fixdate), in English
    whatever the locale: the daemon's responses and the child's spell it alike."""
    t = time.gmtime(now)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    ).encode()


class Child:
    """The epoll loop: takes jobs and kept connections, sends, answers."""

    def __init__(self, control: socket.socket, idle: float, keep: KeepLimits | None = None) -> None:
        self.control = control
        self.idle = idle
        self.keep = keep
        self.maps = Maps()
        # Bodies being sent: the daemon's jobs by the connection's descriptor
        # here, the answers to kept connections by its negation.
        self.jobs: dict[int, _Job] = {}
        self.kept: dict[int, _Kept] = {}  # by descriptor
        self.sel = selectors.DefaultSelector()
        self._outbox: list[bytes] = []
        self._waiting_to_write = False
        self._asks = itertools.count(1)
        self._asking: dict[tuple[bytes, str, str], tuple[int, list[_Kept]]] = {}
        self._asked: dict[int, tuple[bytes, str, str]] = {}
        self._date = (0, b"")
        self._swept = time.monotonic()

    def run(self) -> int:
        """Until the daemon closes its end (0); every connection it holds is closed then."""
        try:
            return self._run()
        finally:
            for kept in list(self.kept.values()):
                self._close(kept)
            for job in self.jobs.values():
                job.sock.close()
            self.sel.close()
            self.control.close()

    def _run(self) -> int:
        self.control.setblocking(False)
        self.sel.register(self.control, selectors.EVENT_READ)
        while True:
            if self.kept:
                timeout: float | None = 1.0
            elif not self.jobs and len(self.maps):
                timeout = self.idle
            else:
                timeout = None
            events = self.sel.select(timeout)
            if not events and not self.jobs:
                self.maps.idle()
            # New jobs first: their first bytes go out in this round, not the next.
            events.sort(key=lambda e: e[0].fileobj is not self.control)
            writable: list[_Job] = []
            for key, mask in events:
                data = key.data
                if key.fileobj is self.control:
                    if mask & selectors.EVENT_WRITE:
                        self._flush()
                    if mask & selectors.EVENT_READ and not self._take():
                        return 0
                elif isinstance(data, _Kept):
                    # (One closed or handed back earlier in this round is left alone.)
                    if self.kept.get(key.fd) is not data:
                        continue
                    if data.phase != SENDING:
                        self._kept_ready(data)
                        continue
                    job = self.jobs.get(-key.fd)
                    if job is not None and mask & selectors.EVENT_WRITE:
                        writable.append(job)
                else:
                    job = self.jobs.get(key.fd)
                    if job is not None and job is data:
                        writable.append(job)
            if writable:
                self._send_round(writable)
            if self.kept:
                self._sweep()

    def _take(self) -> bool:
        """Handle every message waiting on the control socket; False once the daemon has gone."""
        while True:
            try:
                data, anc, flags, _ = self.control.recvmsg(MAX_MESSAGE, _ANCILLARY)
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
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                data = b""  # garbled, below
            tag = data[:1]
            if tag == KIND_JOB and len(data) >= JOB.size and len(fds) == _FDS:
                _, number, length = JOB.unpack_from(data)
                self._start(number, length, data[JOB.size :], fds[0], fds[1])
            elif tag == KIND_KEEP and len(fds) == 1 and self.keep is not None:
                self._adopt(fds[0], data[KEEP.size :])
            elif tag == KIND_DOC and len(data) >= DOC.size and len(fds) <= 1:
                _, number, length = DOC.unpack_from(data)
                self._doc(number, length, data[DOC.size :], fds[0] if fds else None)
            else:
                # Only the daemon writes here: a garbled message is a bug there.
                # Its connections cannot be answered for, so end and be restarted.
                for fd in fds:
                    os.close(fd)
                print("nswatch sender: garbled message; exiting", file=sys.stderr, flush=True)
                return False

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

    def _send_round(self, writable: list[_Job]) -> None:
        """Send to the writable connections, those that took the least lately first, until
        :data:`ROUND` bytes went out; the others wait for the next round (their sockets
        stay writable, so that comes at once).

        A sparse reader (a scraper, a client asking now and then) is thus
        served nearly as if alone, while readers looping as fast as they can
        share what is left, as fq_codel favours sparse flows (RFC 8290).
        Sent in turn instead, one of 17 readers of a 6.7 MB state got its
        body in 33 ms at the median, 68 at the p99 (tests/bench/bench_readers.py).
        """
        now = time.monotonic()

        def turn(job: _Job) -> tuple[int, float]:
            # A job passed over for STARVED goes first, the longest passed over
            # first: each body under way keeps its version mapped here, and
            # readers left waiting behind sparser ones held up to five 6.7 MB
            # versions at once.
            if now - job.last > STARVED:
                return (0, job.last)
            return (1, job.kept.load_now(now) if job.kept is not None else 0.0)

        writable.sort(key=turn)
        budget = ROUND
        for job in writable:
            # (A job that ended earlier in this round is not sent to.)
            fd = job.sock.fileno()
            if self.jobs.get(-fd if job.kept is not None else fd) is not job:
                continue
            budget -= self._send(job)
            if budget <= 0:
                break

    def _send(self, job: _Job, fresh: bool = False) -> int:
        """One send of what ``job`` has left (how much went); ends the job when nothing is
        left or it failed."""
        sent = 0
        try:
            head = len(job.head)
            if job.at < head:
                sent = job.sock.sendmsg([job.head[job.at :], job.body[:MAX_SEND]])
            else:
                at = job.at - head
                sent = job.sock.send(job.body[at : at + MAX_SEND])
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._end(job, e.errno or errno.EIO, fresh)
            return 0
        job.at += sent
        if sent:
            job.last = time.monotonic()
        if job.kept is not None:
            job.kept.took(sent)
        if job.at == len(job.head) + len(job.body):
            self._end(job, 0, fresh)
        elif fresh:
            if job.kept is not None:
                self._watch(job.kept, selectors.EVENT_WRITE)
            else:
                self.sel.register(job.sock, selectors.EVENT_WRITE, job)
        return sent

    def _end(self, job: _Job, err: int, fresh: bool) -> None:
        job.body.release()
        job.head.release()
        self.maps.done(job.ino)
        kept = job.kept
        if kept is not None:
            self._answered(kept, err)
            return
        fd = job.sock.fileno()
        del self.jobs[fd]
        if not fresh:
            self.sel.unregister(job.sock)
        # Closed before the answer: once the daemon reads it, the connection is its alone.
        job.sock.close()
        self._answer(job.number, err)

    def _answer(self, number: int, err: int) -> None:
        self._post(DONE.pack(KIND_DONE, number, err))

    def _post(self, message: bytes, fds: list[int] | None = None) -> None:
        """Queue ``message`` to the daemon. Descriptors go at once or not at all (a
        queued one would have to stay open): the caller may close its own after."""
        if fds:
            with contextlib.suppress(OSError):
                rights = struct.pack(f"{len(fds)}i", *fds)
                self.control.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            return
        self._outbox.append(message)
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

    # Kept connections.

    def _adopt(self, fd: int, pending: bytes) -> None:
        assert self.keep is not None
        sock = socket.socket(fileno=fd)  # non-blocking already (shared with the daemon's)
        now = time.monotonic()
        if len(self.kept) >= self.keep.cap:
            idle = [k for k in self.kept.values() if k.phase == IDLE]
            if not idle:
                self._back(_Kept(sock, pending, now))
                return
            # At the cap the longest idle goes first, as in the daemon.
            self._close(min(idle, key=lambda k: k.since))
        kept = _Kept(sock, pending, now)
        self.kept[fd] = kept
        self._watch(kept, selectors.EVENT_READ)
        self._next(kept)

    def _watch(self, kept: _Kept, events: int) -> None:
        """Have the selector watch ``kept`` for ``events`` (0: for nothing)."""
        if events == kept.watched:
            return
        if not events:
            self.sel.unregister(kept.sock)
        elif kept.watched:
            self.sel.modify(kept.sock, events, kept)
        else:
            self.sel.register(kept.sock, events, kept)
        kept.watched = events

    def _kept_ready(self, kept: _Kept) -> None:
        """Read what ``kept`` has for us (it is not being answered)."""
        try:
            data = kept.sock.recv(MAX_PENDING - len(kept.pending) or 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(kept)
            return
        if not data:
            self._close(kept)
            return
        if kept.phase == IDLE:
            kept.phase, kept.since = HEAD, time.monotonic()
        kept.pending += data
        self._next(kept)

    def _next(self, kept: _Kept) -> None:
        """Start answering the request ``kept`` has read, if it has read one whole."""
        assert self.keep is not None
        if not kept.pending:
            kept.phase, kept.since = IDLE, time.monotonic()
            return
        if kept.phase == IDLE:
            kept.phase, kept.since = HEAD, time.monotonic()
        end = kept.pending.find(b"\r\n\r\n", 0, self.keep.max_head + 4)
        if end < 0:
            if len(kept.pending) > self.keep.max_head:
                self._back(kept)
            return
        request = plain_get(bytes(kept.pending[:end]))
        if request is None:
            self._back(kept)
            return
        path, accept, encoding, close = request
        kept.consumed = end + 4
        kept.close_after = close
        kept.phase, kept.since = ASKED, time.monotonic()
        # Nothing more is read until this request is answered (the next one
        # may already be in ``pending``, or on its way).
        self._watch(kept, 0)
        key = (path, accept, encoding)
        asking = self._asking.get(key)
        if asking is not None:
            asking[1].append(kept)
            return
        number = next(self._asks)
        question = b"%s\0%s\0%s\0" % (path, accept.encode("latin-1"), encoding.encode("latin-1"))
        self._asking[key] = (number, [kept])
        self._asked[number] = key
        self._post(ASK.pack(KIND_ASK, number) + question)

    def _doc(self, number: int, length: int, head: bytes, memfd: int | None) -> None:
        key = self._asked.pop(number, None)
        waiting = self._asking.pop(key)[1] if key is not None else []
        try:
            for kept in waiting:
                if self.kept.get(kept.sock.fileno()) is not kept or kept.phase != ASKED:
                    continue
                if memfd is None:
                    self._back(kept)
                    continue
                try:
                    ino, body = self.maps.take(memfd, length)
                except (OSError, ValueError):
                    self._back(kept)
                    continue
                self._respond(kept, head, body, ino)
        finally:
            if memfd is not None:
                os.close(memfd)

    def _respond(self, kept: _Kept, head: bytes, body: memoryview, ino: int) -> None:
        now = time.time()
        if int(now) != self._date[0]:
            self._date = (int(now), imf_fixdate(now))
        full = b"%sDate: %s\r\n%s\r\n" % (
            head,
            self._date[1],
            b"Connection: close\r\n" if kept.close_after else b"",
        )
        del kept.pending[: kept.consumed]
        kept.consumed = 0
        kept.phase, kept.since = SENDING, time.monotonic()
        # Filed under the negated descriptor, apart from the daemon's jobs.
        job = _Job(0, kept.sock, memoryview(full), body, ino, kept)
        self.jobs[-kept.sock.fileno()] = job
        self._send(job, fresh=True)

    def _answered(self, kept: _Kept, err: int) -> None:
        self.jobs.pop(-kept.sock.fileno(), None)
        if err or kept.close_after:
            self._close(kept)
            return
        self._watch(kept, selectors.EVENT_READ)
        kept.phase = IDLE
        self._next(kept)

    def _back(self, kept: _Kept) -> None:
        """Hand ``kept`` back to the daemon with what it read and no answer consumed
        (if the daemon cannot take it now, the client sees the connection end)."""
        self._post(BACK.pack(KIND_BACK) + bytes(kept.pending), [kept.sock.fileno()])
        self._close(kept)

    def _close(self, kept: _Kept) -> None:
        fd = kept.sock.fileno()
        if self.kept.get(fd) is kept:
            del self.kept[fd]
        job = self.jobs.pop(-fd, None)
        if job is not None:
            job.body.release()
            job.head.release()
            self.maps.done(job.ino)
        self._watch(kept, 0)
        kept.sock.close()

    def _sweep(self) -> None:
        """Close or hand back kept connections past their deadline (about once a second)."""
        now = time.monotonic()
        if now - self._swept < 0.5:
            return
        self._swept = now
        keep = self.keep
        assert keep is not None
        for kept in list(self.kept.values()):
            age = now - kept.since
            if kept.phase == IDLE and age > keep.idle_timeout:
                self._close(kept)
            elif kept.phase == HEAD and age > keep.head_timeout:
                # The daemon says 408, as to any request this slow.
                self._back(kept)
            elif kept.phase == SENDING and age > keep.write_timeout:
                self._close(kept)


def drop_privileges() -> bool:
    """Become nobody if allowed, and hold no capability: this process needs no privilege.
    Whether it holds none now.

    The descriptors it is handed work whoever it is. Under the systemd
    unit the seccomp filter refuses setresuid (EPERM, and the unit's
    bounding set has no CAP_SETUID anyway): it then stays uid 0, but gives
    up every capability it inherited (CAP_SYS_ADMIN, CAP_NET_ADMIN,
    CAP_SYS_PTRACE under the unit), which the unit lets it do (``capset``).
    """
    if os.geteuid() != 0:
        return True
    with contextlib.suppress(PermissionError):
        os.setgroups([])
        os.setresgid(_NOBODY, _NOBODY, _NOBODY)
        os.setresuid(_NOBODY, _NOBODY, _NOBODY)
    return os.geteuid() != 0 or drop_capabilities()


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
    """``FD IDLE NICE [CAP IDLE_TIMEOUT HEAD_TIMEOUT WRITE_TIMEOUT MAX_HEAD]``: the control
    socket's descriptor, seconds idle before unmapping, the nice value to run at (raised
    to it if lower; never lowered), and the limits of kept connections (none without)."""
    args = sys.argv[1:] if argv is None else argv
    control = socket.socket(fileno=int(args[0]))
    with contextlib.suppress(OSError):
        if int(args[2]) > os.getpriority(os.PRIO_PROCESS, 0):
            os.setpriority(os.PRIO_PROCESS, 0, int(args[2]))
    unprivileged = drop_privileges()
    # The daemon logs it: this process has no log of its own. A new socket
    # has room for a few bytes, so this does not wait.
    with contextlib.suppress(OSError):
        control.send(SELF.pack(KIND_SELF, os.geteuid(), not unprivileged))
    try:
        keep = KeepLimits.parse(args[3:]) if len(args) > 3 else None
        return Child(control, float(args[1]), keep).run()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
