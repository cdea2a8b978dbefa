"""What the agent asks the model for, and what the user sees while it answers: requests that fit
the window with a completion budget, plans asked for by schema, thoughts streamed as written,
tools called through the native interface, and a cut answer ended clearly."""

from __future__ import annotations

import json
from collections.abc import Sequence

from domain.model.approval import Signal
from domain.model.chat import (
    ChatMessage,
    ContentDelta,
    EstimatedModelProfile,
    Finish,
    ModelChunk,
    Purpose,
    ReasoningDelta,
    Role,
    estimate_tokens,
)
from domain.model.run import RunRequest
from domain.services.agent import Agent, TokenBudgets, ToolCallMode
from domain.services.context_window import MESSAGE_OVERHEAD_TOKENS
from tests.unit.fakes import RecordingTool, ScriptedModel, text, tool_call
from tests.unit.harness import ALICE, Harness, collect, summary


def with_agent(h: Harness, window: int, budgets: TokenBudgets | None = None,
               mode: ToolCallMode = ToolCallMode.NATIVE) -> Harness:
    h.agent = Agent(h.model, h.registry, h.gate, h.limits, h.telemetry, profile=EstimatedModelProfile(window),
                    budgets=budgets or TokenBudgets(plan=256, step=128, answer=512), tool_calls=mode)
    h.service._agent = h.agent
    return h


def estimated_prompt(messages: Sequence[ChatMessage]) -> int:
    return sum(estimate_tokens(m.content) + MESSAGE_OVERHEAD_TOKENS for m in messages)


async def test_every_call_has_its_completion_budget_and_fits_the_window_with_a_long_thread() -> None:
    # 30 earlier turns of 1,000 characters each: about 10,000 tokens of history for a 4,096 window
    history = [{"prompt": f"question {n} " + "q" * 1000, "answer": f"answer {n} " + "a" * 1000} for n in range(30)]
    h = Harness(ScriptedModel(text('{"steps": [{"description": "Think it over", "tool": null}]}'),
                              text("thought about it"), text("The ", "answer.")))
    with_agent(h, 4096)
    _, watcher = await h.service.start(ALICE, RunRequest(prompt="And now?"),
                                       history=Agent.history_messages(history))
    events = await collect(watcher)
    assert events[-1].data["status"] == "completed"
    budgets = {r.purpose: r.max_tokens for r in h.model.requests}
    assert budgets == {Purpose.PLAN: 256, Purpose.STEP: 128, Purpose.ANSWER: 512}
    for request in h.model.requests:
        assert request.max_tokens is not None
        assert estimated_prompt(request.messages) + request.max_tokens <= 4096
        # the newest turn survives, the oldest went first
        contents = [m.content for m in request.messages]
        assert any(c.startswith("question 29 ") for c in contents)
        assert not any(c.startswith("question 0 ") for c in contents)
    told = [e.data["content"] for e in events if e.data.get("thoughtType") == "decision"]
    assert len(told) == 1 and told[0].startswith("To fit the model's 4096-token context window, Aura left out the ")


async def test_a_64_kib_tool_output_and_a_large_page_context_are_shortened_visibly() -> None:
    big = RecordingTool("read", result={"summary": "read it", "output": "x" * 65_536})
    plan = json.dumps({"steps": [{"description": "Read the file", "tool": "read", "args": {}}]})
    h = Harness(ScriptedModel(text(plan), tool_call("read", "{}"), text("read it all"), text("Done.")), tools=[big])
    with_agent(h, 4096)
    _, watcher = await h.start("Read it", context={"title": "Big page", "metadata": {"blob": "m" * 50_000}})
    events = await collect(watcher)
    assert events[-1].data["status"] == "completed"
    answer_request = h.model.requests[-1]
    assert estimated_prompt(answer_request.messages) + (answer_request.max_tokens or 0) <= 4096
    system = answer_request.messages[0].content
    assert "[the page context is shortened here to fit the model's context window" in system
    tool_message = next(m for m in answer_request.messages if m.role is Role.TOOL)
    assert "more characters left out to fit the model's context window]" in tool_message.content


async def test_a_prompt_that_cannot_fit_ends_with_context_overflow_before_any_model_call() -> None:
    h = Harness(ScriptedModel())
    with_agent(h, 1024)
    _, watcher = await h.start("p" * 20_000)
    events = await collect(watcher)
    assert summary(events)[-2:] == [("error", "context_overflow"), ("end", "failed", "context_overflow")]
    assert events[-2].data["retryable"] is False
    assert h.model.requests == []


