"""What a run waiting for approval keeps in memory (docs/performance.md, "Parked runs"): each
saving here is pinned, and so is the behaviour it must keep."""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
import types
from collections import deque
from contextvars import Context, ContextVar
from typing import Any

import orjson
import pytest
from quart import Quart, request

from adapters.http.asgi import SendTimeoutMiddleware
from adapters.http.routes.stream import forget_body
from adapters.http.streams import StreamMeter, StreamSlot, StreamSlots, live_frames
from adapters.wire import envelope_bytes, exact_bytes
from domain.model.approval import Signal
from domain.model.chat import (
    ChatMessage,
    ContentDelta,
    Finish,
    Role,
    ToolCall,
    ToolCallDelta,
    pack_messages,
    unpack_messages,
)
from domain.model.events import Event, EventType, RunIds
from domain.model.telemetry import _log_context
from domain.runtime.deadlines import SharedTimer, Timer
from domain.runtime.feed import RunFeed, Subscription, SubscriptionOverflow
from domain.services.agent import _Conversation
from domain.services.watch import RunWatch
from tests.defaults import stream_config
from tests.unit.fakes import RecordingTool, ScriptedModel, text
from tests.unit.harness import Harness, summary
from tests.unit.test_approval_gate import approval_harness, finish, until

IDS = RunIds("run_1", "ses_1", "thr_1", "t" * 32)


def event(seq: int, type_: EventType = EventType.THOUGHT) -> Event:
    return Event(type_, seq, IDS, 0, {"content": "x" * 200})


# -- the encoded envelope kept with an event -------------------------------------------------------

def test_an_events_envelope_bytes_take_their_own_size_not_orjsons_buffer() -> None:
    sample = event(1)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        encoded = envelope_bytes(sample)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert orjson.loads(encoded) == sample.envelope()
    assert envelope_bytes(sample) is encoded  # encoded once, shared
    assert grown < 2 * len(encoded) + 512, f"{grown} bytes kept for {len(encoded)} bytes of envelope"


def test_exact_bytes_keeps_the_content() -> None:
    raw = orjson.dumps({"a": "é" * 100})
    assert exact_bytes(raw) == raw


# -- a watcher's buffer --------------------------------------------------------------------------------

def _holds_a_deque(watcher: Subscription) -> bool:
    return any(isinstance(ref, deque) for ref in gc.get_referents(watcher))


async def test_a_watcher_waiting_on_an_empty_buffer_holds_no_deque_and_still_gets_every_event() -> None:
    watcher: Subscription[Event] = Subscription(max_buffered=8)
    for seq in (1, 2):
        watcher.push(event(seq))
    assert [(await watcher.next(1.0)).seq, (await watcher.next(1.0)).seq] == [1, 2]  # type: ignore[union-attr]
    waiting = asyncio.ensure_future(watcher.next(5.0))
    await asyncio.sleep(0)
    assert not waiting.done() and not _holds_a_deque(watcher)
    watcher.push(event(3))
    watcher.push(event(4))
    assert (await waiting).seq == 3  # type: ignore[union-attr]
    assert [e.seq for e in watcher.take_buffered(10)] == [4]
    watcher.close()


async def test_waiting_watchers_hold_no_loop_timer_of_their_own_and_each_gets_its_heartbeat() -> None:
    """A loop timer (handle and libuv timer) is about half a KiB held by every parked stream; the
    watchers' heartbeats share one."""
    loop = asyncio.get_running_loop()
    scheduled = len(loop._scheduled)  # type: ignore[attr-defined]
    watchers: list[Subscription[Event]] = [Subscription(max_buffered=8) for _ in range(50)]
    waits = [asyncio.ensure_future(watcher.next(0.05 + index * 0.001)) for index, watcher in enumerate(watchers)]
    await asyncio.sleep(0)
    assert len(loop._scheduled) - scheduled <= 1  # type: ignore[attr-defined]
    watchers[7].push(event(1))
    assert [await wait for wait in waits] == [None] * 7 + [event(1)] + [None] * 42
    for watcher in watchers:
        watcher.close()


async def test_a_quiet_watcher_still_gets_its_heartbeat_and_an_overflow_still_raises() -> None:
    watcher: Subscription[Event] = Subscription(max_buffered=2)
    assert await watcher.next(0.01) is None
    for seq in range(1, 4):
        watcher.push(event(seq))
    with pytest.raises(SubscriptionOverflow):
        await watcher.next(1.0)
    assert not _holds_a_deque(watcher)  # the overflowed buffer was freed at once
    watcher.close()


# -- the SSE writer of a live stream ------------------------------------------------------------------

