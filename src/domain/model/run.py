"""A run: one agent execution for one prompt, the state it shows and the events it emits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from domain.model.approval import ApprovalRequest
from domain.model.events import Event, EventType, RunIds, RunStatus, ThoughtType
from domain.model.identity import Principal
from domain.model.plan import PlannedStep, PlanStep, StepStatus, TimelineEntry
from domain.model.ports import Clock

# Takes each event of a run; returns None when the run goes on at once, else what it awaits first.
EventSink = Callable[[Event], Awaitable[None] | None]


class DisconnectPolicy(StrEnum):
    CANCEL = "cancel"
    CONTINUE = "continue"


@dataclass(frozen=True, slots=True)
class RunRequest:
    prompt: str
    context: Mapping[str, Any] = field(default_factory=dict)
    thread_id: str | None = None
    source: str | None = None
    caller_type: str | None = None
    bearer_token: str | None = None
    on_disconnect: DisconnectPolicy = DisconnectPolicy.CANCEL
    traceparent: str | None = None

    def agent_context(self) -> dict[str, Any]:
        """The page context plus the caller's source headers, as the agent sees them."""
        merged = dict(self.context)
        if self.source is not None:
            merged["source"] = self.source
        if self.caller_type is not None:
            merged["caller_type"] = self.caller_type
        return merged


class Run:
    """Holds a run's visible state and numbers its events. Every state change the user can see
    goes through `emit`, so the snapshot and the event stream never disagree."""

    # A run waiting for approval keeps its Run for as long as the approval takes: no __dict__
    # (pinned by tests/unit/runtime/test_memory.py; add a field to the slots, never a __dict__).
    __slots__ = ("_clock", "_seq", "_sink", "answer_parts", "cancel_reason", "completion", "created_at", "end_data",
                 "ids", "pending_approval", "plan", "principal", "request", "status", "timeline", "tool_calls",
                 "tool_notes")

    def __init__(self, ids: RunIds, principal: Principal, request: RunRequest, clock: Clock,
                 sink: EventSink) -> None:
        self.ids = ids
        self.principal = principal
        self.request = request
        self._clock = clock
        self._sink = sink
        self._seq = 0
        self.status = RunStatus.RUNNING
        self.plan: list[PlanStep] = []
        self.timeline: dict[str, TimelineEntry] = {}
        self.pending_approval: ApprovalRequest | None = None
        self.answer_parts: list[str] = []
        self.tool_calls = 0
        self.tool_notes: list[dict[str, Any]] = []  # what each tool call did, for the thread's memory
        self.cancel_reason: str | None = None
        self.created_at = clock.timestamp()
        self.end_data: dict[str, Any] | None = None
        # The `end` reason and message of a run that completes; the agent sets another when the
        # answer it completes with is cut short.
        self.completion: tuple[str, str] = ("completed", "The run completed.")

    @property
    def last_seq(self) -> int:
        return self._seq

    async def emit(self, type_: EventType, data: Mapping[str, Any]) -> Event:
        event = self._numbered(type_, data)
        waiting = self._sink(event)
        if waiting is not None:
            await waiting
        return event

    def _numbered(self, type_: EventType, data: Mapping[str, Any]) -> Event:
        self._seq += 1
        return Event(type_, self._seq, self.ids, self._clock.timestamp(), data)

    async def thought(self, kind: ThoughtType, content: str, sources: list[Any] | None = None,
                      thought_id: str | None = None) -> None:
        """A whole thought (`chunk: false`): a new one, or the final text of the thought `thought_id`
        whose pieces were streamed, replacing them."""
        await self.emit(EventType.THOUGHT, {"thoughtId": thought_id or f"thought_{self._seq + 1}",
                                            "thoughtType": kind._value_, "content": content, "chunk": False,
                                            "sources": sources or []})

    async def thought_piece(self, thought_id: str | None, kind: ThoughtType, text: str) -> str:
        """A piece of a thought as the model generates it (`chunk: true`), appended to the earlier
        pieces of `thought_id`; None starts a thought. Returns the thought's id."""
        thought_id = thought_id or f"thought_{self._seq + 1}"
        # one per piece the model writes: sunk here rather than through `emit`, one coroutine less each
        waiting = self._sink(self._numbered(EventType.THOUGHT, {"thoughtId": thought_id, "thoughtType": kind._value_,
                                                                "content": text, "chunk": True, "sources": []}))
        if waiting is not None:
            await waiting
        return thought_id

    async def timeline_update(self, step_id: str, title: str, status: StepStatus, progress: float) -> None:
        entry = self.timeline.get(step_id)
        if entry is None:
            entry = self.timeline[step_id] = TimelineEntry(step_id, title)
        if entry.status is status and entry.progress == progress and entry.title == title:
            return  # only real changes are sent
        entry.title, entry.status, entry.progress = title, status, progress
        await self.emit(EventType.TIMELINE_STEP_UPDATE, entry.as_dict())

    async def add_plan(self, planned: list[PlannedStep]) -> list[PlanStep]:
        for index, item in enumerate(planned, start=1):
            step = PlanStep(step_id=f"step_{index}", index=index, description=item.description,
                            tool=item.tool, args=dict(item.args), confidence=item.confidence)
            self.plan.append(step)
            await self.emit(EventType.PLAN_STEP, {
                "stepId": step.step_id, "index": step.index, "description": step.description,
                "status": step.status._value_, "confidence": step.confidence,
            })
        return self.plan

    async def step_update(self, step: PlanStep, status: StepStatus, progress: float, note: str = "") -> None:
        if step.status is status and step.progress == progress and step.note == note:
            return
        step.status, step.progress, step.note = status, progress, note
        await self.emit(EventType.PLAN_STEP_UPDATE, {"stepId": step.step_id, "status": status._value_,
                                                     "progress": progress, "note": note})

    async def content(self, text: str, *, chunk: bool) -> None:
        if chunk:
            self.answer_parts.append(text)
        # The bulk of a run's events: sunk here rather than through `emit`, one coroutine less each.
        waiting = self._sink(self._numbered(EventType.CONTENT, {"content": text, "chunk": chunk}))
        if waiting is not None:
            await waiting

    async def error(self, code: str, message: str, *, retryable: bool) -> None:
        await self.emit(EventType.ERROR, {"errorType": code, "message": message, "retryable": retryable})

    async def end(self, status: RunStatus, reason: str, message: str) -> None:
        self.status = status
        self.pending_approval = None
        self.end_data = {"status": status._value_, "reason": reason, "message": message}
        await self.emit(EventType.END, self.end_data)

    def snapshot(self) -> dict[str, Any]:
        """The run's current state, as `GET /aura/runs/{runId}` and the resume `snapshot` show it."""
        return {
            "runId": self.ids.run_id,
            "sessionId": self.ids.session_id,
            "threadId": self.ids.thread_id,
            "traceId": self.ids.trace_id,
            "status": self.status._value_,
            "lastSeq": self._seq,
            "createdAt": self.created_at,
            "plan": [step.as_dict() for step in self.plan],
            "timeline": [entry.as_dict() for entry in self.timeline.values()],
            "pendingApproval": None if self.pending_approval is None else self.pending_approval.to_record(),
            "answer": "".join(self.answer_parts),
            "end": self.end_data,
        }
