"""Small waits: `Flag`, `TaskSet`, `Backoff`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from domain.runtime.waits import Backoff, Flag, TaskSet


async def test_a_flag_behaves_as_an_event() -> None:
    flag = Flag()
    waiters: list[Any] = [asyncio.ensure_future(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters) and not flag.is_set()
    waiters[0].cancel()
    flag.set()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert [w.cancelled() for w in waiters] == [True, False, False] and flag.is_set()
    await asyncio.wait_for(flag.wait(), 1)  # already set: no wait
    flag.clear()
    again = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)
    assert not again.done()
    flag.set()
    await asyncio.wait_for(again, 1)


def test_a_flag_holds_no_deque_and_no_dict() -> None:
    flag = Flag()
    assert not hasattr(flag, "__dict__")
    assert flag._waiters is None  # a list only while someone waits


async def test_a_task_set_keeps_its_tasks_until_they_end_and_waits_for_late_ones() -> None:
    tasks = TaskSet()
    release = asyncio.Event()
    order: list[str] = []

    async def second() -> None:
        order.append("second")

    async def first() -> None:
        await release.wait()
        tasks.spawn(second(), name="second")  # spawned while someone waits for the set
        order.append("first")

    tasks.spawn(first(), name="first")
    assert len(tasks) == 1 and [t.get_name() for t in tasks] == ["first"]
    waiting = asyncio.ensure_future(tasks.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    release.set()
    await asyncio.wait_for(waiting, 1)
    assert order == ["first", "second"] and len(tasks) == 0


async def test_a_task_set_cancels_every_task() -> None:
    tasks = TaskSet()
    spawned = [tasks.spawn(asyncio.sleep(3600)) for _ in range(3)]
    await tasks.cancel()
    assert all(t.cancelled() for t in spawned) and len(tasks) == 0


def test_backoff_doubles_from_its_first_pause_to_its_cap_and_starts_over_after_a_success() -> None:
    backoff = Backoff(0.1, 2.0)
    assert backoff.delay() == 0.0  # no pause before the first attempt
    delays = []
    for _ in range(7):
        backoff.failed()
        delays.append(backoff.delay())
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert backoff.failures == 7 and backoff.delay(10_000) == 2.0
    backoff.succeeded()
    assert backoff.delay() == 0.0 and backoff.failures == 0


def test_a_jittered_backoff_pauses_within_the_upper_half() -> None:
    backoff = Backoff(0.05, 5.0, jitter=True)
    for failures, capped in ((1, 0.05), (3, 0.2), (20, 5.0)):
        drawn = {backoff.delay(failures) for _ in range(200)}
        assert all(capped * 0.5 <= d <= capped for d in drawn) and len(drawn) > 1


def test_a_negative_backoff_is_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(-1, 1)


async def test_a_backoff_pauses_only_after_a_failure() -> None:
    loop = asyncio.get_running_loop()
    backoff = Backoff(0.05, 1.0)
    began = loop.time()
    await backoff.pause()
    assert loop.time() - began < 0.05
    backoff.failed()
    await backoff.pause()
    assert loop.time() - began >= 0.05
