"""The agent loop: analyse, plan, carry out each step through tools and approvals, answer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from domain import prompts
from domain.approval import ApprovalStatus
from domain.errors import AuraError, BudgetExceeded, InvalidInput, ModelError, ToolFailure, UnknownTool
from domain.events import EventType, ThoughtType
from domain.gate import ApprovalGate
from domain.model import (
    ChatMessage,
    ChatRequest,
    ContentDelta,
    ModelChunk,
    ModelTurn,
    Purpose,
    Role,
    ToolCall,
    messages_text,
    pack_messages,
    unpack_messages,
)
from domain.plan import PlannedStep, PlanStep, StepStatus, parse_plan
from domain.ports import ChatModel
from domain.run import Run
from domain.telemetry import Telemetry
from domain.tools import ToolContext, ToolRegistry

RESULT_FOR_MODEL_CHARS = 8000


@dataclass(frozen=True, slots=True)
class AgentLimits:
    max_steps: int = 12
    max_tool_calls: int = 24
    max_tool_calls_per_step: int = 6
    tool_timeout_seconds: float = 30.0


@dataclass(slots=True)
class _StepOutcome:
    succeeded: int = 0
    failed: int = 0
    rejected: int = 0


def _result_text(result: Any) -> str:
    text = json.dumps(result, ensure_ascii=False, default=str)
    return text if len(text) <= RESULT_FOR_MODEL_CHARS else text[:RESULT_FOR_MODEL_CHARS] + "…(truncated)"


class Agent:
    def __init__(self, model: ChatModel, tools: ToolRegistry, gate: ApprovalGate, limits: AgentLimits,
                 telemetry: Telemetry | None = None) -> None:
        self._telemetry = telemetry or Telemetry()
        self._model = model
        self._tools = tools
        self._gate = gate
        self._limits = limits
        self._zdict = self._pack_dictionary()

    def _pack_dictionary(self) -> bytes:
        """A preset dictionary for packing the conversation of a run waiting for approval: what such
        a conversation repeats from every other (the system prompt, the plan and step messages).
        Made once, so every conversation is unpacked with the dictionary it was packed with; it
        packs the conversation of a one-step run to about a fifth of its size with zlib alone."""
        specs = self._tools.specs()
        tool = specs[0].name if specs else "tool"
        sample = [
            ChatMessage(Role.SYSTEM, prompts.system_prompt({}, specs)),
            ChatMessage(Role.USER, ""),
            ChatMessage(Role.ASSISTANT, json.dumps({"steps": [{"description": "", "tool": tool, "args": {}}]})),
            ChatMessage(Role.USER, prompts.step_prompt(1, 1, "", tool, {})),
            ChatMessage(Role.ASSISTANT, "", tool_calls=(ToolCall("call_1", tool, "{}"),)),
        ]
        return messages_text(sample)

    @staticmethod
    def history_messages(turns: Sequence[Mapping[str, Any]]) -> list[ChatMessage]:
        """Earlier turns of the thread as chat messages: the prompt, then the answer with what the
        tools did in summary."""
        messages: list[ChatMessage] = []
        for turn in turns:
            messages.append(ChatMessage(Role.USER, str(turn.get("prompt", ""))))
            notes = "; ".join(f"{n.get('tool')} {n.get('status')}: {n.get('summary')}"
                              for n in turn.get("tools", []) if isinstance(n, Mapping))
            answer = str(turn.get("answer", ""))
            messages.append(ChatMessage(Role.ASSISTANT, f"{answer}\n(Tools used: {notes})" if notes else answer))
        return messages

    async def execute(self, run: Run, history: Sequence[ChatMessage] = ()) -> str:
        """Drive the run to its answer and return it. Raises AuraError subclasses on failure;
        the caller turns those into `error` + `end` events."""
        context = run.request.agent_context()
        messages: list[ChatMessage] = [
            ChatMessage(Role.SYSTEM, prompts.system_prompt(context, self._tools.specs())),
            *history,
            ChatMessage(Role.USER, run.request.prompt),
        ]
        # From here on the conversation is in `messages`, and the hints are made per model call:
        # a run waiting for approval holds neither the history nor the context twice.
        del history
        await self._analyse(run, context)
        del context
        steps = await self._plan(run, messages)
        for step in steps:
            await self._carry_out(run, step, len(steps), messages)
        answer = await self._answer(run, messages)
        done = sum(1 for s in steps if s.status is StepStatus.COMPLETED)
        await run.thought(ThoughtType.REFLECTION,
                          f"Completed {done} of {len(steps)} steps with {run.tool_calls} tool calls; "
                          f"the answer has {len(answer)} characters.")
        return answer

    async def _analyse(self, run: Run, context: Mapping[str, Any]) -> None:
        await run.timeline_update("analyse", "Analyse the request", StepStatus.IN_PROGRESS, 0.0)
        used = [k for k in prompts.KNOWN_CONTEXT_KEYS if k in context]
        sources = [{"type": "context", "key": k, "value": context[k]} for k in used]
        where = context.get("title") or context.get("path") or context.get("url")
        summary = f"The user asks: {run.request.prompt[:200]}"
        if where:
            summary += f" — on the page {where!s}"
        if context.get("activeApp"):
            summary += f" in {context['activeApp']!s}"
        if context.get("selectedItemIds"):
            summary += f", with {len(context['selectedItemIds'])} selected item(s)"
        await run.thought(ThoughtType.ANALYSIS, summary + ".", sources)
        await run.timeline_update("analyse", "Analyse the request", StepStatus.COMPLETED, 1.0)

    async def _plan(self, run: Run, messages: list[ChatMessage]) -> list[PlanStep]:
        await run.timeline_update("plan", "Plan the work", StepStatus.IN_PROGRESS, 0.0)
        request = ChatRequest(
            messages=[*messages, ChatMessage(Role.USER, prompts.plan_prompt(self._limits.max_steps))],
            purpose=Purpose.PLAN, json_output=True, hints=_hints(run),
            trace_headers=self._trace_headers(run),
        )
        turn = await self._complete(request)
        planned, structured = parse_plan(turn.text)
        if not planned:
            planned = [PlannedStep(description="Answer the request directly", confidence=0.5)]
        if len(planned) > self._limits.max_steps:
            raise BudgetExceeded(f"The plan has {len(planned)} steps; at most {self._limits.max_steps} "
                                 "are allowed per run.")
        for item in planned:
            if item.tool is not None and item.tool not in self._tools:
                raise UnknownTool(f"The plan names an unknown tool {item.tool!r}. "
                                  f"Available tools: {', '.join(self._tools.names())}.")
        steps = await run.add_plan(planned)
        messages.append(ChatMessage(Role.ASSISTANT, json.dumps(
            {"steps": [{"description": s.description, "tool": s.tool, "args": s.args} for s in steps]},
            ensure_ascii=False)))
        how = "" if structured else " (recovered from a free-text answer)"
        await run.thought(ThoughtType.PLANNING, f"Planned {len(steps)} step(s){how}: "
                          + "; ".join(f"{s.index}. {s.description}" for s in steps))
        await run.timeline_update("plan", "Plan the work", StepStatus.COMPLETED, 1.0)
        return steps

    async def _carry_out(self, run: Run, step: PlanStep, total: int, messages: list[ChatMessage]) -> None:
        await run.step_update(step, StepStatus.IN_PROGRESS, 0.0)
        await run.timeline_update(step.step_id, step.description, StepStatus.IN_PROGRESS, 0.0)
        await run.thought(ThoughtType.REASONING, f"Step {step.index} of {total}: {step.description}"
                          + (f" — using {step.tool}." if step.tool else "."))
        messages.append(ChatMessage(Role.USER, prompts.step_prompt(step.index, total, step.description,
                                                                   step.tool, step.args)))
        outcome = _StepOutcome()
        calls_in_step = 0
        note = ""
        while True:
            # The step's hints are made per call and the turn is let go once read: a step that
            # waits for approval holds neither.
            turn = await self._complete(ChatRequest(
                messages=list(messages), purpose=Purpose.STEP,
                tools=[spec.as_model_schema() for spec in self._tools.specs()],
                hints={**_hints(run), "step": {"index": step.index, "total": total,
                                               "description": step.description, "tool": step.tool,
                                               "args": step.args}},
                trace_headers=self._trace_headers(run)))
            calls, reply = turn.tool_calls(), turn.text
            del turn
            messages.append(ChatMessage(Role.ASSISTANT, reply, tool_calls=tuple(calls)))
            if not calls:
                note = reply.strip()
                break
            for call in calls:
                if calls_in_step >= self._limits.max_tool_calls_per_step:
                    raise BudgetExceeded(f"Step {step.index} asked for more than "
                                         f"{self._limits.max_tool_calls_per_step} tool calls.")
                calls_in_step += 1
                result_text = await self._call_tool(run, step, call, outcome, messages)
                messages.append(ChatMessage(Role.TOOL, result_text, tool_call_id=call.id, name=call.name))
                progress = round(min(0.9, calls_in_step / (calls_in_step + 1)), 2)
                await run.step_update(step, StepStatus.IN_PROGRESS, progress, f"{call.name} done")
        if outcome.succeeded or not (outcome.failed or outcome.rejected):
            status = StepStatus.COMPLETED
        elif outcome.failed:
            status = StepStatus.FAILED
        else:
            status = StepStatus.SKIPPED
        await run.step_update(step, status, 1.0, note[:500])
        await run.timeline_update(step.step_id, step.description, status, 1.0)

    async def _call_tool(self, run: Run, step: PlanStep, call: ToolCall, outcome: _StepOutcome,
                         messages: list[ChatMessage]) -> str:
        """Run one tool call through validation and, when needed, the approval gate. Returns the
        text fed back to the model. Bad arguments and tool failures are told to the model."""
        if run.tool_calls >= self._limits.max_tool_calls:
            raise BudgetExceeded(f"The run used its {self._limits.max_tool_calls} tool calls.")
        run.tool_calls += 1
        base: dict[str, Any] = {"toolCallId": call.id, "toolName": call.name}
        try:
            raw_args = json.loads(call.arguments or "{}")
        except ValueError:
            raw_args = None
        try:
            if raw_args is None:
                raise InvalidInput(f"Arguments of {call.name} are not valid JSON.", code="invalid_tool_arguments")
            args = self._tools.validate(call.name, raw_args)
        except (InvalidInput, UnknownTool) as exc:
            outcome.failed += 1
            self._telemetry.tool_call(call.name, "failed")
            await run.emit(EventType.TOOL_EXECUTION, {**base, "toolArgs": raw_args if isinstance(raw_args, dict)
                                                      else {}, "status": "failed", "result": None,
                                                      "error": exc.message, "requiresApproval": False})
            return f"Error: {exc.message}"
        del raw_args  # validated into `args`
        tool = self._tools.get(call.name)
        needs_approval = self._tools.needs_approval(call.name, args)
        base.update({"toolArgs": args, "requiresApproval": needs_approval})
        await run.emit(EventType.TOOL_EXECUTION, {**base, "status": "pending", "result": None, "error": None})
        if needs_approval:
            # A human may take minutes to decide, and the conversation with the model is most of
            # what a waiting run holds: keep it packed until the decision (docs/performance.md).
            # The events' common fields are rebuilt after it, from what the run keeps anyway.
            del base
            packed = pack_messages(messages, self._zdict)
            messages.clear()
            try:
                decided = await self._gate.await_decision(
                    run, step, call.name, tool.spec.action_type, args,
                    f"Aura wants to run {call.name} with {json.dumps(args, ensure_ascii=False)}.")
            finally:
                messages[:] = unpack_messages(packed, self._zdict)
                del packed
            base = {"toolCallId": call.id, "toolName": call.name, "toolArgs": args, "requiresApproval": True}
            if decided.status is ApprovalStatus.REJECTED:
                outcome.rejected += 1
                self._telemetry.tool_call(call.name, "rejected")
                run.tool_notes.append({"tool": call.name, "status": "rejected", "summary": decided.reason or ""})
                reason = decided.reason or "no reason given"
                await run.emit(EventType.TOOL_EXECUTION, {**base, "status": "rejected", "result": None,
                                                          "error": f"Rejected: {reason}"})
                await run.thought(ThoughtType.DECISION, f"The user rejected {call.name} ({reason}); "
                                  "the action was not run and the plan continues without it.")
                return f"The user rejected this action; it was not run. Reason: {reason}"
            await run.thought(ThoughtType.DECISION, f"{call.name} was approved by {decided.decided_by}; running it.")
        await run.emit(EventType.TOOL_EXECUTION, {**base, "status": "running", "result": None, "error": None})
        context = ToolContext(principal=run.principal, trace_id=run.ids.trace_id, run_id=run.ids.run_id,
                              bearer_token=run.request.bearer_token, extra_headers=self._trace_headers(run))
        try:
            # Not asyncio.wait_for: on Python 3.11 it returns the result when the run is cancelled
            # as the tool finishes (CPython issue 86296), and the run would go on.
            async with asyncio.timeout(self._limits.tool_timeout_seconds):
                result = await tool.run(args, context)
        except TimeoutError:
            failure = ToolFailure(f"{call.name} took longer than {self._limits.tool_timeout_seconds:g} s.",
                                  code="tool_timeout")
        except ToolFailure as exc:
            # Its traceback holds this frame, which would hold it: a reference cycle that keeps the
            # run's tool call, arguments and context alive until a garbage collection.
            failure = exc.with_traceback(None)
        else:
            outcome.succeeded += 1
            self._telemetry.tool_call(call.name, "success")
            summary = result.get("summary") if isinstance(result, dict) else None
            run.tool_notes.append({"tool": call.name, "status": "success",
                                   "summary": summary if isinstance(summary, str) else _result_text(result)[:300]})
            await run.emit(EventType.TOOL_EXECUTION, {**base, "status": "success", "result": result, "error": None})
            return _result_text(result)
        outcome.failed += 1
        self._telemetry.tool_call(call.name, "failed")
        run.tool_notes.append({"tool": call.name, "status": "failed", "summary": failure.message})
        await run.emit(EventType.TOOL_EXECUTION, {**base, "status": "failed", "result": None,
                                                  "error": failure.message})
        return f"Error ({failure.code}): {failure.message}"

    async def _answer(self, run: Run, messages: list[ChatMessage]) -> str:
        await run.timeline_update("answer", "Write the answer", StepStatus.IN_PROGRESS, 0.0)
        request = ChatRequest(messages=[*messages, ChatMessage(Role.USER, prompts.answer_prompt())],
                              purpose=Purpose.ANSWER, hints=_hints(run), trace_headers=self._trace_headers(run))
        parts: list[str] = []
        async for chunk in self._stream(request):
            if isinstance(chunk, ContentDelta) and chunk.text:
                parts.append(chunk.text)
                await run.content(chunk.text, chunk=True)
        answer = "".join(parts)
        if not answer.strip():
            raise ModelError("The model returned an empty answer.", code="llm_bad_response")
        await run.content(answer, chunk=False)
        await run.timeline_update("answer", "Write the answer", StepStatus.COMPLETED, 1.0)
        return answer

    async def _complete(self, request: ChatRequest) -> ModelTurn:
        turn = ModelTurn()
        async for chunk in self._stream(request):
            turn.add(chunk)
        return turn

    async def _stream(self, request: ChatRequest) -> AsyncIterator[ModelChunk]:
        """The model's chunks, with the call's latency and failure code reported."""
        started = time.monotonic()
        try:
            async for chunk in self._model.stream(request):
                yield chunk
        except ModelError as exc:
            self._telemetry.model_call(request.purpose.value, time.monotonic() - started, exc.code)
            raise
        self._telemetry.model_call(request.purpose.value, time.monotonic() - started, None)

    @staticmethod
    def _trace_headers(run: Run) -> dict[str, str]:
        return {"traceparent": run.request.traceparent} if run.request.traceparent else {}


def _hints(run: Run) -> dict[str, Any]:
    return {"prompt": run.request.prompt, "context": run.request.agent_context()}


__all__ = ["Agent", "AgentLimits", "AuraError"]
