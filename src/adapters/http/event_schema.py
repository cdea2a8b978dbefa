"""The SSE payloads as pydantic models: the published JSON Schema of the envelope and of each
event type (GET /aura/schema/events.json). Tests validate every event the service emits against it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

StepStatus = Literal["pending", "in_progress", "waiting_approval", "completed", "failed", "skipped"]


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StartData(_Data):
    message: str
    resumeUrl: str


class ThoughtData(_Data):
    thoughtId: str = Field(description="One thought's id: its streamed pieces and its final text share it")
    thoughtType: Literal["analysis", "planning", "reasoning", "decision", "reflection"]
    content: str
    chunk: bool = Field(description="true: a piece to append to the thought's text so far; false: the thought's "
                                    "whole text, replacing its pieces")
    sources: list[Any]


class PlanStepData(_Data):
    stepId: str
    index: int = Field(ge=1)
    description: str
    status: Literal["pending"]
    confidence: float = Field(ge=0, le=1)


class PlanStepUpdateData(_Data):
    stepId: str
    status: StepStatus
    progress: float = Field(ge=0, le=1)
    note: str


class TimelineStepUpdateData(_Data):
    stepId: str
    title: str
    status: StepStatus
    progress: float = Field(ge=0, le=1)


class ToolExecutionData(_Data):
    toolCallId: str
    toolName: str
    toolArgs: dict[str, Any]
    status: Literal["pending", "running", "success", "failed", "cancelled", "rejected"]
    result: Any
    error: str | None
    requiresApproval: bool


class HitlData(_Data):
    requestId: str
    sessionId: str
    actionType: str
    message: str
    context: dict[str, Any]
    requiresApproval: Literal[True]
    expiresAt: int


class ContentData(_Data):
    content: str
    chunk: bool


class ErrorData(_Data):
    errorType: str
    message: str
    retryable: bool


class EndData(_Data):
    status: Literal["completed", "failed", "cancelled", "timeout"]
    reason: str
    message: str


class SnapshotData(BaseModel):
    model_config = ConfigDict(extra="allow")
    runId: str
    status: str


def _envelope(type_name: str, data_model: type[BaseModel]) -> type[BaseModel]:
    fields: dict[str, Any] = {
        "type": (Literal[type_name], ...),
        "version": (Literal["1.0"], ...),
        "seq": (int, Field(ge=0, description="1, 2, 3 … within a run; 0 for notices outside the sequence")),
        "runId": (str, ...), "sessionId": (str, ...), "threadId": (str, ...), "traceId": (str, ...),
        "timestamp": (int, Field(description="Unix seconds, UTC")),
        "data": (data_model, ...),
    }
    from pydantic import create_model

    name = "".join(part.title() for part in type_name.split("_")) + "Event"
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


EVENT_DATA: dict[str, type[BaseModel]] = {
    "start": StartData, "thought": ThoughtData, "plan_step": PlanStepData, "plan_step_update": PlanStepUpdateData,
    "timeline_step_update": TimelineStepUpdateData, "tool_execution": ToolExecutionData, "hitl": HitlData,
    "content": ContentData, "error": ErrorData, "end": EndData, "snapshot": SnapshotData,
}
EVENT_MODELS = [_envelope(name, model) for name, model in EVENT_DATA.items()]


def events_json_schema() -> dict[str, Any]:
    """One schema: an envelope is exactly one of the event types (discriminated by `type`)."""
    definitions: dict[str, Any] = {}
    variants = []
    for model in EVENT_MODELS:
        schema = model.model_json_schema(ref_template="#/$defs/{model}")
        definitions.update(schema.pop("$defs", {}))
        definitions[model.__name__] = schema
        variants.append({"$ref": f"#/$defs/{model.__name__}"})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "/aura/schema/events.json",
        "title": "Aura SSE event envelope (contract v1)",
        "description": "The `data` of every SSE frame but the final `[DONE]`. A run's event is framed with "
                       "`id: <runId>:<seq>` and `event: <type>`; a notice (`seq` 0) has no id. Heartbeats are "
                       "comment lines (`: ping`) with no blank line after them: never an event.",
        "oneOf": variants,
        "$defs": definitions,
    }
