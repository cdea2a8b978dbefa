"""A run's time budget (agent.max_run_seconds): past it the run ends `failed` with
`budget_exceeded`, wherever it is (a model call, an approval wait); the work after the agent (the
thread's memory, the `end`) is not cut short by it, and one run's budget is not another's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from domain.model.approval import ApprovalStatus
from domain.model.chat import ChatRequest, ModelChunk
from tests.defaults import RUN_LIMITS
from tests.unit.fakes import RecordingTool, ScriptedModel, text, tool_call
from tests.unit.harness import Harness, collect, summary

PLAN = json.dumps({"steps": [{"description": "Commit the work", "tool": "commit"}]})
BUDGET_END = [("error", "budget_exceeded"), ("end", "failed", "budget_exceeded")]


class SlowModel(ScriptedModel):
    """Answers like ScriptedModel, after `delay` seconds per call."""

    def __init__(self, delay: float, *turns: Any) -> None:
        super().__init__(*turns)
        self.delay = delay

    async def stream(self, request: ChatRequest) -> AsyncIterator[ModelChunk]:
        await asyncio.sleep(self.delay)
        async for chunk in super().stream(request):
            yield chunk


def budget_harness(model: ScriptedModel, seconds: float, tools: list[Any] | None = None) -> Harness:
    return Harness(model, tools=tools or [], run_limits=replace(RUN_LIMITS, max_run_seconds=seconds))


async def test_a_run_past_its_budget_in_a_model_call_ends_failed_with_budget_exceeded() -> None:
    h = budget_harness(SlowModel(30, text(PLAN)), 0.2)
    _, watcher = await h.start()
    async with asyncio.timeout(5):
        events = await collect(watcher)
    assert summary(events)[-2:] == BUDGET_END
    assert events[-2].data["retryable"] is False
    assert events[-1].data["message"] == "The run took longer than 0.2 s."


async def test_a_run_waiting_for_approval_past_its_budget_ends_and_its_request_is_cancelled() -> None:
    commit = RecordingTool("commit", requires_approval=True)
    h = budget_harness(ScriptedModel(text(PLAN), tool_call("commit", '{"value": "v"}')), 0.3, tools=[commit])
    _, watcher = await h.start()
    async with asyncio.timeout(5):
        events = await collect(watcher)
    assert summary(events)[-2:] == BUDGET_END
    request_id = next(e for e in events if e.type.value == "hitl").data["requestId"]
    assert h.store.requests[request_id].status is ApprovalStatus.CANCELLED
    assert commit.calls == [] and h.bus.subscribers == {}


async def test_each_run_has_its_own_budget_and_a_run_within_it_completes() -> None:
    slow = budget_harness(SlowModel(30, text(PLAN)), 0.5)
    _, first = await slow.start()
    await asyncio.sleep(0.25)
    _, second = await slow.start()
    async with asyncio.timeout(5):
        first_events = await collect(first)
        ended_first = asyncio.get_running_loop().time()
        second_events = await collect(second)
        ended_second = asyncio.get_running_loop().time()
    assert summary(first_events)[-2:] == BUDGET_END and summary(second_events)[-2:] == BUDGET_END
    assert ended_second - ended_first > 0.1  # the second run had its own half second

    quick = budget_harness(ScriptedModel(text(json.dumps({"steps": []})), text("noted"), text("Done.")), 0.5)
    _, watcher = await quick.start()
    events = await collect(watcher)
    assert summary(events)[-1] == ("end", "completed", "completed")
    await asyncio.sleep(0.6)  # its budget passing later changes nothing
    assert quick.service.active() == []
