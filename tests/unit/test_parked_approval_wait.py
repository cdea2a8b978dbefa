"""A run waiting for approval waits on its signal channel with a future, not a task and a queue
(docs/performance.md, "Parked runs"), and keeps a queue's behaviour: no signal lost, none read twice."""

from __future__ import annotations

import asyncio
import gc
from collections import deque
from typing import Any

import pytest

from adapters.redis.signals import SignalBusClosed, _Subscription
from domain.model.approval import ApprovalRequest, Signal
from domain.model.chat import ChatMessage, Purpose, Role, ToolCall, pack_messages, unpack_messages
from domain.model.events import Event
from domain.model.ports import Clock
from domain.services.gate import GateSettings
from domain.services.recheck import ApprovalRecheck
from tests.unit.fakes import (
    MemoryApprovalStore,
    MemorySignalBus,
    RecordingTool,
    ScriptedModel,
    _QueueSubscription,
    text,
    tool_call,
)
from tests.unit.harness import Harness, summary
from tests.unit.test_approval_gate import PLAN, finish, until

# -- a wait's view of its signal channel ---------------------------------------------------------------


async def test_a_signal_subscription_delivers_in_order_to_one_future_per_read() -> None:
    subscription = _Subscription(b"hitl:channel:s", queue_size=4)
    first = subscription.receive()
    assert not first.done()
    subscription.deliver(b"a")
    subscription.deliver(b"b")
    assert first.result() == b"a"
    assert await subscription.next_message() == b"b"
    assert not any(isinstance(ref, deque) for ref in gc.get_referents(subscription))  # nothing buffered


async def test_a_read_given_up_leaves_its_signal_for_the_next_read() -> None:
    subscription = _Subscription(b"hitl:channel:s", queue_size=4)
    given_up = subscription.receive()
    given_up.cancel()
    subscription.deliver(b"a")
    assert await asyncio.wait_for(subscription.next_message(), 1) == b"a"
    cancelled_read = asyncio.ensure_future(subscription.next_message())
    await asyncio.sleep(0)
    cancelled_read.cancel()
    await asyncio.gather(cancelled_read, return_exceptions=True)
    subscription.deliver(b"b")
    assert subscription.receive().result() == b"b"


async def test_a_full_signal_buffer_drops_the_oldest_and_the_end_comes_after_what_was_delivered() -> None:
    subscription = _Subscription(b"hitl:channel:s", queue_size=2)
    for payload in (b"1", b"2", b"3"):
        subscription.deliver(payload)
    waiting = _Subscription(b"hitl:channel:t", queue_size=2)
    pending = waiting.receive()
    subscription.end()
    waiting.end()
    assert [await subscription.next_message(), await subscription.next_message()] == [b"2", b"3"]
    for _ in range(2):  # every later read ends the same way
        with pytest.raises(SignalBusClosed):
            await subscription.next_message()
    with pytest.raises(SignalBusClosed):
        await pending


# -- the gate's wait ---------------------------------------------------------------------------------------

class _Delivering:
    """A fake channel buffer that completes the reader's future, as the Redis bus's subscription does."""

    def __init__(self) -> None:
        self.buffered: list[str | bytes] = []
        self.reader: asyncio.Future[str | bytes] | None = None

    def put_nowait(self, raw: str | bytes) -> None:
        if self.reader is not None and not self.reader.done():
            self.reader.set_result(raw)
        else:
            self.buffered.append(raw)


class _FutureSubscription(_QueueSubscription):
    def __init__(self) -> None:
        self.queue = _Delivering()  # type: ignore[assignment]

    def receive(self) -> asyncio.Future[str | bytes]:
        future: asyncio.Future[str | bytes] = asyncio.get_running_loop().create_future()
        channel: _Delivering = self.queue  # type: ignore[assignment]
        if channel.buffered:
            future.set_result(channel.buffered.pop(0))
        else:
            channel.reader = future
        return future


class _FutureSignalBus(MemorySignalBus):
    subscription_class = _FutureSubscription


class _WallClock(Clock):
    def now(self) -> float:
        import time
        return time.time()


def _gate_harness(bus: MemorySignalBus, settings: GateSettings, recheck_seconds: float,
                  clock: Clock | None = None) -> tuple[Harness, RecordingTool]:
    commit = RecordingTool("commit", requires_approval=True, result={"summary": "committed abc123"})
    model = ScriptedModel(text(PLAN), tool_call("commit", '{"value": "v"}'), text("step note"), text("All done."))
    h = Harness(model, tools=[commit], gate_settings=settings, recheck_seconds=recheck_seconds)
    h.bus = bus
    h.store.bus = bus
    if clock is not None:
        h.clock = clock  # type: ignore[assignment]
    h.rebuild()
    return h, commit


_PROCESS_TASKS = {"aura-hitl-recheck", "run lease renewal"}


async def test_a_parked_run_waits_in_its_own_task_alone_and_a_signal_still_wakes_it() -> None:
    h, commit = _gate_harness(_FutureSignalBus(), GateSettings(timeout_seconds=300), 5)
    handle, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    for _ in range(20):
        await asyncio.sleep(0)
    others = {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and t.get_name() not in _PROCESS_TASKS}
    assert others == {handle.task}, f"tasks while parked: {[t.get_name() for t in others]}"
    await h.bus.publish(handle.run.ids.session_id, Signal.approval(hitl.data["requestId"], "bob", 1))
    events = await finish(watcher, seen)
    assert commit.calls == [{"value": "v"}] and summary(events)[-1] == ("end", "completed", "completed")