async def test_the_plan_is_asked_for_with_a_schema_derived_from_the_tool_registry() -> None:
    read = RecordingTool("read")
    h = Harness(ScriptedModel(text('{"steps": [{"description": "Answer", "tool": null}]}'), text("ok"),
                              text("Done.")), tools=[read])
    _, watcher = await h.start()
    await collect(watcher)
    plan = h.model.requests[0]
    assert plan.json_output and plan.json_schema is not None
    variants = plan.json_schema["properties"]["steps"]["items"]["anyOf"]
    assert variants[0]["properties"]["tool"] == {"type": "null"}
    assert variants[1]["properties"]["tool"] == {"type": "string", "enum": ["read"]}
    assert variants[1]["properties"]["args"] == read.spec.parameters
    assert "what this step does" not in plan.messages[-1].content  # no skeleton to echo


def plan_in_pieces(plan: str, size: int) -> list[ModelChunk]:
    return [*(ContentDelta(plan[i:i + size]) for i in range(0, len(plan), size)), Finish("stop")]


async def test_the_plan_is_shown_while_the_model_writes_it() -> None:
    plan = json.dumps({"steps": [{"description": "Look at the open pull requests", "tool": None},
                                 {"description": "Summarise what needs a review", "tool": None}]})
    h = Harness(ScriptedModel(plan_in_pieces(plan, 7), text("ok"), text("fine"), text("Done.")))
    _, watcher = await h.start()
    events = await collect(watcher)
    planning = [e for e in events if e.data.get("thoughtType") == "planning"]
    pieces = [e.data for e in planning if e.data["chunk"]]
    assert len(pieces) >= 4  # as written, not once at the end
    assert len({p.data["thoughtId"] for p in planning}) == 1  # one thought that grows
    assert "".join(p["content"] for p in pieces) == \
        "1. Look at the open pull requests\n2. Summarise what needs a review"
    final = planning[-1].data
    assert final["chunk"] is False and final["content"] == (
        "Planned 2 step(s): 1. Look at the open pull requests; 2. Summarise what needs a review")
    # the first piece arrives before the plan is complete: before the first plan_step event
    first_piece = next(i for i, e in enumerate(events) if e.data.get("chunk") is True)
    assert first_piece < next(i for i, e in enumerate(events) if e.type.value == "plan_step")


async def test_step_text_and_model_reasoning_stream_as_reasoning_thoughts() -> None:
    step = [ReasoningDelta("Let me think about "), ReasoningDelta("the branches first. "),
            ContentDelta("There are two "), ContentDelta("branches, main and dev."), Finish("stop")]
    h = Harness(ScriptedModel(text('{"steps": [{"description": "Count branches", "tool": null}]}'), step,
                              text("Two.")))
    _, watcher = await h.start()
    events = await collect(watcher)
    reasoning = [e.data for e in events if e.data.get("thoughtType") == "reasoning"]
    streamed = [d for d in reasoning if d["thoughtId"] == reasoning[-1]["thoughtId"]]
    assert [d["chunk"] for d in streamed] == [True, True, True, False]
    assert "".join(d["content"] for d in streamed[:-1]) == \
        "Let me think about the branches first. There are two branches, main and dev."
    note = next(e.data["note"] for e in events if e.type.value == "plan_step_update" and e.data["progress"] == 1.0)
    assert note == "There are two branches, main and dev."


async def test_an_answer_cut_at_its_token_limit_completes_with_a_typed_reason() -> None:
    h = Harness(ScriptedModel(text('{"steps": [{"description": "Answer", "tool": null}]}'), text("ok"),
                              [ContentDelta("A long answer that"), Finish("length")]))
    with_agent(h, 4096)
    _, watcher = await h.start()
    events = await collect(watcher)
    assert events[-1].data == {"status": "completed", "reason": "answer_truncated", "message":
                               "The answer reached its limit of 512 tokens and is cut short; ask for the rest, "
                               "or raise the answer token limit."}
    assert ("content", "A long answer that", False) in summary(events)