class _Watch:
    """A reader of a run as the SSE writer sees it (RunWatch's surface), over a bare subscription."""

    def __init__(self, subscription: Subscription[Event], run_waits_for_a_human: bool) -> None:
        self.subscription = subscription
        self.run_waits_for_a_human = run_waits_for_a_human
        self.releases: list[bool] = []

    def next(self, wait_seconds: float | None) -> Any:
        return self.subscription.next(wait_seconds)

    def take_buffered(self, limit: int) -> list[Event]:
        return self.subscription.take_buffered(limit)

    def release(self, *, disconnected: bool) -> None:
        self.releases.append(disconnected)


async def test_a_stream_whose_run_waits_for_a_human_holds_none_of_the_events_or_frames_it_wrote() -> None:
    watcher: Subscription[Event] = Subscription(max_buffered=64)
    release = _Watch(watcher, run_waits_for_a_human=True)
    frames = live_frames(release, stream_config(heartbeat_seconds=60))  # type: ignore[arg-type]
    watcher.push(event(1, EventType.HITL))
    watcher.push(event(2, EventType.PLAN_STEP_UPDATE))
    first = await frames.__anext__()
    assert first.startswith(b"id: run_1:1\nevent: hitl\n") and b"id: run_1:2\nevent: plan_step_update\n" in first
    # an empty body, so that the server's send loop lets go of the last frame it sent
    assert await frames.__anext__() == b""
    waiting = asyncio.ensure_future(frames.__anext__())
    await asyncio.sleep(0)
    assert not waiting.done()
    frame = frames.ag_frame  # type: ignore[attr-defined]
    assert frame is not None
    held = [value for value in frame.f_locals.values() if isinstance(value, Event | bytes) and value]
    assert held == [], f"the waiting stream holds {held}"
    release.run_waits_for_a_human = False
    watcher.push(Event(EventType.END, 3, IDS, 0, {"status": "completed", "reason": "completed", "message": "m"}))
    last = await waiting
    assert last.startswith(b"id: run_1:3\nevent: end\n") and last.endswith(b"data: [DONE]\n\n")
    with pytest.raises(StopAsyncIteration):
        await frames.__anext__()
    assert release.releases == [False]  # the stream ended: not a disconnect


async def test_a_stream_whose_run_is_working_writes_no_empty_bodies() -> None:
    watcher: Subscription[Event] = Subscription(max_buffered=64)
    release = _Watch(watcher, run_waits_for_a_human=False)
    frames = live_frames(release, stream_config(heartbeat_seconds=60))  # type: ignore[arg-type]
    watcher.push(event(1, EventType.PLAN_STEP_UPDATE))
    assert (await frames.__anext__()).startswith(b"id: run_1:1\nevent: plan_step_update\n")
    waiting = asyncio.ensure_future(frames.__anext__())
    await asyncio.sleep(0)
    assert not waiting.done()  # no empty body: it waits for the next event
    watcher.push(event(2, EventType.THOUGHT))
    assert (await waiting).startswith(b"id: run_1:2\nevent: thought\n")
    await frames.aclose()
    assert release.releases == [True]  # the client went away


# -- what a started run keeps ------------------------------------------------------------------------

_REQUEST_SCOPED: ContextVar[str] = ContextVar("request_scoped")  # stands for Quart's request context


def _contexts(obj: Any) -> list[Context]:
    """The contexts an object refers to, directly or through its callbacks' tuples and lists."""
    found: list[Context] = []
    todo, seen = [obj], set()
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        for ref in gc.get_referents(item):
            if isinstance(ref, Context):
                found.append(ref)
            elif isinstance(ref, (list, tuple)):
                todo.append(ref)
    return found


async def test_a_parked_run_keeps_nothing_of_the_request_it_was_started_from() -> None:
    h, commit = approval_harness()
    token = _REQUEST_SCOPED.set("the request")
    try:
        handle, watcher = await h.start()
    finally:
        _REQUEST_SCOPED.reset(token)
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    contexts = _contexts(handle.task)
    assert contexts and all(_REQUEST_SCOPED not in context for context in contexts)
    flat = contexts[0][_log_context]  # the log context goes on, with the run's ids
    logged = dict(zip(flat[::2], flat[1::2], strict=True))
    assert logged["runId"] == handle.run_id and logged["tenantId"] == "acme"
    # the run's own objects: no __dict__, no closures
    feed = handle.run._sink.__self__
    assert isinstance(feed, RunFeed) and feed.run is handle.run and feed.on_failure == handle.fail
    for kept in (handle.run, feed):
        assert not hasattr(kept, "__dict__")
        assert not any(isinstance(ref, types.FunctionType) for ref in gc.get_referents(kept))
    # while it waits the agent holds neither the history nor the context nor the model hints
    chain = _frame_locals_by_name(handle.task)
    assert not {"history", "context", "hints"} & set(chain["execute"]) and "history" not in chain["_drive"]
    assert "hints" not in chain["_carry_out"]
    packed = chain["_carry_out"]["packed"]
    assert len(packed) < len(pack_messages(unpack_messages(packed, h.agent._zdict))) / 2
    # nor the tool events' common fields (rebuilt after the wait), nor a second copy of the
    # arguments in the approval request, nor its stored record; its watchers are a list, not a set
    assert not any("base" in frame for frame in chain.values()) and "created" not in chain["await_decision"]
    assert chain["await_decision"]["request"].context is chain["_carry_out"]["args"]
    assert type(feed.watchers) is list and feed.watchers == [watcher]
    await h.bus.publish(handle.run.ids.session_id, Signal.approval(hitl.data["requestId"], "bob", 1))
    events = await finish(watcher, seen)
    assert commit.calls == [{"value": "v"}] and summary(events)[-1] == ("end", "completed", "completed")