async def test_a_wait_nobody_decides_ends_at_its_expiry_though_the_next_recheck_is_far_later() -> None:
    # The re-check's read is a minute away: only the process's expiry timer can end it in time.
    h, commit = _gate_harness(MemorySignalBus(), GateSettings(timeout_seconds=1), 60, _WallClock())
    _, watcher = await h.start()
    seen: list[Event] = []
    async with asyncio.timeout(5):
        events = await finish(watcher, seen)
    assert summary(events)[-2:] == [("error", "hitl_timeout"), ("end", "timeout", "hitl_timeout")]
    assert commit.calls == [] and h.bus.subscribers == {}


# -- the agent's conversation while it waits -------------------------------------------------------------

def test_packed_messages_come_back_equal() -> None:
    messages = [
        ChatMessage(Role.SYSTEM, 'page {"title": "é \ud800 ✓"}'),
        ChatMessage(Role.USER, "prompt\nwith lines"),
        ChatMessage(Role.ASSISTANT, "", tool_calls=(ToolCall("call_1", "commit", '{"value": "v"}'),
                                                      ToolCall("call_2", "log", ""))),
        ChatMessage(Role.TOOL, "x" * 5000, tool_call_id="call_1", name="commit"),
    ]
    packed = pack_messages(messages)
    assert unpack_messages(packed) == messages
    assert len(packed) < 1000  # compressed: the tool result repeats itself


def _frame_locals(task: asyncio.Task[Any], name: str) -> dict[str, Any]:
    coro: Any = task.get_coro()
    while coro is not None:
        if coro.cr_code.co_name == name:
            return dict(coro.cr_frame.f_locals)
        coro = coro.cr_await
    raise AssertionError(f"{name} is not in the run's chain")


async def test_a_run_approved_after_parking_goes_on_with_its_whole_conversation() -> None:
    commit = RecordingTool("commit", requires_approval=True, result={"summary": "committed abc123"})
    model = ScriptedModel(text(PLAN), tool_call("commit", '{"value": "v"}'), text("step note"), text("All done."))
    h = Harness(model, tools=[commit])
    context = {"title": "Repo overview", "metadata": {"owner": "alice", "notes": "n" * 2000}}
    handle, watcher = await h.start("Commit the work", context=context)
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    for _ in range(20):
        await asyncio.sleep(0)
    assert _frame_locals(handle.task, "_carry_out")["messages"] == []  # packed while it waits
    await h.bus.publish(handle.run.ids.session_id, Signal.approval(hitl.data["requestId"], "bob", 1))
    events = await finish(watcher, seen)
    assert commit.calls == [{"value": "v"}] and summary(events)[-1] == ("end", "completed", "completed")

    _, before, after, answer = model.requests
    assert before.purpose is Purpose.STEP and after.purpose is Purpose.STEP and answer.purpose is Purpose.ANSWER
    system = before.messages[0]
    assert system.role is Role.SYSTEM and '"owner": "alice"' in system.content and "n" * 2000 in system.content
    # after the approval the model sees everything it saw before, then its call and the result
    assert list(after.messages[:len(before.messages)]) == list(before.messages)
    call, result = after.messages[len(before.messages):]
    assert call == ChatMessage(Role.ASSISTANT, "", tool_calls=(ToolCall("call_1", "commit", '{"value": "v"}'),))
    assert result.role is Role.TOOL and result.tool_call_id == "call_1" and "committed abc123" in result.content
    assert after.hints["step"] == before.hints["step"] and after.hints["context"] == context
    assert list(answer.messages[:len(after.messages)]) == list(after.messages)


async def test_the_recheck_wakes_each_wait_at_its_own_expiry_and_not_a_wait_that_ended() -> None:
    clock = _WallClock()
    recheck = ApprovalRecheck(MemoryApprovalStore(), clock, interval_seconds=60)
    now = int(clock.now())
    later, sooner, ended = pending_request(1, now + 2), pending_request(2, now + 1), pending_request(3, now + 1)
    woken_later, woken_sooner, woken_ended = recheck.watch(later), recheck.watch(sooner), recheck.watch(ended)
    recheck.unwatch(ended.request_id, woken_ended)
    async with asyncio.timeout(5):
        assert await woken_sooner is sooner  # the still pending request: its expiry is due
        assert not woken_later.done() and clock.now() >= sooner.expires_at
        assert await woken_later is later
    assert clock.now() >= later.expires_at and woken_ended.cancelled()
    for request, woken in ((later, woken_later), (sooner, woken_sooner)):
        recheck.unwatch(request.request_id, woken)
    assert recheck.watching() == 0


def pending_request(number: int, expires_at: int) -> ApprovalRequest:
    return ApprovalRequest(
        request_id=f"req_{number}", session_id=f"ses_{number}", run_id=f"run_{number}", action_type="commit",
        tool_name="commit", message="Commit?", context={}, user_id="alice", tenant_id="acme",
        created_at=expires_at - 300, expires_at=expires_at)
