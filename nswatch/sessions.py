"""The netlink sessions of the watched namespaces, and the follow-ups carried out on them.

:class:`Sessions` opens one session per namespace (a socket created inside
it), registers it with the loop, reads it when readable, hands what it read
to its owner, and carries out the follow-up actions the owner returns
(delayed route re-dumps, resyncs, nsid questions). It also replaces a
session whose dump stalled. It knows nothing of the model.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from nswatch.decode import Decoded
from nswatch.followups import Action, AskNsid, LookInProc, RedumpRoutes, Resync
from nswatch.loop import Loop
from nswatch.model import DumpKind, Event, Family
from nswatch.netlink import Session, make_socket
from nswatch.netns import NetnsEnterer

# A dump with no reply for this long is abandoned with its socket (checked
# at each periodic rescan).
DUMP_STALL = 20.0
# ioctl on a socket: an fd of the network namespace the socket lives in.
SIOCGSKNS = 0x894C


class NetlinkSession(Protocol):
    """One namespace's netlink conversation, as the daemon drives it (see netlink.Session)."""

    inode: int
    name: str
    synced: bool

    def fileno(self) -> int: ...
    @property
    def busy(self) -> bool: ...
    @property
    def idle(self) -> bool: ...
    def stalled(self, timeout: float) -> bool: ...
    def start(self, reason: str = "initial") -> None: ...
    def resync(self, reason: str, kinds: Iterable[DumpKind] = ...) -> None: ...
    def redump_routes(self, family: Family, reason: str, dev: int | None = None) -> None: ...
    def refresh_stats(self) -> None: ...
    def ask_nsid(self, target: int, fd: int) -> None: ...
    def read(self) -> tuple[list[Event], list[Decoded], str | None]: ...
    def close(self) -> None: ...


SessionOpener = Callable[[int, str, "str | None"], NetlinkSession]
"""Open a session for (inode, name, namespace file path or None for our own)."""


class SessionOwner(Protocol):
    """Who gets what the sessions read."""

    def batch(
        self, session: NetlinkSession, events: list[Event], notes: list[Decoded], stale: str | None
    ) -> None:
        """Apply one read's events (and carry out their follow-ups)."""
        ...

    def error(self, netns: str | None, where: str, err: BaseException) -> None: ...
    def lost(self, inode: int) -> None:
        """A session's socket broke and was closed; the namespace needs finding again."""
        ...