async def test_a_call_waiting_for_approval_holds_no_earlier_result_or_reply_of_its_step_unpacked() -> None:
    """A step that reads (a file, a diff) and then asks to act on it: while the second call waits,
    the first call's result and the model's replies are in the packed conversation only."""
    read_result = "R" * 20_000
    reader = RecordingTool("read", result={"content": read_result})
    commit = RecordingTool("commit", requires_approval=True, result={"summary": "committed abc123"})
    reply = "Reading it first. " * 200
    plan = json.dumps({"steps": [{"description": "Read, then commit", "tool": "read"}]})
    model = ScriptedModel(
        text(plan),
        [ContentDelta(reply), ToolCallDelta(index=0, id="call_1", name="read", arguments='{"value": "a"}'),
         Finish("tool_calls")],
        [ContentDelta("Now the commit. " * 200),
         ToolCallDelta(index=0, id="call_2", name="commit", arguments='{"value": "v"}'), Finish("tool_calls")],
        text("step note"), text("All done."))
    h = Harness(model, tools=[reader, commit])
    handle, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    frames = _frame_locals_by_name(handle.task)
    assert "packed" in frames["_carry_out"] and frames["_carry_out"]["messages"] == []
    held = [name for chain in frames.values() for name, value in chain.items()
            if isinstance(value, str) and ("RRRR" in value or "Now the commit." in value or "Reading it" in value)]
    assert held == [], f"held unpacked while waiting: {held}"
    await h.bus.publish(handle.run.ids.session_id, Signal.approval(hitl.data["requestId"], "bob", 1))
    events = await finish(watcher, seen)
    assert reader.calls == [{"value": "a"}] and commit.calls == [{"value": "v"}]
    assert summary(events)[-1] == ("end", "completed", "completed")
    # the conversation came back whole after the wait: the turn after the commit has the read's
    # result (as the model is given one: cut to its budget) and both replies
    after = model.requests[3].messages
    assert any(m.role is Role.TOOL and "R" * 2000 in m.content for m in after)
    assert any(m.role is Role.ASSISTANT and m.content == reply for m in after)
    assert any(m.role is Role.ASSISTANT and m.content == "Now the commit. " * 200 for m in after)


async def test_a_parked_run_waits_in_four_suspended_frames_and_still_goes_on_after_the_decision() -> None:
    """Every suspended frame of a parked run (a coroutine with its locals and stack, about 0.3-0.45
    KiB) is held by every parked run: the run's task, the agent's run and step, and the gate's
    wait, which has no coroutine of its own, nor has the tool call."""
    h, commit = approval_harness()
    handle, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    chain = _frame_locals_by_name(handle.task)
    assert list(chain) == ["_drive", "execute", "_carry_out", "await_decision"]
    # what the gate's wait holds: its two ways out and the request, nothing of a signal it read
    assert {"rechecked", "signalled", "request"} <= set(chain["await_decision"])
    assert not {"raw", "current", "considered"} & set(chain["await_decision"])
    # and waits on the re-check's future, which its signal also wakes: no third future made for both
    assert handle.task._fut_waiter is chain["await_decision"]["rechecked"]  # type: ignore[attr-defined]
    await h.bus.publish(handle.run.ids.session_id, Signal.approval(hitl.data["requestId"], "bob", 1))
    events = await finish(watcher, seen)
    assert commit.calls == [{"value": "v"}] and summary(events)[-1] == ("end", "completed", "completed")
    statuses = [e.data["status"] for e in events if e.type is EventType.TOOL_EXECUTION]
    assert statuses == ["pending", "running", "success"]


