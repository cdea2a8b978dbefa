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


@dataclass(frozen=True, slots=True, init=False)
class Event:
    type: EventType
    seq: int
    ids: RunIds
    timestamp: int
    data: Mapping[str, Any] = field(default_factory=dict)
    # Where adapters keep the event's serialised envelope: an event never changes once made, so
    # one logged and written to several clients is encoded once.
    encoded: list[bytes] = field(default_factory=list, compare=False, repr=False)

    def __init__(self, type: EventType, seq: int, ids: RunIds, timestamp: int,
                 data: Mapping[str, Any] | None = None, encoded: list[bytes] | None = None) -> None:
        # Every event of every run is made here: its slots are set through their descriptors, about
        # half the cost of the generated frozen __init__ (an `object.__setattr__` by name per field).
        _SET_TYPE(self, type)
        _SET_SEQ(self, seq)
        _SET_IDS(self, ids)
        _SET_TIMESTAMP(self, timestamp)
        _SET_DATA(self, {} if data is None else data)
        _SET_ENCODED(self, [] if encoded is None else encoded)

    @property
    def is_terminal(self) -> bool:
        return self.type is EventType.END

    def envelope(self) -> dict[str, Any]:
        return {
            # `_value_`, the member's value as stored: `.value` is a descriptor call (about half a
            # microsecond), paid here per event and by runs' events and snapshots (run.py, plan.py)
            "type": self.type._value_,
            "version": ENVELOPE_VERSION,
            "seq": self.seq,
            "runId": self.ids.run_id,
            "sessionId": self.ids.session_id,
            "threadId": self.ids.thread_id,
            "traceId": self.ids.trace_id,
            "timestamp": self.timestamp,
            # the event's own dict, not a copy: an envelope is encoded, never changed
            "data": self.data if type(self.data) is dict else dict(self.data),
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


_SET_TYPE, _SET_SEQ, _SET_IDS, _SET_TIMESTAMP, _SET_DATA, _SET_ENCODED = (
    getattr(Event, name).__set__ for name in ("type", "seq", "ids", "timestamp", "data", "encoded"))
