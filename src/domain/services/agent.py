"""The agent loop: analyse, plan, carry out each step through tools and approvals, answer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from domain.model.approval import ApprovalRequest, ApprovalStatus
from domain.model.chat import (
    ChatMessage,
    ChatRequest,
    ContentDelta,
    Finish,
    ModelChunk,
    ModelProfile,
    ModelTurn,
    Purpose,
    ReasoningDelta,
    Role,
    ToolCall,
    messages_text,
    pack_messages,
    unpack_messages,
)
from domain.model.errors import AuraError, BudgetExceeded, InvalidInput, ModelError, ToolFailure, UnknownTool
from domain.model.events import EventType, ThoughtType
from domain.model.plan import PlannedStep, PlanSchema, PlanStep, StepStatus, descriptions_so_far, read_plan
from domain.model.ports import ChatModel
from domain.model.run import Run
from domain.model.telemetry import Telemetry
from domain.model.tools import Tool, ToolContext, ToolRegistry, ToolSpec
from domain.services import prompts
from domain.services.context_window import ContextFitter, shorten_text
from domain.services.gate import ApprovalGate

RESULT_FOR_MODEL_CHARS = 8000
# A streamed thought shows nothing until it has this many characters: enough to tell the model's
# own words from an echo of Aura's instructions, which is never shown.
THOUGHT_HOLD_CHARS = 24
DIRECT_ANSWER = "Answer the request directly"


@dataclass(frozen=True, slots=True)
class AgentLimits:
    """Values come from the settings (app/settings.py, the one place a default is written)."""

    max_steps: int
    max_tool_calls: int
    max_tool_calls_per_step: int
    tool_timeout_seconds: float


# called with the text and the reasoning a model call has written so far
_Shown = Callable[[str, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class TokenBudgets:
    """`max_tokens` of each kind of model call: a plan, one call of a step, the answer."""

    plan: int
    step: int
    answer: int


class ToolCallMode(StrEnum):
    NATIVE = "native"  # the model calls tools through the API's `tools` (a step's planned tool is forced)
    PLANNED = "planned"  # the plan's tool call is run as planned; no `tools` are sent


@dataclass(slots=True)
class _Conversation:
    """A run's conversation with the model: the system message, `history` messages of earlier
    turns, then this run's. The page context is rendered again, shortened, only when a request
    would not fit otherwise."""

    messages: list[ChatMessage]
    history: int
    context_chars: int
    # What the user was told about fitting already: a frozenset, whose empty value is shared, since
    # an empty set is 216 bytes that every parked run would hold (pinned by test_memory.py).
    told: frozenset[str] = frozenset()


class _ThoughtStream:
    """A thought shown as the model writes it: pieces (`chunk: true`) of one thought id, then its
    final text. Text that repeats Aura's instructions (an echo) is never shown."""

    def __init__(self, run: Run, kind: ThoughtType) -> None:
        self._run = run
        self._kind = kind
        self.thought_id: str | None = None
        self._shown = ""
        self._stopped = False

    async def show(self, visible: str, *, ready: bool = False) -> None:
        """`visible` is the whole text so far; what is new is sent. Short text waits, unless it is
        `ready` (complete in itself)."""
        if self._stopped or len(visible) <= len(self._shown):
            return
        if len(" ".join(visible.split())) < THOUGHT_HOLD_CHARS and not ready:
            return
        if prompts.echoes_a_prompt(visible) or not visible.startswith(self._shown):
            self._stopped = True
            return
        self.thought_id = await self._run.thought_piece(self.thought_id, self._kind, visible[len(self._shown):])
        self._shown = visible

    async def finish(self, final: str) -> None:
        if final or self.thought_id is not None:
            await self._run.thought(self._kind, final, thought_id=self.thought_id)


@dataclass(frozen=True, slots=True)
class _ToolSet:
    specs: tuple[ToolSpec, ...]
    plan: PlanSchema
    # one tuple for every request while the tools stay: the context fitter counts its tokens once
    model_schemas: tuple[dict[str, Any], ...]
    plan_prompt: str


@dataclass(slots=True)
class _StepOutcome:
    succeeded: int = 0
    failed: int = 0
    rejected: int = 0


def _result_text(result: Any) -> str:
    return shorten_text(json.dumps(result, ensure_ascii=False, default=str), RESULT_FOR_MODEL_CHARS)