async def test_a_parked_conversation_keeps_no_empty_set_of_what_the_user_was_told() -> None:
    """An empty set is 216 bytes; what the user was told about fitting the context window is an
    empty frozenset (shared by every run) until something is told."""
    h, _ = approval_harness()
    handle, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    told = _frame_locals_by_name(handle.task)["execute"]["conversation"].told
    assert type(told) is frozenset and told is _Conversation([], 0, 0).told
    await h.bus.publish(handle.run.ids.session_id, Signal.approval(hitl.data["requestId"], "bob", 1))
    await finish(watcher, seen)


def _frame_locals_by_name(task: asyncio.Task[Any]) -> dict[str, dict[str, Any]]:
    chain: dict[str, dict[str, Any]] = {}
    coro: Any = task.get_coro()
    while coro is not None and hasattr(coro, "cr_frame"):
        chain[coro.cr_code.co_name] = dict(coro.cr_frame.f_locals)
        coro = coro.cr_await
    return chain


class _Runs:
    """Records how each watched stream was released."""

    def __init__(self) -> None:
        self.released: list[bool] = []

    def release(self, handle: Any, watcher: Any, *, disconnected: bool) -> None:
        self.released.append(disconnected)


async def test_a_streams_release_callback_keeps_no_request_context() -> None:
    runs = _Runs()

    async def request_task() -> None:
        _REQUEST_SCOPED.set("the request")
        RunWatch(runs, None, None).release_when_done(asyncio.current_task())  # type: ignore[arg-type]
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(request_task())
    await asyncio.sleep(0)
    contexts = _contexts(task)
    assert len(contexts) == 2  # the task's own context, and its done callback's
    assert sum(_REQUEST_SCOPED in context for context in contexts) == 1  # the task's own only
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    assert runs.released == [True]  # released all the same


async def test_a_streams_release_callbacks_share_one_empty_context_and_the_slot_is_its_own_callback() -> None:
    """A Context (64 bytes) per callback and a bound method (64) per stream, held by every parked
    stream: the slot is the callback itself, and both callbacks run in one shared empty context."""
    slots = StreamSlots(per_user=2, per_run=2)
    runs = _Runs()

    async def request_task() -> None:
        _REQUEST_SCOPED.set("the request")
        slots.take("acme", "alice", None)
        RunWatch(runs, None, None).release_when_done(asyncio.current_task())  # type: ignore[arg-type]
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(request_task())
    await asyncio.sleep(0)
    callbacks = task._callbacks  # type: ignore[attr-defined]
    assert len(callbacks) == 2 and isinstance(callbacks[0][0], StreamSlot)
    assert callbacks[0][1] is callbacks[1][1] and _REQUEST_SCOPED not in callbacks[0][1]
    assert slots.open_streams("acme", "alice") == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    assert runs.released == [True] and slots.open_streams("acme", "alice") == 0  # both released all the same


def test_the_objects_an_open_stream_keeps_have_no_dict() -> None:
    kept_objects = (RunWatch(None, None, None), StreamMeter(None, "run"), Timer(), SharedTimer(),  # type: ignore[arg-type]
                    Subscription(1))
    for kept in kept_objects:
        assert not hasattr(kept, "__dict__")


async def test_the_bounded_send_a_stream_keeps_is_no_closure_and_still_sends() -> None:
    sent: list[dict[str, Any]] = []
    kept: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        kept.append(send)
        await send({"type": "http.response.body", "body": b"x"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await SendTimeoutMiddleware(app, timeout_seconds=30)({"type": "http"}, None, send)
    assert sent == [{"type": "http.response.body", "body": b"x"}]
    assert not isinstance(kept[0], types.FunctionType) and not hasattr(kept[0], "__dict__")


async def test_a_streams_request_forgets_its_body_once_validated() -> None:
    app = Quart(__name__)
    async with app.test_request_context("/", method="POST", json={"prompt": "p" * 1000}):
        assert (await request.get_json())["prompt"] == "p" * 1000
        forget_body()
        assert request._cached_json == {False: Ellipsis, True: Ellipsis}
        assert await request.get_data() == b""


def test_a_conversation_packs_far_smaller_with_the_agents_dictionary() -> None:
    h, _ = approval_harness()
    zdict = h.agent._zdict
    messages = [
        ChatMessage(Role.SYSTEM, "You are Aura, the assistant of the Digital Work Platform (DWP). é \ud800"),
        ChatMessage(Role.USER, "Commit the work"),
        ChatMessage(Role.ASSISTANT, "", tool_calls=(ToolCall("call_1", "commit", '{"value": "v"}'),)),
    ]
    packed = pack_messages(messages, zdict)
    assert unpack_messages(packed, zdict) == messages
    assert len(packed) < len(pack_messages(messages)) * 0.75