async def test_the_planned_tool_is_called_through_the_native_interface_and_passes_the_gate() -> None:
    commit = RecordingTool("commit", requires_approval=True, result={"summary": "committed"})
    plan = json.dumps({"steps": [{"description": "Commit the work", "tool": "commit", "args": {"value": "v"}}]})
    h = Harness(ScriptedModel(text(plan), tool_call("commit", '{"value": "v"}'), text("done"), text("Committed.")),
                tools=[commit])
    handle, watcher = await h.start()
    seen = []
    while not seen or seen[-1].type.value != "hitl":
        event = await watcher.next(5)
        assert event is not None
        seen.append(event)
    assert commit.calls == []  # the gate holds it
    await h.bus.publish(handle.run.ids.session_id, Signal.approval(seen[-1].data["requestId"], "bob", 1_767_000_010))
    events = seen + await collect(watcher)
    assert commit.calls == [{"value": "v"}]
    first_call, after_tool = h.model.requests[1], h.model.requests[2]
    assert first_call.tool_choice == "commit" and [t["function"]["name"] for t in first_call.tools] == ["commit"]
    assert after_tool.tool_choice is None and after_tool.tools  # then the model chooses
    assert events[-1].data["status"] == "completed"


async def test_planned_mode_runs_the_plans_call_without_sending_tools() -> None:
    read = RecordingTool("read", result={"summary": "read the thing"})
    plan = json.dumps({"steps": [{"description": "Read it", "tool": "read", "args": {"value": "a"}}]})
    h = Harness(ScriptedModel(text(plan), text("The thing was read.")), tools=[read])
    with_agent(h, 4096, mode=ToolCallMode.PLANNED)
    _, watcher = await h.start()
    events = await collect(watcher)
    assert read.calls == [{"value": "a"}]
    assert [r.purpose for r in h.model.requests] == [Purpose.PLAN, Purpose.ANSWER]
    assert all(not r.tools for r in h.model.requests)
    assert ("step", "step_1", "completed", 1.0) in summary(events)
    assert [e.data["note"] for e in events if e.type.value == "plan_step_update"][-1] == "read the thing"
    tool_result = [m for m in h.model.requests[-1].messages if m.role is Role.TOOL]
    assert json.loads(tool_result[0].content) == {"summary": "read the thing"}


async def test_an_answer_that_turns_into_the_instructions_ends_where_the_echo_begins() -> None:
    # Gemma 3 270M (a base model) on llama-cpp-python went on to write the next chat turn and
    # Aura's answer instruction after its own words
    read_after: list[str] = []

    def answer(_: object) -> list[ModelChunk]:
        read_after.append("asked")
        return [ContentDelta("A commit records "), ContentDelta("a snapshot. <s>[INST]All steps "),
                ContentDelta("are done. Write the final answer"), ContentDelta(" and more"), Finish("length")]

    h = Harness(ScriptedModel(text('{"steps": [{"description": "Answer", "tool": null}]}'), text("ok"), answer))
    _, watcher = await h.start()
    events = await collect(watcher)
    pieces = [e.data["content"] for e in events if e.type.value == "content" and e.data["chunk"]]
    final = [e.data["content"] for e in events if e.type.value == "content" and not e.data["chunk"]]
    assert "".join(pieces) == "A commit records a snapshot. " and final == ["A commit records a snapshot. "]
    assert "[INST]" not in json.dumps([e.data for e in events]) and "All steps are done" not in json.dumps(
        [e.data for e in events])
    assert events[-1].data == {"status": "completed", "reason": "completed", "message": "The run completed."}


async def test_an_answer_that_is_only_an_echo_is_a_bad_model_response() -> None:
    h = Harness(ScriptedModel(text('{"steps": [{"description": "Answer", "tool": null}]}'), text("ok"),
                              text("All steps are done. Write the final answer to the user's request")))
    _, watcher = await h.start()
    events = await collect(watcher)
    assert summary(events)[-2:] == [("error", "llm_bad_response"), ("end", "failed", "llm_bad_response")]
    assert "All steps are done" not in json.dumps([e.data for e in events])


async def test_every_native_call_offers_the_tools_as_one_tuple_built_once() -> None:
    read = RecordingTool("read", result={"summary": "read"})
    plan = json.dumps({"steps": [{"description": "Read it", "tool": "read", "args": {"value": "a"}},
                                 {"description": "Read more", "tool": "read", "args": {"value": "b"}}]})
    script = [text(plan), tool_call("read", '{"value": "a"}', "c1"), text("got a"),
              tool_call("read", '{"value": "b"}', "c2"), text("got b"), text("Both read.")]
    h = with_agent(Harness(ScriptedModel(*script, *script), tools=[read]), 4096)
    for _ in range(2):
        _, watcher = await h.start()
        assert (await collect(watcher))[-1].data["status"] == "completed"
    offered = [r.tools for r in h.model.requests if r.tools]
    assert len(offered) == 8 and all(tools is offered[0] for tools in offered)
    assert offered[0] == tuple(spec.as_model_schema() for spec in h.registry.specs())
