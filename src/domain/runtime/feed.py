"""The bounded feed of a run's events: each event is logged, then handed to the run's watchers, each
of which has a bounded buffer of its own (a watcher too far behind resumes from the event log)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Generic, TypeVar

from domain.model.errors import RunFenced
from domain.model.events import Event, EventType
from domain.model.ports import EventLog
from domain.model.run import Run
from domain.model.telemetry import Telemetry
from domain.runtime.deadlines import SharedTimer

T = TypeVar("T")


class SubscriptionOverflow(Exception):
    """A watcher fell too far behind, or the run can no longer feed it (fenced, or its log refused
    an event); it must reconnect and resume from the event log."""


class Subscription(Generic[T]):
    """One watcher's bounded buffer of a run's live events.

    A quiet stream needs a heartbeat, so every wait has a deadline; but a busy stream waits
    thousands of times per heartbeat interval. Its timer fires at the earliest deadline it was
    armed for and re-arms itself for the current one when the stream was not quiet after all, so
    a busy stream keeps one timer per heartbeat interval, not one per wait."""

    # Every open stream keeps one, a parked one for the whole approval: slots, and no buffer while
    # it waits on an empty one (both pinned by tests/unit/runtime/test_memory.py).
    __slots__ = ("_deadline", "_events", "_max", "_timer", "_waiter", "overflowed")

    def __init__(self, max_buffered: int) -> None:
        # Made by the first push and dropped whenever the watcher waits on an empty buffer: an
        # empty deque still holds a block of 64 slots, and a parked stream waits for a long time.
        self._events: deque[T] | None = None
        self._max = max_buffered
        self._waiter: asyncio.Future[None] | None = None  # set while `next` waits
        self.overflowed = False
        self._deadline: float | None = None  # when the current wait becomes a heartbeat
        self._timer = SharedTimer()

    def push(self, event: T) -> None:
        if self.overflowed:
            return
        events = self._events
        if events is None:
            events = self._events = deque()
        if len(events) >= self._max:
            self.overflowed = True
            self._events = None  # free the memory now; the watcher resumes from the log
        else:
            events.append(event)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self, wait_seconds: float | None) -> T | None:
        """The next event, or None when nothing came within `wait_seconds` (time for a heartbeat)."""
        if not self._events and not self.overflowed:
            self._events = None
            loop = asyncio.get_running_loop()
            if wait_seconds is None:
                self._deadline = None
            else:
                deadline = self._deadline = loop.time() + wait_seconds
                # A busy stream's waits almost always find the timer armed for an earlier deadline:
                # seen here without a call (this runs for every event of every stream).
                fires_at = self._timer.fires_at
                if fires_at is None or fires_at > deadline:
                    self._timer.arm(deadline, self._deadline_reached)
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
            if not self._events and not self.overflowed:
                return None  # only the timer wakes a wait without an event: heartbeat time
        if self.overflowed:
            raise SubscriptionOverflow
        assert self._events is not None
        return self._events.popleft()

    def _deadline_reached(self) -> None:
        deadline = self._deadline
        if deadline is None:
            return
        if asyncio.get_running_loop().time() >= deadline:
            if not self._events:
                self._wake()
        else:  # the stream was busy since this timer was armed: wait for the current deadline
            self._timer.arm(deadline, self._deadline_reached)

    def detach(self) -> None:
        """The run can no longer feed this watcher (it was fenced, or the log refused an event):
        the watcher resumes from the event log, which holds whatever the run logged."""
        self.overflowed = True
        self._events = None
        self._wake()

    def close(self) -> None:
        """The watcher left: drop the timer now rather than when it would have fired."""
        self._deadline = None
        self._timer.cancel()

    def take_buffered(self, limit: int) -> list[T]:
        """Events already buffered (no waiting), so a writer can send them in one write."""
        events = self._events
        if not events or self.overflowed:
            return []
        if len(events) <= limit:  # nearly always: the whole buffer at once, not event by event
            taken = list(events)
            events.clear()
            return taken
        return [events.popleft() for _ in range(limit)]


# The delivery policy. A run waits for these to be logged before it goes on: its `start` (so the
# client's first event goes out before the run's own work takes the loop: one round trip of
# waiting, no CPU), before it parks on an approval (a resumer must see the `hitl`), before a tool
# acts on the world, and before it ends (the log is complete when the run's retention starts).
# Everything else is delivered as soon as it is logged, while the run keeps working.
SETTLE = frozenset({EventType.START, EventType.HITL, EventType.TOOL_EXECUTION, EventType.END})
ALWAYS_SENT = frozenset({EventType.ERROR, EventType.END})
# Content chunks are the bulk of a run's events and change only the answer; the snapshot is saved
# with every other event (and the final answer), so it costs little and is never far behind.
SNAPSHOT_SKIP = frozenset({EventType.CONTENT, EventType.THOUGHT})


class RunFeed:
    """A run's way out: each event is logged, then handed to the run's watchers, in order.

    The run does not suspend for every log write: events are submitted to the event log, which
    writes many at once and reports each back in order; only then does an event reach a watcher
    ("logged before it is written to any client"). A failed write is raised to the run at its next
    event; the failed event reaches no watcher: the watchers are detached and resume from the log."""

    # Slots, and bound methods instead of closures, for every object a run keeps: a run waiting for
    # approval keeps them for as long as the approval takes (tests/unit/runtime/test_memory.py).
    __slots__ = ("_failure", "_log", "_max_unlogged", "_telemetry", "_unlogged", "_wait_until", "_waiter",
                 "fenced", "on_failure", "run", "watchers")

    def __init__(self, event_log: EventLog, telemetry: Telemetry,
                 on_failure: Callable[[Exception], None] | None = None, max_unlogged: int = 512) -> None:
        # A list: a run has one watcher or a few, and a set of one is three times the size (a
        # parked run keeps it for as long as the approval takes).
        self.watchers: list[Subscription[Event]] = []
        # Told of a failed write while the run is not publishing (set once the run's handle exists).
        self.on_failure = on_failure
        self.run: Run | None = None  # whose snapshot `emit` logs with its events
        self._log = event_log
        self._telemetry = telemetry
        self._max_unlogged = max_unlogged
        self._unlogged = 0
        self._failure: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wait_until = 0
        # The log refused the run (its lease is gone, or its log has an `end` or another event at a
        # seq): nothing more is logged or delivered; the watchers resume from the log.
        self.fenced = False

    def emit(self, event: Event) -> Awaitable[None] | None:
        """The run's event sink: each event with the run's snapshot, except content chunks and
        thoughts (the bulk of a run's events, which change only the answer). None when the event
        is submitted and the run goes on at once (nearly every event: no coroutine is made for
        it), else what the run awaits before it goes on."""
        snapshot = None
        if event.type not in SNAPSHOT_SKIP or (event.type is EventType.CONTENT and not event.data.get("chunk")):
            assert self.run is not None
            snapshot = self.run.snapshot()
        return self._submit(event, snapshot)

    def fence(self, error: RunFenced) -> None:
        if not self.fenced:
            self.fenced = True
            self._failure = error
            for watcher in tuple(self.watchers):
                watcher.detach()

    async def publish(self, event: Event, snapshot: Mapping[str, Any] | None) -> None:
        waiting = self._submit(event, snapshot)
        if waiting is not None:
            await waiting

    def _submit(self, event: Event, snapshot: Mapping[str, Any] | None) -> Awaitable[None] | None:
        if self.fenced or (self._failure is not None and event.type not in ALWAYS_SENT):
            assert self._failure is not None
            raise self._failure
        self._unlogged += 1
        self._log.submit(event, snapshot, partial(self._logged, event))
        if event.type in SETTLE:
            return self._settle(event, 0)
        if self._unlogged >= self._max_unlogged:
            return self._settle(event, self._max_unlogged // 2)  # the log is slower than the run
        return None

    async def _settle(self, event: Event, count: int) -> None:
        await self._until_unlogged(count)
        if self.fenced or (self._failure is not None and event.type not in ALWAYS_SENT):
            assert self._failure is not None
            raise self._failure

    def close(self) -> None:
        """The run is over: drop the links back to it. The run's sink is this feed's `emit`, and
        the feed held the run (for its snapshots) and its handle (`on_failure`): reference cycles,
        which only a garbage collection frees, and the collector then frees every finished run's
        plan, conversation and events at once, in pauses of tens of milliseconds under load
        (tests/unit/runtime/test_cycles.py). Without them a finished run is freed as soon as its
        last watcher lets go."""
        self.run = None
        self.on_failure = None

    def _logged(self, event: Event, error: Exception | None) -> None:
        self._unlogged -= 1
        first_failure = error is not None and not self.fenced and (
            self._failure is None or isinstance(error, RunFenced))
        if isinstance(error, RunFenced) or self.fenced:
            # Not delivered: the log holds something else at this seq (or will: a run_lost).
            if isinstance(error, RunFenced):
                self.fence(error)
        elif error is None:
            for watcher in tuple(self.watchers):
                watcher.push(event)
        else:
            self._telemetry.store_error()
            self._failure = self._failure or error
            # An event the log did not take (or whose replicas did not confirm it) goes to no
            # client: a client must never hold an event a resume may not find (a Redis failover
            # drops what the old master took last). Its watchers resume from the log instead,
            # which says how far the run got, or that the store is unavailable.
            for watcher in tuple(self.watchers):
                watcher.detach()
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (first_failure or self._unlogged <= self._wait_until):
            waiter.set_result(None)  # the run is in `publish`: it raises the failure itself
        elif first_failure and waiter is None and (event.type not in ALWAYS_SENT or isinstance(error, RunFenced)) \
                and self.on_failure is not None:
            assert error is not None
            self.on_failure(error)  # the run is elsewhere (waiting for approval, say): stop it

    async def _until_unlogged(self, count: int) -> None:
        while self._unlogged > count:
            self._waiter = asyncio.get_running_loop().create_future()
            self._wait_until = count
            try:
                await self._waiter
            finally:
                self._waiter = None
