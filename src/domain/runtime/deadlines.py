"""One timer for the earliest of many deadlines.

A loop timer per deadline is one more handle on the loop's heap for every waiting run or open
stream, and a deadline that is moved or dropped a moment after it was set (the usual case:
heartbeats, budgets, writes) costs a cancelled handle each time. These keep one timer per owner,
armed at the earliest deadline that may be due, and look again when it fires."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Hashable
from typing import ClassVar, Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Timer:
    """One loop timer that fires at the earliest time it was asked for.

    Asking for a later time than the armed one keeps the armed timer: when it fires, its callback
    looks at the current deadline and asks again (`arm`) if that is still ahead. A deadline that
    keeps moving later (a heartbeat on a busy stream) thus costs one timer per interval, not one
    per move. The callback is held only while the timer is armed, so an idle timer keeps nothing
    alive. A timer armed on another loop (a process-wide owner used by a later loop, in tests) is
    replaced."""

    # Every open stream keeps one, armed for its heartbeat: slots, and no tuple of arguments.
    __slots__ = ("_callback", "_handle", "_loop", "fires_at")

    def __init__(self) -> None:
        self._handle: asyncio.TimerHandle | None = None
        self._callback: Callable[[], object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Loop time the armed timer fires at (None: not armed). An attribute, so that a hot path
        # (a stream's every wait) can see without a call that the armed timer fires soon enough.
        self.fires_at: float | None = None

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def arm(self, when: float, callback: Callable[[], object]) -> None:
        """Call `callback()` at loop time `when`, unless the armed timer fires no later (it then
        calls the callback it was armed with)."""
        loop = asyncio.get_running_loop()
        handle = self._handle
        if handle is not None:
            if self.fires_at is not None and self.fires_at <= when and self._loop is loop:
                return
            handle.cancel()
        self.fires_at, self._loop, self._callback = when, loop, callback
        self._handle = loop.call_at(when, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = self._loop = self._callback = self.fires_at = None

    def _fire(self) -> None:
        callback = self._callback
        self._handle = self._loop = self._callback = self.fires_at = None
        if callback is not None:
            callback()


class SharedTimer:
    """`Timer`'s behaviour for an owner that exists once per open stream (its heartbeat): the shared
    timers of a loop wait on one loop timer, at the earliest of them, through a heap. A loop timer
    is a handle and a libuv timer, about half a KiB, that every parked stream held for its whole
    wait; a heap entry is a tuple. A cancelled or re-armed timer's earlier entry stays in the heap
    until it comes up (keeping this small object, not its callback)."""

    __slots__ = ("_callback", "_timers", "fires_at")

    def __init__(self) -> None:
        self._callback: Callable[[], object] | None = None
        self._timers: _SharedTimers | None = None  # the loop's heap it is queued on
        self.fires_at: float | None = None  # loop time it fires at (None: not armed)

    @property
    def armed(self) -> bool:
        return self.fires_at is not None

    def arm(self, when: float, callback: Callable[[], object]) -> None:
        """Call `callback()` at loop time `when`, unless this timer fires no later (it then calls
        the callback it was armed with)."""
        timers = _SharedTimers.of_running_loop()
        if self.fires_at is not None and self.fires_at <= when and self._timers is timers:
            return
        self.fires_at, self._callback, self._timers = when, callback, timers
        timers.add(when, self)

    def cancel(self) -> None:
        self.fires_at = self._callback = self._timers = None

    def _due(self, when: float) -> None:
        if self.fires_at != when:
            return  # cancelled, or armed again earlier since this entry was queued
        callback = self._callback
        self.fires_at = self._callback = self._timers = None
        if callback is not None:
            callback()


class _SharedTimers:
    """One loop's `SharedTimer`s: a heap of (when, order, timer), one `Timer` at its earliest."""

    __slots__ = ("_heap", "_order", "_timer", "loop")

    _current: ClassVar[_SharedTimers | None] = None

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, SharedTimer]] = []
        self._order = itertools.count()  # ties in time go in the order they were armed
        self._timer = Timer()

    @classmethod
    def of_running_loop(cls) -> _SharedTimers:
        loop = asyncio.get_running_loop()
        current = cls._current
        if current is None or current.loop is not loop:
            current = cls._current = cls(loop)
        return current

    def add(self, when: float, timer: SharedTimer) -> None:
        heapq.heappush(self._heap, (when, next(self._order), timer))
        self._timer.arm(when, self._fire)  # keeps an earlier armed time

    def _fire(self) -> None:
        now = self.loop.time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, timer = heapq.heappop(heap)
            try:
                timer._due(when)
            except Exception as exc:  # one owner's failure delays no other timer
                self.loop.call_exception_handler({"message": "a shared timer's callback failed", "exception": exc})
        while heap and heap[0][2].fires_at != heap[0][0]:
            heapq.heappop(heap)  # cancelled or armed again: not worth a wake-up
        if heap:
            self._timer.arm(heap[0][0], self._fire)