def _plan_preview(descriptions: Sequence[tuple[str, bool]]) -> str:
    """The plan as far as it can be shown: each description once it is complete or long enough to
    tell from an echo of the instructions, up to the first that is neither or is an echo."""
    lines = []
    for index, (text, complete) in enumerate(descriptions, start=1):
        if (not complete and len(text) < THOUGHT_HOLD_CHARS) or prompts.echoes_a_prompt(text):
            break
        lines.append(f"{index}. {text}")
        if not complete:
            break
    return "\n".join(lines)


class Agent:
    def __init__(self, model: ChatModel, tools: ToolRegistry, gate: ApprovalGate, limits: AgentLimits,
                 telemetry: Telemetry, *, profile: ModelProfile, budgets: TokenBudgets,
                 tool_calls: ToolCallMode) -> None:
        self._telemetry = telemetry
        self._model = model
        self._tools = tools
        self._gate = gate
        self._limits = limits
        self._fitter = ContextFitter(profile)
        self._budgets = budgets
        self._tool_mode = tool_calls
        # A zlib preset dictionary for parked conversations; the sample may change freely (the
        # ratio is pinned by tests/unit/runtime/test_memory.py), the packing only with unpacking.
        self._zdict = self._pack_dictionary()
        self._tool_set: _ToolSet | None = None

    def _tool_views(self) -> _ToolSet:
        """What the agent derives from its tools (the plan's schema and validators, the tools as
        a model is offered them), built again only when the tools change."""
        specs = self._tools.specs()
        cached = self._tool_set
        if cached is None or len(cached.specs) != len(specs) \
                or any(a is not b for a, b in zip(cached.specs, specs, strict=True)):
            cached = self._tool_set = _ToolSet(
                tuple(specs), PlanSchema(prompts.plan_schema(specs, self._limits.max_steps)),
                tuple(spec.as_model_schema() for spec in specs), prompts.plan_prompt(self._limits.max_steps, specs))
        return cached

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
        rendered = prompts.render_context(context)
        conversation = _Conversation(
            messages=[ChatMessage(Role.SYSTEM, prompts.system_prompt(rendered, self._tools.specs())),
                      *history, ChatMessage(Role.USER, run.request.prompt)],
            history=len(history), context_chars=len(rendered))
        # From here on the conversation is in `conversation`, and the hints are made per model
        # call: a run waiting for approval holds neither the history nor the context twice. These
        # `del`s are pinned by tests/unit/runtime/test_memory.py (a parked run's frame locals);
        # other locals of a waiting frame may come and go, these names may not come back.
        del history, rendered
        await self._analyse(run, context)
        del context
        steps = await self._plan(run, conversation)
        for step in steps:
            await self._carry_out(run, step, len(steps), conversation)
        answer = await self._answer(run, conversation)
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

    async def _request(self, run: Run, conversation: _Conversation, purpose: Purpose, max_tokens: int, *,
                       instruction: str | None = None, tools: Sequence[Mapping[str, Any]] = (),
                       json_schema: Mapping[str, Any] | None = None, tool_choice: str | None = None,
                       hints: Mapping[str, Any] | None = None) -> ChatRequest:
        """A request built to fit the model's context window (domain/services/context_window.py); the user is
        told once what had to be left out or shortened."""
        messages = list(conversation.messages)
        if instruction is not None:
            messages.append(ChatMessage(Role.USER, instruction))
        def render_system(limit: int | None) -> str:
            return prompts.system_prompt(run.request.agent_context(), self._tools.specs(), limit)

        fitted = await self._fitter.fit(messages, max_tokens=max_tokens, tools=tools, history=conversation.history,
                                        render_system=render_system, context_chars=conversation.context_chars)
        if not fitted.kinds <= conversation.told:
            # told once per kind of change, not on every call that makes it again
            conversation.told = conversation.told | fitted.kinds
            for note in fitted.notes:
                await run.thought(ThoughtType.DECISION, note)
        return ChatRequest(messages=fitted.messages, purpose=purpose, tools=tools, json_output=json_schema is not None,
                           json_schema=json_schema, tool_choice=tool_choice, max_tokens=fitted.max_tokens,
                           hints=hints if hints is not None else _hints(run), trace_headers=self._trace_headers(run))

    async def _plan(self, run: Run, conversation: _Conversation) -> list[PlanStep]:
        await run.timeline_update("plan", "Plan the work", StepStatus.IN_PROGRESS, 0.0)
        views = self._tool_views()
        schema = views.plan
        request = await self._request(run, conversation, Purpose.PLAN, self._budgets.plan,
                                      instruction=views.plan_prompt, json_schema=schema.schema)
        # The plan is shown as it is written: the step descriptions, as far as the model got.
        shown = _ThoughtStream(run, ThoughtType.PLANNING)
        reasoning = _ThoughtStream(run, ThoughtType.REASONING)

        async def show_plan(text: str, reasoned: str) -> None:
            written = descriptions_so_far(text)
            preview = _plan_preview(written)
            await shown.show(preview, ready=bool(preview) and written[0][1])

        async def show_reasoning(text: str, reasoned: str) -> None:
            await reasoning.show(reasoned)

        turn, reasoned = await self._read(request, show_plan, show_reasoning)
        if reasoned:
            await reasoning.finish(reasoned)
        reading = read_plan(turn.text, schema, prompts.echoes_a_prompt)
        cut_off = turn.finish_reason == "length"
        del turn  # the model's whole reply: not kept while the plan's steps run (frees memory only)
        if reading.steps:
            planned = reading.steps
        else:
            # Never a step made of prose, garbage or the instructions echoed: answer directly.
            planned = [PlannedStep(description=DIRECT_ANSWER, confidence=0.5)]
        steps = await run.add_plan(planned)
        conversation.messages.append(ChatMessage(Role.ASSISTANT, json.dumps(
            {"steps": [{"description": s.description, "tool": s.tool, "args": s.args} for s in steps]},
            ensure_ascii=False)))
        listed = "; ".join(f"{s.index}. {s.description}" for s in steps)
        if reading.steps:
            await shown.finish(f"Planned {len(steps)} step(s): {listed}")
        else:
            cut = f" (it reached its limit of {request.max_tokens} tokens)" if cut_off else ""
            await shown.finish(f"The model's plan could not be used{cut}: {reading.problem}. "
                               f"Answering directly instead: {listed}")
        await run.timeline_update("plan", "Plan the work", StepStatus.COMPLETED, 1.0)
        return steps

    async def _carry_out(self, run: Run, step: PlanStep, total: int, conversation: _Conversation) -> None:
        messages = conversation.messages
        await run.step_update(step, StepStatus.IN_PROGRESS, 0.0)
        await run.timeline_update(step.step_id, step.description, StepStatus.IN_PROGRESS, 0.0)
        await run.thought(ThoughtType.REASONING, f"Step {step.index} of {total}: {step.description}"
                          + (f" — using {step.tool}." if step.tool else "."))
        messages.append(ChatMessage(Role.USER, prompts.step_prompt(step.index, total, step.description,
                                                                   step.tool, step.args)))
        outcome = _StepOutcome()
        calls_in_step = 0
        note = ""
        native = self._tool_mode is ToolCallMode.NATIVE
        while True:
            if not native and step.tool is not None and calls_in_step == 0:
                # The plan's call, as planned: a server without native tool calls still runs tools.
                calls, reply = [ToolCall(f"call_{step.step_id}", step.tool, json.dumps(step.args))], ""
            else:
                # The step's hints are made per call and the turn is let go once read: a step that
                # waits for approval holds neither.
                request = await self._request(
                    run, conversation, Purpose.STEP, self._budgets.step,
                    tools=self._tool_views().model_schemas if native else (),
                    # the plan's tool, through the native interface, on the step's first call
                    tool_choice=step.tool if native and calls_in_step == 0 else None,
                    hints={**_hints(run), "step": {"index": step.index, "total": total,
                                                   "description": step.description, "tool": step.tool,
                                                   "args": step.args}})
                calls, reply = await self._step_turn(run, request)
                del request  # the call's messages and hints: not kept by a step that parks (test_memory.py)
            messages.append(ChatMessage(Role.ASSISTANT, reply, tool_calls=tuple(calls)))
            if not calls:
                note = reply.strip()
                break
            # The reply and each call's result are in `messages`, which a call that waits for
            # approval packs: this frame does not hold them unpacked for the wait (a result read
            # before a call that needs approval, a file or a diff, can be most of what the run
            # holds; pinned by tests/unit/runtime/test_memory.py).
            del reply
            for call in calls:
                if calls_in_step >= self._limits.max_tool_calls_per_step:
                    raise BudgetExceeded(f"Step {step.index} asked for more than "
                                         f"{self._limits.max_tool_calls_per_step} tool calls.")
                calls_in_step += 1
                noted = len(run.tool_notes)
                note = result_text = ""
                prepared = await self._prepare_call(run, call, outcome)
                if isinstance(prepared, str):  # bad arguments: told to the model
                    result_text = prepared
                else:
                    # The approval is awaited in this frame, not in a coroutine of the call's own:
                    # a parked run's chain of suspended frames is what every parked run holds
                    # (pinned by tests/unit/runtime/test_memory.py).
                    tool, args, needs_approval = prepared
                    decided = None
                    del prepared
                    if needs_approval:
                        # A human may take minutes to decide, and the conversation with the model
                        # is most of what a waiting run holds: keep it packed until the decision.
                        # Pinned by test_memory.py: `messages`' content stays out of the wait.
                        packed = pack_messages(messages, self._zdict)
                        messages.clear()
                        try:
                            decided = await self._gate.await_decision(
                                run, step, call.name, tool.spec.action_type, args,
                                f"Aura wants to run {call.name} with {json.dumps(args, ensure_ascii=False)}.")
                        finally:
                            messages[:] = unpack_messages(packed, self._zdict)
                            del packed
                    result_text = await self._run_call(run, call, tool, args, needs_approval, decided, outcome)
                    del tool, args, decided
                messages.append(ChatMessage(Role.TOOL, result_text, tool_call_id=call.id, name=call.name))
                note = _step_note(run.tool_notes[noted:], result_text)
                progress = round(min(0.9, calls_in_step / (calls_in_step + 1)), 2)
                await run.step_update(step, StepStatus.IN_PROGRESS, progress, f"{call.name} done")
            if not native and step.tool is not None:
                break  # as planned: the step's note is what its call returned
        if outcome.succeeded or not (outcome.failed or outcome.rejected):
            status = StepStatus.COMPLETED
        elif outcome.failed:
            status = StepStatus.FAILED
        else:
            status = StepStatus.SKIPPED
        await run.step_update(step, status, 1.0, note[:500])
        await run.timeline_update(step.step_id, step.description, status, 1.0)

    async def _step_turn(self, run: Run, request: ChatRequest) -> tuple[list[ToolCall], str]:
        """One model call of a step: its text is shown as a reasoning thought while it is written.
        Returns the tool calls and the text (an echo of the instructions reads as no text)."""
        shown = _ThoughtStream(run, ThoughtType.REASONING)

        async def show(text: str, reasoned: str) -> None:
            await shown.show(reasoned + text)

        turn, reasoned = await self._read(request, show, show)
        reply = turn.text
        if prompts.echoes_a_prompt(reply):
            reply = ""
        thought = (reasoned + reply).strip()
        if thought and prompts.echoes_a_prompt(thought):
            thought = ""
        if thought or shown.thought_id is not None:
            await shown.finish(thought or "(nothing to add)")
        return turn.tool_calls(), reply

    async def _read(self, request: ChatRequest, on_text: _Shown, on_reasoning: _Shown) -> tuple[ModelTurn, str]:
        """One model call, read whole; as it streams, `on_text` and `on_reasoning` get the text and
        the reasoning (what the model streams apart from its answer) written so far."""
        turn = ModelTurn()
        reasoned: list[str] = []
        async for chunk in self._stream(request):
            turn.add(chunk)
            if isinstance(chunk, ContentDelta):
                await on_text(turn.text, "".join(reasoned))
            elif isinstance(chunk, ReasoningDelta):
                reasoned.append(chunk.text)
                await on_reasoning(turn.text, "".join(reasoned))
        return turn, "".join(reasoned)

    async def _prepare_call(self, run: Run, call: ToolCall,
                            outcome: _StepOutcome) -> str | tuple[Tool, dict[str, Any], bool]:
        """A tool call up to its run or its approval: the budget, its arguments validated, its
        `pending` event. Returns the text fed back to the model when the arguments are bad (they
        are told to the model), else the call's tool and validated arguments."""
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
        tool = self._tools.get(call.name)
        needs_approval = self._tools.needs_approval(call.name, args)
        await run.emit(EventType.TOOL_EXECUTION, {**base, "toolArgs": args, "requiresApproval": needs_approval,
                                                  "status": "pending", "result": None, "error": None})
        return tool, args, needs_approval

    async def _run_call(self, run: Run, call: ToolCall, tool: Tool, args: dict[str, Any], needs_approval: bool,
                        decided: ApprovalRequest | None, outcome: _StepOutcome) -> str:
        """A validated call after its approval (`decided`, when it needed one): reported when
        rejected, else run. Returns the text fed back to the model; tool failures are told to it."""
        base = {"toolCallId": call.id, "toolName": call.name, "toolArgs": args, "requiresApproval": needs_approval}
        if decided is not None:
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

    async def _answer(self, run: Run, conversation: _Conversation) -> str:
        await run.timeline_update("answer", "Write the answer", StepStatus.IN_PROGRESS, 0.0)
        request = await self._request(run, conversation, Purpose.ANSWER, self._budgets.answer,
                                      instruction=prompts.answer_prompt())
        written = ""  # what the model wrote; what of it is shown trails it while it may be an echo
        guard = prompts.AnswerGuard()
        shown = 0
        echoed = False
        reasoning = _ThoughtStream(run, ThoughtType.REASONING)
        reasoned: list[str] = []
        finish_reason: str | None = None
        async with aclosing(self._stream(request)) as chunks:
            async for chunk in chunks:
                if isinstance(chunk, ContentDelta) and chunk.text:
                    written += chunk.text
                    end, echoed = guard.feed(chunk.text)
                    if end > shown:
                        await run.content(written[shown:end], chunk=True)
                        shown = end
                    if echoed:
                        # the model went on to repeat its instructions or to play the next turn:
                        # the answer ended there (or where it was already shown up to), and the
                        # rest is not read
                        written = written[:max(end, shown)]
                        break
                elif isinstance(chunk, ReasoningDelta):
                    reasoned.append(chunk.text)
                    await reasoning.show("".join(reasoned))
                elif isinstance(chunk, Finish):
                    finish_reason = chunk.reason
        if not echoed:
            end, echoed = guard.feed("", final=True)
            written = written[:max(end, shown)]
            if end > shown:
                await run.content(written[shown:end], chunk=True)
        if reasoned:
            await reasoning.finish("".join(reasoned))
        answer = written
        if not answer.strip():
            raise ModelError("The model returned an empty answer.", code="llm_bad_response")
        await run.content(answer, chunk=False)
        await run.timeline_update("answer", "Write the answer", StepStatus.COMPLETED, 1.0)
        if finish_reason == "length" and not echoed:
            # Answer with what is there, and say so in the run's end: never a silent cut.
            run.completion = ("answer_truncated",
                              f"The answer reached its limit of {request.max_tokens} tokens and is cut short; "
                              "ask for the rest, or raise the answer token limit.")
            await run.thought(ThoughtType.REFLECTION, "The answer was cut short at its token limit.")
        return answer

    async def _stream(self, request: ChatRequest) -> AsyncGenerator[ModelChunk, None]:
        """The model's chunks, with the call's latency and failure code reported."""
        started = time.monotonic()
        chunks = self._model.stream(request)
        try:
            async for chunk in chunks:
                yield chunk
        except ModelError as exc:
            self._telemetry.model_call(request.purpose.value, time.monotonic() - started, exc.code)
            raise
        finally:
            # a caller that stops reading (an answer that turned into an echo) ends the model's
            # stream now, and with it the request to the server
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()
        self._telemetry.model_call(request.purpose.value, time.monotonic() - started, None)

    @staticmethod
    def _trace_headers(run: Run) -> dict[str, str]:
        return {"traceparent": run.request.traceparent} if run.request.traceparent else {}


def _hints(run: Run) -> dict[str, Any]:
    return {"prompt": run.request.prompt, "context": run.request.agent_context()}


__all__ = ["Agent", "AgentLimits", "AuraError", "TokenBudgets", "ToolCallMode"]


def _step_note(new_notes: list[dict[str, Any]], result_text: str) -> str:
    """What a step's call leaves as its note: the summary its tool noted, else its result."""
    summary = new_notes[-1].get("summary") if new_notes else None
    return summary if isinstance(summary, str) else result_text
