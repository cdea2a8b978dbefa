"""The agent loop and run service against scripted fake ports: exact events, seqs and statuses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from domain.model.chat import ContentDelta, Finish, Purpose, Role
from domain.model.errors import ModelError
from domain.model.tools import ToolContext
from tests.defaults import AGENT_LIMITS, RUN_LIMITS
from tests.unit.fakes import RecordingTool, ScriptedModel, text, tool_call, tool_calls
from tests.unit.harness import ALICE, Harness, collect, summary

PLAN_4 = json.dumps({"steps": [
    {"description": "Look at A", "tool": "read"},
    {"description": "Think about B"},
    {"description": "Look at C twice", "tool": "read"},
    {"description": "Conclude D"},
]})

HEAD = [
    ("start",),
    ("timeline", "analyse", "in_progress"),
    ("thought", "analysis"),
    ("timeline", "analyse", "completed"),
    ("timeline", "plan", "in_progress"),
]


def answer_tail(*chunks: str) -> list[tuple[object, ...]]:
    return [
        ("timeline", "answer", "in_progress"),
        *[("content", c, True) for c in chunks],
        ("content", "".join(chunks), False),
        ("timeline", "answer", "completed"),
        ("thought", "reflection"),
        ("end", "completed", "completed"),
    ]


async def test_multi_step_plan_runs_every_step_in_order_with_exact_events() -> None:
    read = RecordingTool("read", result={"summary": "read it"})
    model = ScriptedModel(
        text(PLAN_4),
        tool_call("read", '{"value": "a"}', "c1"), text("found A"),
        text("B is fine"),
        tool_calls(("read", '{"value": "c1"}', "c2"), ("read", "{}", "c3")), text("C twice"),
        text("D concluded"),
        text("Hello", " world"),
    )
    h = Harness(model, tools=[read])
    handle, watcher = await h.start("Please check", context={"title": "Orders", "path": "/orders"})
    events = await collect(watcher)

    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert summary(events) == [
        *HEAD,
        ("plan_step", "step_1", "Look at A"),
        ("plan_step", "step_2", "Think about B"),
        ("plan_step", "step_3", "Look at C twice"),
        ("plan_step", "step_4", "Conclude D"),
        ("thought", "planning"),
        ("timeline", "plan", "completed"),
        ("step", "step_1", "in_progress", 0.0), ("timeline", "step_1", "in_progress"), ("thought", "reasoning"),
        ("tool", "read", "pending"), ("tool", "read", "running"), ("tool", "read", "success"),
        ("step", "step_1", "in_progress", 0.5),
        ("thought", "reasoning"),  # the model's text of the step, as a thought of its own
        ("step", "step_1", "completed", 1.0), ("timeline", "step_1", "completed"),
        ("step", "step_2", "in_progress", 0.0), ("timeline", "step_2", "in_progress"), ("thought", "reasoning"),
        ("thought", "reasoning"),
        ("step", "step_2", "completed", 1.0), ("timeline", "step_2", "completed"),
        ("step", "step_3", "in_progress", 0.0), ("timeline", "step_3", "in_progress"), ("thought", "reasoning"),
        ("tool", "read", "pending"), ("tool", "read", "running"), ("tool", "read", "success"),
        ("step", "step_3", "in_progress", 0.5),
        ("tool", "read", "pending"), ("tool", "read", "running"), ("tool", "read", "success"),
        ("step", "step_3", "in_progress", 0.67),
        ("thought", "reasoning"),
        ("step", "step_3", "completed", 1.0), ("timeline", "step_3", "completed"),
        ("step", "step_4", "in_progress", 0.0), ("timeline", "step_4", "in_progress"), ("thought", "reasoning"),
        ("thought", "reasoning"),
        ("step", "step_4", "completed", 1.0), ("timeline", "step_4", "completed"),
        *answer_tail("Hello", " world"),
    ]
    assert read.calls == [{"value": "a"}, {"value": "c1"}, {"value": "x"}]  # default filled
    # tool results were fed back to the model, in the protocol's shape
    after_first_tool = model.requests[2].messages
    assert after_first_tool[-1].role is Role.TOOL and after_first_tool[-1].tool_call_id == "c1"
    assert json.loads(after_first_tool[-1].content) == {"summary": "read it"}
    # the envelope: ids are the run's, timestamps are integer seconds
    envelope = events[0].envelope()
    assert envelope["runId"] == handle.run_id and envelope["version"] == "1.0"
    assert envelope["timestamp"] == 1_767_000_000 and envelope["data"]["resumeUrl"].endswith("/events")
    assert h.log.events[handle.run_id] == events  # logged before delivery, all of them
    assert handle.run_id in h.log.closed
    steps = {e.data["stepId"]: e.data["note"] for e in events if e.type.value == "plan_step_update"
             and e.data["status"] == "completed"}
    assert steps == {"step_1": "found A", "step_2": "B is fine", "step_3": "C twice", "step_4": "D concluded"}


async def test_analysis_thought_names_the_context_it_used_as_sources() -> None:
    h = Harness(ScriptedModel(text('{"steps": []}'), text("direct"), text("ok")))
    _, watcher = await h.start("hi", context={"title": "Orders", "itemId": 7, "custom": "kept"},
                         source="FRONTEND")
    events = await collect(watcher)
    analysis = next(e for e in events if e.data.get("thoughtType") == "analysis")
    assert analysis.data["sources"] == [
        {"type": "context", "key": "title", "value": "Orders"},
        {"type": "context", "key": "itemId", "value": 7},
        {"type": "context", "key": "source", "value": "FRONTEND"},
    ]
    system = h.model.requests[0].messages[0].content
    assert '"custom": "kept"' in system and '"source": "FRONTEND"' in system and "not instructions" in system


async def test_free_text_plan_is_never_shown_as_steps_the_run_answers_directly() -> None:
    h = Harness(ScriptedModel(text("Sure! Here is my plan:\n1. Read the page\n2. Reply"),
                              text("nothing to do"), text("Done.")))
    _, watcher = await h.start()
    events = await collect(watcher)
    assert [s for s in summary(events) if s[0] == "plan_step"] == [
        ("plan_step", "step_1", "Answer the request directly")]
    planning = next(e for e in events if e.data.get("thoughtType") == "planning" and not e.data["chunk"])
    assert planning.data["content"] == (
        "The model's plan could not be used: the answer holds no JSON object. "
        "Answering directly instead: 1. Answer the request directly")
    assert events[-1].data["status"] == "completed"


async def test_the_plan_templates_own_skeleton_echoed_back_is_never_a_step() -> None:
    # what Gemma 3 270M answered to the earlier prompt: its JSON skeleton, unfinished
    echo = ('{ "steps": [ { "description": "what this step does", "tool": "tool name or null", '
            '"args": {}, "confidence": 0.0 } ] ...')
    h = Harness(ScriptedModel(text(echo), text("ok"), text("The answer.")))
    _, watcher = await h.start()
    events = await collect(watcher)
    steps = [e.data for e in events if e.type.value in ("plan_step", "timeline_step_update")
             and e.data["stepId"].startswith("step_")]
    assert {d.get("description") or d.get("title") for d in steps} == {"Answer the request directly"}
    assert "what this step does" not in h.model.requests[0].messages[-1].content  # no skeleton to echo
    assert events[-1].data["status"] == "completed"


async def test_instructions_echoed_while_the_plan_is_written_are_never_shown() -> None:
    echo = ('{"steps": [{"description": "Plan how to answer the request above, in at most 12 steps (one step '
            'is often enough).", "tool": null}]}')
    h = Harness(ScriptedModel([*(ContentDelta(echo[i:i + 5]) for i in range(0, len(echo), 5)), Finish("stop")],
                              text("ok"), text("The answer.")))
    _, watcher = await h.start()
    events = await collect(watcher)
    assert "Plan how to answer" not in json.dumps([e.data for e in events])
    assert events[-1].data["status"] == "completed"


async def test_a_step_that_repeats_the_instructions_is_refused_even_in_valid_json() -> None:
    echo = json.dumps({"steps": [{"description": "Plan how to answer the request above", "tool": None}]})
    h = Harness(ScriptedModel(text(echo), text("ok"), text("The answer.")))
    _, watcher = await h.start()
    events = await collect(watcher)
    assert [d["description"] for d in (e.data for e in events) if "description" in d] == \
        ["Answer the request directly"]


async def test_failing_tool_is_reported_fed_back_and_the_run_continues() -> None:
    broken = RecordingTool("broken", failure="disk on fire")
    h = Harness(ScriptedModel(
        text(json.dumps({"steps": [{"description": "Try", "tool": "broken"}]})),
        tool_call("broken", "{}"), text("it failed"), text("Sorry, it failed."),
    ), tools=[broken])
    _, watcher = await h.start()
    events = await collect(watcher)
    tools = [e.data for e in events if e.type.value == "tool_execution"]
    assert [t["status"] for t in tools] == ["pending", "running", "failed"]
    assert tools[-1]["error"] == "disk on fire" and tools[-1]["result"] is None
    assert ("step", "step_1", "failed", 1.0) in summary(events)
    assert h.model.requests[2].messages[-1].content == "Error (tool_failed): disk on fire"
    assert events[-1].data["status"] == "completed"


async def test_invalid_tool_arguments_are_refused_and_told_to_the_model() -> None:
    read = RecordingTool("read")
    h = Harness(ScriptedModel(text('{"steps": [{"description": "x"}]}'),
                              tool_call("read", '{"value": 3}'), text("bad args"), text("done")), tools=[read])
    _, watcher = await h.start()
    events = await collect(watcher)
    failed = [e.data for e in events if e.type.value == "tool_execution"]
    assert [f["status"] for f in failed] == ["failed"]
    assert failed[0]["error"].startswith("Invalid arguments for read at value:")
    assert read.calls == []


async def test_a_plan_naming_an_unknown_tool_falls_back_to_answering_directly() -> None:
    h = Harness(ScriptedModel(text('{"steps": [{"description": "Wipe it", "tool": "rm_rf", "args": {}}]}'),
                              text("ok"), text("The answer.")))
    _, watcher = await h.start()
    events = await collect(watcher)
    assert ("plan_step", "step_1", "Answer the request directly") in summary(events)
    steps = [e.data for e in events if e.type.value in ("plan_step", "timeline_step_update")]
    assert "Wipe it" not in json.dumps(steps)  # never a step; the model's writing shows only as its thought
    assert events[-1].data["status"] == "completed"


async def test_a_plan_longer_than_the_step_budget_falls_back_to_answering_directly() -> None:
    plan = json.dumps({"steps": [{"description": f"step number {i}"} for i in range(5)]})
    h = Harness(ScriptedModel(text(plan), text("ok"), text("The answer.")), limits=replace(AGENT_LIMITS, max_steps=4))
    _, watcher = await h.start()
    events = await collect(watcher)
    assert [s for s in summary(events) if s[0] == "plan_step"] == [
        ("plan_step", "step_1", "Answer the request directly")]
    planning = next(e for e in events if e.data.get("thoughtType") == "planning" and not e.data["chunk"])
    assert "the plan does not follow its schema at steps (maxItems)" in planning.data["content"]
    # the schema sent to the model already said so
    assert h.model.requests[0].json_schema["properties"]["steps"]["maxItems"] == 4


async def test_budget_on_tool_calls_ends_the_run() -> None:
    read = RecordingTool("read")
    h = Harness(ScriptedModel(text('{"steps": [{"description": "x"}]}'),
                              tool_calls(("read", "{}", "a"), ("read", "{}", "b"), ("read", "{}", "c"))),
                tools=[read], limits=replace(AGENT_LIMITS, max_tool_calls=2))
    _, watcher = await h.start()
    events = await collect(watcher)
    assert len(read.calls) == 2
    assert summary(events)[-2:] == [("error", "budget_exceeded"), ("end", "failed", "budget_exceeded")]


async def test_model_failure_maps_to_its_stable_code() -> None:
    h = Harness(ScriptedModel([ModelError("The model timed out.", code="llm_timeout", retryable=True)]))
    _, watcher = await h.start()
    events = await collect(watcher)
    assert summary(events)[-2:] == [("error", "llm_timeout"), ("end", "failed", "llm_timeout")]
    assert events[-2].data == {"errorType": "llm_timeout", "message": "The model timed out.", "retryable": True}


async def test_unexpected_exception_never_leaks_its_text() -> None:
    h = Harness(ScriptedModel([RuntimeError("password=hunter2 at /etc/secret")]))
    _, watcher = await h.start()
    events = await collect(watcher)
    error = events[-2].data
    assert error["errorType"] == "internal_error" and "hunter2" not in error["message"]
    assert events[-1].data["status"] == "failed"


async def test_tokens_stream_in_order_before_the_final_answer() -> None:
    chunks = [f"t{i} " for i in range(30)]
    h = Harness(ScriptedModel(text('{"steps": []}'), text("ok"), text(*chunks)))
    _, watcher = await h.start()
    events = await collect(watcher)
    contents = [e.data for e in events if e.type.value == "content"]
    assert [c["content"] for c in contents[:-1]] == chunks
    assert all(c["chunk"] for c in contents[:-1])
    assert contents[-1] == {"content": "".join(chunks), "chunk": False}
    assert h.model.requests[-1].purpose is Purpose.ANSWER


async def test_empty_answer_is_a_bad_model_response() -> None:
    h = Harness(ScriptedModel(text('{"steps": []}'), text("ok"), [ContentDelta("")]))
    _, watcher = await h.start()
    events = await collect(watcher)
    assert summary(events)[-2:] == [("error", "llm_bad_response"), ("end", "failed", "llm_bad_response")]


async def test_cancel_ends_the_run_with_a_cancelled_end_event() -> None:
    started = asyncio.Event()

    def hang(_request: object) -> list[object]:
        started.set()
        raise AssertionError("unreachable")

    class SlowModel(ScriptedModel):
        async def stream(self, request):  # type: ignore[no-untyped-def, override]
            started.set()
            await asyncio.Event().wait()
            yield  # pragma: no cover

    h = Harness(SlowModel())
    handle, watcher = await h.start()
    await asyncio.wait_for(started.wait(), 5)
    assert h.service.cancel(handle.run_id, "user_cancelled") is True
    events = await collect(watcher)
    assert summary(events)[-1] == ("end", "cancelled", "user_cancelled")
    assert h.service.get(handle.run_id) is None


def gated(gate_open: asyncio.Event) -> type[ScriptedModel]:
    """A scripted model that answers only once the gate is open."""

    class GatedModel(ScriptedModel):
        async def stream(self, request):  # type: ignore[no-untyped-def, override]
            await gate_open.wait()
            async for chunk in super().stream(request):
                yield chunk

    return GatedModel


async def test_disconnect_with_cancel_policy_cancels_but_continue_policy_keeps_running() -> None:
    gate_open = asyncio.Event()
    GatedModel = gated(gate_open)

    h = Harness(GatedModel(text('{"steps": []}'), text("ok"), text("answer")),
                run_limits=replace(RUN_LIMITS, disconnect_grace_seconds=0))
    handle, watcher = await h.start()
    h.service.release(handle, watcher, disconnected=True)
    assert handle.task is not None
    await asyncio.wait_for(asyncio.shield(handle.task), 5)
    assert h.log.events[handle.run_id][-1].data["reason"] == "client_disconnected"

    from domain.model.run import DisconnectPolicy

    h2 = Harness(GatedModel(text('{"steps": []}'), text("ok"), text("answer")))
    handle2, watcher2 = await h2.start(on_disconnect=DisconnectPolicy.CONTINUE)
    h2.service.release(handle2, watcher2, disconnected=True)
    gate_open.set()
    assert handle2.task is not None
    await asyncio.wait_for(asyncio.shield(handle2.task), 5)
    assert h2.log.events[handle2.run_id][-1].data["status"] == "completed"


async def until(condition: Any, seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - a timer inside the service sets what this waits for
            await asyncio.sleep(0.01)


async def test_a_disconnect_cancels_only_after_a_grace_period_in_which_no_reader_came_back() -> None:
    gate_open = asyncio.Event()
    GatedModel = gated(gate_open)

    h = Harness(GatedModel(text('{"steps": []}'), text("ok"), text("answer")),
                run_limits=replace(RUN_LIMITS, disconnect_grace_seconds=0.2))
    handle, watcher = await h.start()
    h.service.release(handle, watcher, disconnected=True)
    back = h.service.watch(handle)  # a tab shown again, a retried POST: within the grace period
    assert handle.disconnect_timer is not None
    await until(lambda: handle.disconnect_timer is None)  # the grace period is over: a reader is there
    assert handle.run.cancel_reason is None
    gate_open.set()
    events = await collect(back)
    assert summary(events)[-1] == ("end", "completed", "completed")



async def test_a_run_read_on_another_instance_is_kept_by_its_lease_renewals_alone_until_that_reader_left() -> None:
    """The grace period ends with the run read through another instance: the run is kept, with no
    check of its own; each lease renewal asks about it, and the first that finds the reader gone
    starts a new grace period, at whose end the run is cancelled."""
    gate_open = asyncio.Event()
    h = Harness(gated(gate_open)(text('{"steps": []}'), text("ok"), text("answer")),
                run_limits=replace(RUN_LIMITS, disconnect_grace_seconds=0.2, lease_seconds=0.15))
    handle, watcher = await h.start()
    h.directory.readers.add(handle.run_id)  # read through another instance
    h.service.release(handle, watcher, disconnected=True)
    await until(lambda: handle.disconnect_check is not None and handle.disconnect_check.done())
    assert handle.run.cancel_reason is None and handle.read_elsewhere and handle.disconnect_timer is None
    assert h.directory.reader_checks == [handle.run_id]
    renewals = len(h.directory.renewals)
    await until(lambda: len(h.directory.renewals) >= renewals + 8)  # 8 renewals: four grace periods
    assert h.directory.reader_checks == [handle.run_id]  # no look of its own: the renewals ask
    assert h.directory.renewals[-1] == [handle.run_id] and handle.run.cancel_reason is None
    h.directory.readers.clear()  # the follow on the other instance ended
    left_at = asyncio.get_running_loop().time()
    assert handle.task is not None
    await asyncio.wait_for(asyncio.shield(handle.task), 5)
    assert h.log.events[handle.run_id][-1].data["reason"] == "client_disconnected"
    # cancelled a full grace period after the renewal that found the reader gone, at most a
    # renewal interval (a third of the lease) later than a grace period after it left
    assert 0.2 <= asyncio.get_running_loop().time() - left_at
    assert h.directory.reader_checks == [handle.run_id] * 2  # the new grace period's end looked once


async def test_principal_and_seq_are_per_run() -> None:
    h = Harness(ScriptedModel(text('{"steps": []}'), text("a"), text("x"),
                              text('{"steps": []}'), text("b"), text("y")))
    first, w1 = await h.start()
    e1 = await collect(w1)
    second, w2 = await h.start()
    e2 = await collect(w2)
    assert e1[0].seq == e2[0].seq == 1
    assert first.run.ids.session_id != second.run.ids.session_id
    assert first.run.principal == ALICE


class ToolAwaitingItsReply(RecordingTool):
    """Runs until the test hands it its result."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.running = asyncio.Event()
        self.reply: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def run(self, args: Mapping[str, Any], context: ToolContext) -> Any:
        self.calls.append(dict(args))
        self.running.set()
        return await self.reply


async def test_a_cancel_that_comes_as_the_tool_finishes_still_cancels_the_run() -> None:
    # asyncio.wait_for on Python 3.11 returned the tool's result instead of raising the cancel that
    # came in the same loop step (CPython issue 86296): the run went on as if never cancelled.
    read = ToolAwaitingItsReply("read")
    h = Harness(ScriptedModel(text(json.dumps({"steps": [{"description": "Look", "tool": "read"}]})),
                              tool_call("read", "{}"), text("looked"), text("Here it is.")), tools=[read])
    handle, watcher = await h.start()
    async with asyncio.timeout(5):
        await read.running.wait()
    read.reply.set_result({"summary": "read ok"})
    assert h.service.cancel(handle.run_id, "user_cancelled") is True  # in the same loop step
    events = await collect(watcher)
    assert summary(events)[-1] == ("end", "cancelled", "user_cancelled")
    assert [e.data["status"] for e in events if e.type.value == "tool_execution"] == ["pending", "running"]
    assert len(h.model.requests) == 2  # plan and tool call; the model never saw a tool result