class Deadlines:
    """Deadlines by key (a run's id, a request's), one timer at the earliest: `on_due(key)` once
    the deadline of `key` passed (it is forgotten first). `now` is the time the deadlines are
    written in (loop time by default; the approval expiries are wall-clock seconds): the timer is
    armed that far from the loop's now, and fires only what `now` says is due.

    Keys whose deadline was dropped or moved stay in the heap until they come up, or until they
    outnumber the live ones (then the heap is rebuilt), so dropping one costs a dict deletion."""

    __slots__ = ("_due_at", "_heap", "_now", "_on_due", "_timer")

    def __init__(self, on_due: Callable[[str], object], now: Callable[[], float] | None = None) -> None:
        self._on_due = on_due
        self._now = now
        self._due_at: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []  # (deadline, key), earliest first
        self._timer = Timer()

    def __len__(self) -> int:
        return len(self._due_at)

    def __contains__(self, key: object) -> bool:
        return key in self._due_at

    def at(self, key: str) -> float | None:
        return self._due_at.get(key)

    def set(self, key: str, when: float) -> None:
        """`key` is due at `when` (replacing its deadline, if it had one)."""
        self._due_at[key] = when
        heapq.heappush(self._heap, (when, key))
        self._arm(when)

    def discard(self, key: str) -> None:
        if self._due_at.pop(key, None) is None:
            return
        if not self._due_at:
            self._heap.clear()
            self._timer.cancel()
        elif len(self._heap) > 64 and len(self._heap) > 2 * len(self._due_at):
            self._heap = [(when, key) for key, when in self._due_at.items()]
            heapq.heapify(self._heap)

    def close(self) -> None:
        """Forget every deadline and drop the timer."""
        self._due_at.clear()
        self._heap.clear()
        self._timer.cancel()

    def _arm(self, when: float) -> None:
        loop_now = asyncio.get_running_loop().time()
        at = when if self._now is None else loop_now + max(0.0, when - self._now())
        self._timer.arm(at, self._fire)

    def _fire(self) -> None:
        now = asyncio.get_running_loop().time() if self._now is None else self._now()
        heap, due_at = self._heap, self._due_at
        while heap and heap[0][0] <= now:
            when, key = heapq.heappop(heap)
            if due_at.get(key) == when:
                del due_at[key]
                self._on_due(key)
        while heap and due_at.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # dropped or moved: not worth a timer
        if heap:
            self._arm(heap[0][0])


class Sweep(Generic[K]):
    """Deadlines that are almost always dropped at once (a response write that completes): setting
    one notes when it began, in a dict; one timer, every `timeout / 4` while any is noted, calls
    `on_due(key)` for those noted at least `timeout` ago. A key is due between 1 and 1.25 timeouts
    after it began; in exchange a deadline costs no heap entry and no timer of its own."""

    __slots__ = ("_began", "_on_due", "_timeout", "_timer")

    def __init__(self, timeout: float, on_due: Callable[[K], object]) -> None:
        self._timeout = timeout
        self._on_due = on_due
        self._began: dict[K, float] = {}
        self._timer = Timer()

    def __len__(self) -> int:
        return len(self._began)

    def start(self, key: K) -> None:
        now = asyncio.get_running_loop().time()
        self._began[key] = now
        if self._timer.fires_at is None:  # an attribute, not `armed`: this runs for every write
            self._timer.arm(now + self._timeout / 4, self._fire)

    def stop(self, key: K) -> None:
        self._began.pop(key, None)

    def close(self) -> None:
        self._began.clear()
        self._timer.cancel()

    def _fire(self) -> None:
        if not self._began:
            return  # nothing noted: the next `start` arms again
        now = asyncio.get_running_loop().time()
        too_old = now - self._timeout
        for key, began in list(self._began.items()):
            if began <= too_old:
                del self._began[key]
                self._on_due(key)
        if self._began:
            self._timer.arm(now + self._timeout / 4, self._fire)
