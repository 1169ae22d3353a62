"""The garbage-collection schedule: full collections from the loop, none in between."""

from __future__ import annotations

import gc

from nswatch.gcschedule import NEVER, CollectionSchedule, GcControl
from nswatch.model import Model


class FakeGc:
    """Records what the schedule asks of the collector."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.threshold = (700, 10, 10)

    def collect(self, generation: int = 2, /) -> int:
        self.calls.append(f"collect{generation}")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def get_threshold(self) -> tuple[int, int, int]:
        return self.threshold

    def set_threshold(self, threshold0: int, threshold1: int = 10, threshold2: int = 10, /) -> None:
        self.threshold = (threshold0, threshold1, threshold2)

    def get_freeze_count(self) -> int:
        return 0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def schedule(fake: FakeGc, clock: Clock) -> CollectionSchedule:
    collector: GcControl = fake  # mypy holds the fake to the gc module's shape
    return CollectionSchedule(interval=30.0, deep_every=3, clock=clock, collector=collector)


def test_nothing_changes_before_the_first_sync() -> None:
    """Until ready, CPython's own schedule runs: the sync's garbage is its business."""
    fake, clock = FakeGc(), Clock()
    s = schedule(fake, clock)
    clock.now += 1000
    s.tick(Model())
    assert fake.calls == []
    assert fake.threshold == (700, 10, 10)


def test_ready_collects_freezes_and_turns_automatic_full_collections_off() -> None:
    """The synced model is collected once and frozen; the young generations keep their thresholds."""
    fake, clock = FakeGc(), Clock()
    s = schedule(fake, clock)
    s.ready(Model())
    assert fake.calls == ["unfreeze", "collect2", "freeze"]
    assert fake.threshold == (700, 10, NEVER)


def test_full_collections_run_every_interval_and_every_third_is_deep() -> None:
    """Between deep ones a collection walks only what is newer than the last freeze."""
    fake, clock = FakeGc(), Clock()
    s = schedule(fake, clock)
    s.ready(Model())
    fake.calls.clear()
    s.tick(Model())
    clock.now += 29.9
    s.tick(Model())
    assert fake.calls == []
    rounds = []
    for _ in range(3):
        clock.now += 30.0
        s.tick(Model())
        s.tick(Model())  # a second turn in the same instant does nothing
        rounds.append(fake.calls[:])
        fake.calls.clear()
    assert rounds == [
        ["collect2", "freeze"],
        ["collect2", "freeze"],
        ["unfreeze", "collect2", "freeze"],
    ]


def test_stopping_gives_the_thresholds_back() -> None:
    """A daemon run inside another program leaves that program's collector as it found it."""
    fake, clock = FakeGc(), Clock()
    s = schedule(fake, clock)
    s.ready(Model())
    s.stopping()
    assert fake.threshold == (700, 10, 10)
    clock.now += 1000
    fake.calls.clear()
    s.tick(Model())
    assert fake.calls == []


def test_the_real_gc_module_fits_the_protocol() -> None:
    """The default collector is the interpreter's own, and the schedule restores it."""
    before = gc.get_threshold()
    s = CollectionSchedule()
    try:
        s.ready(Model())
        assert gc.get_threshold()[2] == NEVER
        assert gc.get_freeze_count() > 0
    finally:
        s.stopping()
        gc.unfreeze()
    assert gc.get_threshold() == before
