"""One timer for the earliest of many deadlines: `Timer`, `SharedTimer`, `Deadlines` and `Sweep`."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import pytest

from domain.runtime.deadlines import Deadlines, SharedTimer, Sweep, Timer


def count_timers(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every timer a `Timer` asks the running loop for, by its time."""
    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_at = loop.call_at

    def counting(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        if getattr(callback, "__self__", None).__class__ is Timer:
            timers.append(when)
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting)
    return timers


async def test_a_timer_keeps_its_earlier_time_and_moves_to_an_earlier_one(monkeypatch: pytest.MonkeyPatch) -> None:
    timers = count_timers(monkeypatch)
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    timer = Timer()
    now = loop.time()
    timer.arm(now + 0.2, partial(fired.append, "first"))
    timer.arm(now + 0.5, partial(fired.append, "later"))  # the armed one fires earlier: kept
    assert timers == [now + 0.2] and timer.armed
    timer.arm(now + 0.05, partial(fired.append, "sooner"))  # earlier: replaces it
    assert timers == [now + 0.2, now + 0.05]
    done = loop.create_future()
    loop.call_at(now + 0.3, done.set_result, None)
    await done
    assert fired == ["sooner"] and not timer.armed and timer._callback is None  # holds nothing once fired


async def test_a_cancelled_timer_fires_nothing() -> None:
    loop = asyncio.get_running_loop()
    fired: list[int] = []
    timer = Timer()
    timer.arm(loop.time(), partial(fired.append, 1))
    timer.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert fired == [] and not timer.armed


@pytest.mark.parametrize("make_timer", [Timer, SharedTimer])
def test_a_timer_armed_on_a_finished_loop_is_armed_again_on_the_next(make_timer: type[Timer | SharedTimer]) -> None:
    timer = make_timer()

    async def arm_first() -> None:
        timer.arm(asyncio.get_running_loop().time() + 0.01, partial(print, "never"))

    asyncio.run(arm_first())  # that loop ends before its timer fires
    assert timer.armed

    async def arm_later_and_wait() -> float:
        fired: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        timer.arm(asyncio.get_running_loop().time() + 0.02, partial(fired.set_result, 0.02))  # later, on this loop
        return await fired

    assert asyncio.run(asyncio.wait_for(arm_later_and_wait(), 5)) == 0.02


