"""The SSE event model: one envelope for every event of a run (contract section 3)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

ENVELOPE_VERSION = "1.0"


class EventType(StrEnum):
    START = "start"
    THOUGHT = "thought"
    PLAN_STEP = "plan_step"
    PLAN_STEP_UPDATE = "plan_step_update"
    TIMELINE_STEP_UPDATE = "timeline_step_update"
    TOOL_EXECUTION = "tool_execution"
    HITL = "hitl"
    CONTENT = "content"
    ERROR = "error"
    END = "end"
    SNAPSHOT = "snapshot"


class ThoughtType(StrEnum):
    ANALYSIS = "analysis"
    PLANNING = "planning"
    REASONING = "reasoning"
    DECISION = "decision"
    REFLECTION = "reflection"


class RunStatus(StrEnum):
    """Final (and in-flight) status of a run; the final ones are `end.status` values."""

    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"

    @property
    def is_final(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMEOUT)


@dataclass(frozen=True, slots=True)
class RunIds:
    run_id: str
    session_id: str
    thread_id: str
    trace_id: str


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    seq: int
    ids: RunIds
    timestamp: int
    data: Mapping[str, Any] = field(default_factory=dict)
    # Where adapters keep the event's serialised envelope: an event never changes once made, so
    # one logged and written to several clients is encoded once.
    encoded: list[bytes] = field(default_factory=list, compare=False, repr=False)

    @property
    def is_terminal(self) -> bool:
        return self.type is EventType.END

    def envelope(self) -> dict[str, Any]:
        return {
            "type": self.type.value,
            "version": ENVELOPE_VERSION,
            "seq": self.seq,
            "runId": self.ids.run_id,
            "sessionId": self.ids.session_id,
            "threadId": self.ids.thread_id,
            "traceId": self.ids.trace_id,
            "timestamp": self.timestamp,
            "data": dict(self.data),
        }

    @classmethod
    def from_envelope(cls, envelope: Mapping[str, Any]) -> Event:
        return cls(
            type=EventType(envelope["type"]),
            seq=int(envelope["seq"]),
            ids=RunIds(
                run_id=str(envelope["runId"]),
                session_id=str(envelope["sessionId"]),
                thread_id=str(envelope["threadId"]),
                trace_id=str(envelope["traceId"]),
            ),
            timestamp=int(envelope["timestamp"]),
            data=dict(envelope.get("data") or {}),
        )
