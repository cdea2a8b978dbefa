"""A run's events are logged, then delivered, in order — without the run waiting for each write."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest

from domain.model.errors import StoreUnavailable
from domain.model.events import Event, EventType, RunIds
from domain.model.telemetry import Telemetry
from domain.runtime.feed import RunFeed, Subscription
from tests.unit.fakes import MemoryEventLog, RecordingTool, ScriptedModel, text, tool_call
from tests.unit.harness import Harness, summary

IDS = RunIds("run_1", "ses_1", "thr_1", "t" * 32)
PLAN = json.dumps({"steps": [{"description": "Commit the work", "tool": "commit"}]})


class HeldEventLog(MemoryEventLog):
    """Holds every submitted event until the test lets the writes complete (or fail)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Event, Mapping[str, Any] | None, Callable[[Exception | None], None]]] = []

    def submit(self, event: Event, snapshot: Mapping[str, Any] | None,
               logged: Callable[[Exception | None], None]) -> None:
        self.held.append((event, snapshot, logged))

    def complete(self, error: Exception | None = None) -> list[EventType]:
        held, self.held = self.held, []
        for event, snapshot, logged in held:
            if error is None:
                super().submit(event, snapshot, lambda _: None)
            logged(error)
        return [event.type for event, _, _ in held]