async def test_shared_timers_wait_on_one_loop_timer_and_each_fires_at_its_own_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every open stream's heartbeat: 100 timers, one loop timer at a time (a loop timer is about
    half a KiB that every parked stream held), each firing once, at its time, in order."""
    timers = count_timers(monkeypatch)
    loop = asyncio.get_running_loop()
    fired: list[tuple[int, float]] = []
    shared = [SharedTimer() for _ in range(100)]
    now = loop.time()
    for index, timer in enumerate(shared):
        timer.arm(now + 0.01 * (100 - index) / 100, partial(lambda i: fired.append((i, loop.time())), index))
    assert len(timers) <= 100 and all(timer.armed for timer in shared)
    armed_before = len(timers)
    shared[0].arm(now + 0.5, partial(fired.append, (-1, 0.0)))  # later than its armed time: kept
    shared[1].cancel()
    assert len(timers) == armed_before and not shared[1].armed
    done = loop.create_future()
    loop.call_at(now + 0.1, done.set_result, None)
    await done
    assert [index for index, _ in fired] == [i for i in range(99, -1, -1) if i != 1]
    assert all(at >= now + 0.01 * (100 - index) / 100 for index, at in fired)
    assert not any(timer.armed or timer._callback is not None for timer in shared)  # hold nothing once fired
    assert len(loop._scheduled) <= 1  # type: ignore[attr-defined]  # no loop timer left per shared timer


async def test_a_shared_timer_moves_to_an_earlier_time_and_a_failing_callback_stops_no_other() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    fired: list[str] = []
    first, second = SharedTimer(), SharedTimer()
    now = loop.time()
    first.arm(now + 0.2, partial(fired.append, "first, late"))
    first.arm(now + 0.01, partial(fired.append, "first, sooner"))  # earlier: replaces it

    def fail() -> None:
        raise RuntimeError("boom")

    second.arm(now + 0.005, fail)
    third = SharedTimer()
    third.arm(now + 0.005, partial(fired.append, "third"))
    done = loop.create_future()
    loop.call_at(now + 0.3, done.set_result, None)
    await done
    assert fired == ["third", "first, sooner"]
    assert [type(context["exception"]) for context in errors] == [RuntimeError]


async def test_deadlines_fire_in_order_each_once_and_not_after_discard(monkeypatch: pytest.MonkeyPatch) -> None:
    timers = count_timers(monkeypatch)
    loop = asyncio.get_running_loop()
    due: list[str] = []
    all_due = loop.create_future()

    last_due = loop.create_future()

    def on_due(key: str) -> None:
        due.append(key)
        if len(due) == 3:
            all_due.set_result(None)
        elif len(due) == 4:
            last_due.set_result(None)

    deadlines: Deadlines = Deadlines(on_due)
    now = loop.time()
    for key, delay in (("c", 0.06), ("a", 0.02), ("b", 0.04), ("gone", 0.01), ("moved", 0.01)):
        deadlines.set(key, now + delay)
    deadlines.discard("gone")
    deadlines.set("moved", now + 0.08)  # moved later
    assert len(deadlines) == 4 and "gone" not in deadlines and deadlines.at("moved") == now + 0.08
    await asyncio.wait_for(all_due, 5)
    assert due == ["a", "b", "c"]
    assert "a" not in deadlines and len(deadlines) == 1
    await asyncio.wait_for(last_due, 5)
    assert len(deadlines) == 0 and due == ["a", "b", "c", "moved"]
    # armed for "c", then for the earlier "a" and "gone" (not for "b" nor "moved": a timer fires sooner);
    # then, as each fires, for the next live deadline: "a", "b", "c", "moved"
    assert len(timers) == 7


async def test_deadlines_dropped_at_once_leave_a_bounded_heap_and_no_timer() -> None:
    loop = asyncio.get_running_loop()
    deadlines: Deadlines = Deadlines(lambda key: None)
    deadlines.set("stays", loop.time() + 3600)
    for number in range(10_000):
        deadlines.set(f"run_{number}", loop.time() + 60)
        deadlines.discard(f"run_{number}")
    assert len(deadlines) == 1 and len(deadlines._heap) <= 65
    deadlines.discard("stays")
    assert not deadlines._heap and not deadlines._timer.armed


async def test_deadlines_in_another_clock_fire_when_that_clock_says_so() -> None:
    loop = asyncio.get_running_loop()
    wall = [1_000.0]  # a clock that the loop's time does not move
    due: list[str] = []
    fired = loop.create_future()

    def on_due(key: str) -> None:
        due.append(key)
        fired.set_result(None)

    deadlines: Deadlines = Deadlines(on_due, now=lambda: wall[0])
    deadlines.set("soon", 1_000.03)
    deadlines.set("far", 5_000.0)
    later = loop.create_future()
    loop.call_later(0.1, later.set_result, None)  # the loop's time passed "soon", the clock did not
    await later
    assert due == [] and deadlines._timer.armed
    wall[0] = 1_000.05
    await asyncio.wait_for(fired, 5)
    assert due == ["soon"] and deadlines._timer.armed  # armed for "far", an hour and more away
    deadlines.close()
    assert not deadlines._timer.armed and len(deadlines) == 0


async def test_a_sweep_cuts_a_key_between_one_and_a_quarter_more_timeouts() -> None:
    loop = asyncio.get_running_loop()
    cut: dict[str, float] = {}
    stalled_cut = loop.create_future()

    def on_due(key: str) -> None:
        cut[key] = loop.time()
        stalled_cut.set_result(None)

    sweep: Sweep[str] = Sweep(0.2, on_due)
    began = loop.time()
    sweep.start("stalled")
    for _ in range(100):
        sweep.start("quick")
        await asyncio.sleep(0)
        sweep.stop("quick")
    await asyncio.wait_for(stalled_cut, 5)
    assert 0.2 <= cut["stalled"] - began < 0.2 * 1.25 + 0.1
    assert list(cut) == ["stalled"] and len(sweep) == 0
    assert not sweep._timer.armed  # nothing noted: no timer until the next start
