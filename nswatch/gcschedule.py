"""When the cyclic garbage collector walks the old objects: on the loop's schedule.

CPython runs a full collection whenever a quarter more objects than the
last one left have reached the oldest generation. Every scrape or state
render keeps tens of thousands of short-lived objects alive across young
collections, so under readers that condition held about 1.5 times a
second, and each full collection stopped every thread, the event loop
included, for 10-45 ms while it walked the ~40,000 objects the model had
renewed since the first sync (measured with ``gc.callbacks`` during
``tests.bench.bench_readers``). Those stops made the tail of the link
change → model latency.

So, once the first sync is done, automatic full collections are turned
off (young ones still run: they are short and find most cycles); the loop
runs a full one every ``interval`` seconds and then freezes what survived,
so the next one only walks what is newer. A cycle that forms among frozen
objects would never be found that way: every ``deep_every``-th collection
unfreezes everything first, which bounds that garbage to one deep period
(5 minutes). Each collection walks what 10 s of readers left alive (22-41 ms
under bench_readers' 16 + 4 readers when it was every 30 s); the deep one
walks the whole heap.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from nswatch.model import Model
from nswatch.observer import BaseObserver

log = structlog.get_logger("nswatch.gc")

# gen2's threshold counts young (gen1) collections; one that is never
# reached leaves full collections to this schedule. It must fit a C int.
NEVER = 1 << 30


class GcControl(Protocol):
    """The part of the ``gc`` module the schedule uses (a fake in the tests)."""

    def collect(self, generation: int = 2, /) -> int: ...
    def freeze(self) -> None: ...
    def unfreeze(self) -> None: ...
    def get_threshold(self) -> tuple[int, int, int]: ...
    def set_threshold(
        self, threshold0: int, threshold1: int = ..., threshold2: int = ..., /
    ) -> None: ...
    def get_freeze_count(self) -> int: ...


class CollectionSchedule(BaseObserver):
    """Runs full garbage collections from the event loop, every ``interval`` seconds."""

    def __init__(
        self,
        interval: float = 10.0,
        deep_every: int = 30,
        clock: Callable[[], float] = time.monotonic,
        collector: GcControl = gc,
    ) -> None:
        self.interval = interval
        self.deep_every = deep_every
        self._clock = clock
        self._gc = collector
        self._saved: tuple[int, int, int] | None = None
        self._due = 0.0
        self._count = 0  # full collections run since ready

    def ready(self, model: Model) -> None:
        # The synced model lives as long as the daemon: collect and freeze
        # it now, before any reader, then take over the full collections.
        self._collect(deep=True)
        t0, t1, _ = self._saved = self._gc.get_threshold()
        self._gc.set_threshold(t0, t1, NEVER)
        self._due = self._clock() + self.interval

    def tick(self, model: Model) -> None:
        if self._saved is None or self._clock() < self._due:
            return
        self._count += 1
        self._collect(deep=self._count % self.deep_every == 0)
        self._due = self._clock() + self.interval

    def stopping(self) -> None:
        # A daemon run inside another program (the tests) gives its
        # thresholds back; what is frozen stays frozen, which is harmless.
        if self._saved is not None:
            self._gc.set_threshold(*self._saved)
            self._saved = None

    def _collect(self, *, deep: bool) -> None:
        t0 = time.perf_counter()
        if deep:
            self._gc.unfreeze()
        found = self._gc.collect(2)
        self._gc.freeze()
        log.debug(
            "gc_collected",
            deep=deep,
            unreachable=found,
            frozen=self._gc.get_freeze_count(),
            seconds=round(time.perf_counter() - t0, 4),
        )