async def until(condition: Callable[[], bool]) -> None:
    """Let the other tasks run until `condition` holds (bounded in steps, not in time)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def harness_with(log: HeldEventLog, *model_turns: Any, tools: list[Any] | None = None) -> Harness:
    h = Harness(ScriptedModel(*model_turns), tools=tools or [])
    h.log = log
    h.rebuild()
    return h


def content(seq: int) -> Event:
    return Event(EventType.CONTENT, seq, IDS, 0, {"content": "x", "chunk": True})


async def test_no_event_reaches_a_watcher_before_it_is_logged_and_the_run_does_not_wait_for_each() -> None:
    log = HeldEventLog()
    h = harness_with(log, text('{"steps": []}'), text("direct"), text("Done."))
    handle, watcher = await h.start()
    # The run waits for its `start` to be logged (so the client's first event goes out first) ...
    await until(lambda: bool(log.held))
    await asyncio.sleep(0)
    assert [event.type for event, _, _ in log.held] == [EventType.START]
    assert log.complete() == [EventType.START]
    assert [e.type for e in watcher.take_buffered(10)] == [EventType.START]
    # ... then produces every event up to `end` while none of them is written yet ...
    await until(lambda: bool(log.held) and log.held[-1][0].type is EventType.END)
    assert [event.seq for event, _, _ in log.held] == list(range(2, len(log.held) + 2))
    assert watcher.take_buffered(1000) == []
    assert handle.task is not None and not handle.task.done()  # ... and waits for its `end` to be logged
    written = log.complete()
    delivered = watcher.take_buffered(1000)
    assert [e.type for e in delivered] == written
    assert [e.seq for e in delivered] == [e.seq for e in log.events[handle.run_id]][1:]
    await handle.task
    assert delivered[-1].data["status"] == "completed"


async def test_a_log_failure_while_the_run_waits_for_approval_ends_it_with_a_typed_error() -> None:
    log = HeldEventLog()
    commit = RecordingTool("commit", requires_approval=True, result={"summary": "committed"})
    h = harness_with(log, text(PLAN), tool_call("commit", '{"value": "v"}'), text("note"), text("Done."),
                     tools=[commit])
    handle, watcher = await h.start()
    written: list[EventType] = []
    while EventType.HITL not in written:  # let every write succeed up to the `hitl`
        await until(lambda: bool(log.held))
        written += log.complete()
    await until(lambda: len(log.held) == 2)  # the run parks after two more events
    assert [t.value for t in log.complete(StoreUnavailable("Redis went away."))] == [
        "plan_step_update", "timeline_step_update"]
    await until(lambda: bool(log.held) and log.held[-1][0].type is EventType.END)
    log.complete()
    assert handle.task is not None
    await handle.task
    # the two events the log refused reach no client (a resume could not find them): the
    # watcher is moved to the log, which ends with the pair that says why the run ended
    assert watcher.overflowed and watcher.take_buffered(1000) == []
    events = log.events[handle.run_id]
    assert events[-3].type is EventType.HITL
    assert summary(events[-2:]) == [("error", "store_unavailable"), ("end", "failed", "store_unavailable")]
    assert events[-2].data["retryable"] is True
    assert commit.calls == []
    (request,) = h.store.requests.values()
    assert request.status.value == "cancelled"


async def test_a_failed_write_is_not_delivered_and_raised_at_the_runs_next_event_but_error_and_end_are_tried() -> None:
    log = HeldEventLog()
    failures: list[Exception] = []
    feed = RunFeed(log, Telemetry(), on_failure=failures.append)
    watcher = Subscription(100)
    feed.watchers.append(watcher)
    await feed.publish(content(1), None)
    log.complete(StoreUnavailable("down"))
    # not logged, so not delivered (a resume could not find it): the watcher resumes from the log
    assert watcher.overflowed and watcher.take_buffered(10) == []
    assert [type(f) for f in failures] == [StoreUnavailable]  # the run is told once
    with pytest.raises(StoreUnavailable):
        await feed.publish(content(2), None)
    error = Event(EventType.ERROR, 2, IDS, 0, {"errorType": "store_unavailable", "message": "m", "retryable": True})
    end = Event(EventType.END, 3, IDS, 0, {"status": "failed", "reason": "store_unavailable", "message": "m"})
    later = Subscription(100)  # attached since (a resume on this instance): it gets what is logged
    feed.watchers.append(later)
    await feed.publish(error, None)
    ending = asyncio.create_task(feed.publish(end, None))
    await until(lambda: len(log.held) == 2)
    log.complete()  # the store is back
    await ending  # `end` is never refused
    assert [e.type for e in later.take_buffered(10)] == [EventType.ERROR, EventType.END]
    assert watcher.take_buffered(10) == []
    assert len(failures) == 1


async def test_a_run_far_ahead_of_its_log_waits_until_half_of_it_is_written() -> None:
    log = HeldEventLog()
    feed = RunFeed(log, Telemetry(), on_failure=lambda _: None, max_unlogged=4)
    for seq in range(1, 4):
        await feed.publish(content(seq), None)  # no waiting below the bound
    fourth = asyncio.create_task(feed.publish(content(4), None))
    await until(lambda: len(log.held) == 4)
    await asyncio.sleep(0)
    assert not fourth.done()
    log.complete()
    await fourth
    assert [e.seq for e in log.events["run_1"]] == [1, 2, 3, 4]


async def test_a_busy_watcher_keeps_one_heartbeat_timer_however_many_times_it_waits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_at = loop.call_at

    def counting_call_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        timers.append(when)
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting_call_at)
    watcher = Subscription(10)

    async def produce() -> None:
        for seq in range(1, 1001):
            await asyncio.sleep(0)
            watcher.push(content(seq))

    producer = asyncio.create_task(produce())
    received = [await watcher.next(30) for _ in range(1000)]
    await producer
    assert [e.seq for e in received if e is not None] == list(range(1, 1001))
    assert len(timers) == 1  # a timer per wait would be 1,000
    watcher.close()


async def test_a_quiet_watcher_gets_its_heartbeat_after_the_interval_even_after_a_busy_spell() -> None:
    loop = asyncio.get_running_loop()
    watcher = Subscription(10)
    watcher.push(content(1))
    assert (await watcher.next(0.2)) == content(1)
    began = loop.time()
    waiting = asyncio.create_task(watcher.next(0.2))
    await asyncio.sleep(0.1)
    watcher.push(content(2))  # activity halfway: the first deadline must not become a heartbeat
    assert (await waiting) == content(2)
    rearmed = loop.time()
    assert await watcher.next(0.2) is None  # the quiet interval after the last event
    assert loop.time() - rearmed >= 0.2
    assert loop.time() - began < 5
    watcher.close()


async def waits_until_logged(log: HeldEventLog, waiting: Awaitable[None] | None) -> None:
    assert waiting is not None
    task = asyncio.ensure_future(waiting)
    await asyncio.sleep(0)
    assert not task.done()
    log.complete()
    await task


async def test_the_sink_makes_no_coroutine_for_an_event_the_run_need_not_wait_for() -> None:
    """A content chunk is submitted and the run goes on at once (`emit` returns None); an event the
    run waits for (`start`, `hitl`, `tool_execution`, `end`, or the log too far behind) returns
    what to await, and the wait ends only once it is logged."""
    log = HeldEventLog()
    feed = RunFeed(log, Telemetry(), on_failure=lambda _: None, max_unlogged=3)
    assert feed.emit(content(1)) is None
    assert feed.emit(content(2)) is None
    assert len(log.held) == 2
    await waits_until_logged(log, feed.emit(content(3)))  # the third unlogged: until half are written
    end = Event(EventType.END, 4, IDS, 0, {"status": "completed", "reason": "completed", "message": "m"})
    feed.run = None  # an `end` is logged with the run's snapshot: none here
    await waits_until_logged(log, feed._submit(end, None))
    assert [e.seq for e in log.events["run_1"]] == [1, 2, 3, 4]


async def test_a_refused_event_raises_from_the_sink_itself() -> None:
    log = HeldEventLog()
    feed = RunFeed(log, Telemetry(), on_failure=lambda _: None)
    assert feed.emit(content(1)) is None
    log.complete(StoreUnavailable("down"))
    with pytest.raises(StoreUnavailable):
        feed.emit(content(2))  # raised at the call, before anything is submitted
    assert log.held == []


def test_a_writer_takes_the_buffered_events_in_order_up_to_its_limit() -> None:
    watcher: Subscription[int] = Subscription(100)
    assert watcher.take_buffered(3) == []
    for seq in range(1, 6):
        watcher.push(seq)
    assert watcher.take_buffered(3) == [1, 2, 3]
    assert watcher.take_buffered(3) == [4, 5]
    assert watcher.take_buffered(3) == []
    watcher.push(6)
    watcher.detach()  # resumes from the log: nothing buffered is handed out any more
    assert watcher.take_buffered(3) == []