class Sessions:
    """Every watched namespace's netlink session, by namespace inode."""

    def __init__(
        self,
        loop: Loop,
        enterer: NetnsEnterer,
        owner: SessionOwner,
        rcvbuf: Callable[[], int],
        open_session: SessionOpener | None = None,
    ) -> None:
        self._loop = loop
        self._enterer = enterer
        self._owner = owner
        self._rcvbuf = rcvbuf
        self._open: SessionOpener = open_session or self._real_session
        self._by_inode: dict[int, NetlinkSession] = {}
        self._paths: dict[int, str] = {}
        # (asking namespace, target) pairs already asked: a netnsid does not
        # change while both namespaces live, so each is asked once.
        self._asked: set[tuple[int, int]] = set()
        self._route_dumps_due: set[RedumpRoutes] = set()

    def __contains__(self, inode: object) -> bool:
        return inode in self._by_inode

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._by_inode))

    def __len__(self) -> int:
        return len(self._by_inode)

    def get(self, inode: int) -> NetlinkSession | None:
        """The session of namespace ``inode``, or None."""
        return self._by_inode.get(inode)

    def items(self) -> list[tuple[int, NetlinkSession]]:
        """(inode, session) of every open session."""
        return list(self._by_inode.items())

    # -- opening and closing --

    def open(self, inode: int, name: str, path: str | None, reason: str) -> NetlinkSession:
        """Open and register a namespace's session (the caller starts its dump).

        Raises OSError when it cannot be opened: the namespace vanished
        between scan and open (ENOENT, ESTALE), is no network namespace, or
        this process is out of file descriptors (EMFILE). The caller decides
        what that means and how often to say so.
        """
        session = self._open(inode, name, path)
        self._by_inode[inode] = session
        if path is not None:
            self._paths[inode] = path
        self._loop.register(session, f"netlink:{name}", lambda: self._read(session))
        return session

    def moved(self, inode: int, path: str | None) -> None:
        """Namespace ``inode`` is now reached through ``path`` (its file went, a holder changed)."""
        if inode in self._by_inode and path is not None:
            self._paths[inode] = path

    def close(self, inode: int) -> None:
        """Close a namespace's socket at once: an open socket keeps the namespace alive."""
        session = self._by_inode.pop(inode, None)
        self._paths.pop(inode, None)
        self._asked = {p for p in self._asked if inode not in p}
        if session is None:
            return
        self._loop.unregister(session)
        session.close()

    def close_all(self) -> None:
        """Close every session."""
        for inode in list(self._by_inode):
            self.close(inode)

    def stalled(self) -> list[int]:
        """Namespaces whose dump has had no reply for :data:`DUMP_STALL` seconds."""
        return [i for i, s in self._by_inode.items() if s.stalled(DUMP_STALL)]

    def _real_session(self, inode: int, name: str, path: str | None) -> NetlinkSession:
        """A netlink socket inside the namespace at ``path`` (None: our own)."""
        rcvbuf = self._rcvbuf()
        if path is None:
            return Session(inode, name, make_socket(rcvbuf))
        fd = self._enterer.open_ns(path, inode)
        try:
            sock = self._enterer.run_in(fd, lambda: make_socket(rcvbuf))
        finally:
            os.close(fd)
        return Session(inode, name, sock)

    # -- reading --

    def _read(self, session: NetlinkSession) -> None:
        try:
            events, notes, stale = session.read()
        except OSError as e:
            self._owner.error(session.name, "netlink_read", e)
            if e.errno in (errno.EBADF, errno.ENOTSOCK):
                self.close(session.inode)
                self._owner.lost(session.inode)
            return
        except Exception as e:
            # A bug in reading or decoding: what was read is lost, so the
            # model of this namespace can no longer be trusted. Re-dump it.
            self._owner.error(session.name, "netlink_session", e)
            session.resync("error")
            return
        self._owner.batch(session, events, notes, stale)

    # -- follow-ups --

    def carry_out(self, actions: Iterable[Action]) -> None:
        """Do what the follow-ups ask, on the sessions that still exist."""
        for action in actions:
            match action:
                case RedumpRoutes():
                    self._later_route_dump(action)
                case Resync(inode=inode, reason=reason, kinds=kinds):
                    session = self._by_inode.get(inode)
                    if session is not None:
                        session.resync(reason, kinds=kinds)
                case AskNsid(inode=inode, target=target):
                    session = self._by_inode.get(inode)
                    if session is not None and (inode, target) not in self._asked:
                        self._asked.add((inode, target))
                        self._ask_nsid(session, target)
                case LookInProc():
                    # Discovery's, not a session's: the daemon passes it on.
                    pass

    def _later_route_dump(self, action: RedumpRoutes) -> None:
        if action in self._route_dumps_due:
            return
        self._route_dumps_due.add(action)

        def fire() -> None:
            self._route_dumps_due.discard(action)
            session = self._by_inode.get(action.inode)
            if session is not None:
                session.redump_routes(action.family, "route_followup", action.dev)

        self._loop.call_later(action.delay, "route_followup", fire)

    def _target_fd(self, target: int) -> int:
        """An fd naming namespace ``target``, without opening its file if possible.

        An fd opened on a namespace file pins its bind mount: a plain
        ``umount`` of the file at that moment fails with EBUSY. The target's
        own netlink socket names its namespace too (SIOCGSKNS), and that fd
        pins no mount.
        """
        if target == self._enterer.home.inode:
            return self._enterer.home_fd()
        other = self._by_inode.get(target)
        if other is not None:
            try:
                fd: int = fcntl.ioctl(other.fileno(), SIOCGSKNS)
                return fd
            except OSError:
                pass  # not a real socket (tests), or a kernel before 4.9
        return self._enterer.open_ns(self._paths[target], target)

    def _ask_nsid(self, session: NetlinkSession, target: int) -> None:
        try:
            fd = self._target_fd(target)
        except (OSError, KeyError) as e:
            self._owner.error(session.name, "nsid_open", e)
            return
        try:
            session.ask_nsid(target, fd)
        except OSError as e:
            self._owner.error(session.name, "nsid_query", e)
        finally:
            os.close(fd)

    def path_of(self, inode: int) -> str | None:
        """The file namespace ``inode`` was opened from (None for the host)."""
        return self._paths.get(inode)
