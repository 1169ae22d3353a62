"""The periodic safety nets: counter refreshes and reconciles, spread over loop turns.

Both walk every watched namespace, a few at a time, so no loop turn takes
long however many namespaces there are.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from nswatch.sessions import Sessions

# Each refresh is a send(), after which the loop waits for the GIL again:
# under 16 + 4 readers a turn sending 16 took 9-27 ms (bench_readers, the
# loop's callbacks timed), longer than the whole latency budget. The replies
# make the loop turn again at once, so fewer per turn cost no time overall.
STATS_PER_TURN = 4


class StatsRefresher:
    """Refreshes link counters: the kernel sends a link message only on state changes."""

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions
        self._due: deque[int] = deque()

    def due(self) -> None:
        """Time for a round: queue every namespace (unless a round is still going)."""
        if not self._due:
            self._due.extend(self._sessions)

    def advance(self) -> None:
        """Refresh a few namespaces' counters (called once per loop turn)."""
        for _ in range(min(STATS_PER_TURN, len(self._due))):
            s = self._sessions.get(self._due.popleft())
            if s is not None and s.synced:
                s.refresh_stats()


class Reconciler:
    """Compares a fresh dump with the model, one namespace at a time so dumps never pile up."""

    def __init__(self, sessions: Sessions, started: Callable[[str], None]) -> None:
        self._sessions = sessions
        self._started = started
        self._queue: deque[int] = deque()
        self._current: int | None = None

    def due(self) -> None:
        """Time for a round: queue every namespace (unless a round is still going)."""
        if not self._queue and self._current is None:
            self._queue.extend(self._sessions)

    def advance(self) -> None:
        """Start the next namespace's dump once the current one is done."""
        if self._current is not None:
            s = self._sessions.get(self._current)
            if s is not None and s.busy:
                return
            self._current = None
        while self._queue:
            s = self._sessions.get(self._queue.popleft())
            if s is None or not s.synced:
                continue
            self._current = s.inode
            s.resync("reconcile")
            self._started(s.name)
            return
