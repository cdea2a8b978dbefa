"""Plans and the user-facing timeline, and a robust reader of the plans models write."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class StepStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    WAITING_APPROVAL = "waiting_approval"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(slots=True)
class PlannedStep:
    """One step of a plan. `tool`/`args` are the model's suggestion; the step may call more."""

    description: str
    tool: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    confidence: float = 0.8


@dataclass(slots=True)
class PlanStep:
    step_id: str
    index: int
    description: str
    tool: str | None
    args: dict[str, Any]
    confidence: float
    status: StepStatus = StepStatus.PENDING
    progress: float = 0.0
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "stepId": self.step_id,
            "index": self.index,
            "description": self.description,
            "status": self.status.value,
            "progress": self.progress,
            "note": self.note,
            "confidence": self.confidence,
        }


@dataclass(slots=True)
class TimelineEntry:
    step_id: str
    title: str
    status: StepStatus = StepStatus.PENDING
    progress: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"stepId": self.step_id, "title": self.title, "status": self.status.value,
                "progress": self.progress}


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•]|step\s*\d+\s*[:.)-])\s*(.+?)\s*$", re.IGNORECASE)
_DESCRIPTION_KEYS = ("description", "title", "step", "task", "name", "summary")
_ARGS_KEYS = ("args", "arguments", "parameters", "input", "tool_args", "toolArgs")
_TOOL_KEYS = ("tool", "tool_name", "toolName", "action")


def _json_candidates(text: str) -> list[str]:
    candidates = [m.group(1) for m in _FENCE.finditer(text)]
    candidates.append(text)
    for opener, closer in (("{", "}"), ("[", "]")):
        start, end = text.find(opener), text.rfind(closer)
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
    return candidates


def _step_from_item(item: Any) -> PlannedStep | None:
    if isinstance(item, str):
        return PlannedStep(description=item.strip()) if item.strip() else None
    if not isinstance(item, Mapping):
        return None
    description = next((str(item[k]).strip() for k in _DESCRIPTION_KEYS
                        if isinstance(item.get(k), str | int | float) and str(item[k]).strip()), "")
    tool = next((item[k] for k in _TOOL_KEYS if isinstance(item.get(k), str) and item[k].strip()), None)
    args: Any = next((item[k] for k in _ARGS_KEYS if k in item), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            args = {}
    if not isinstance(args, Mapping):
        args = {}
    confidence = item.get("confidence", 0.8)
    if isinstance(confidence, bool) or not isinstance(confidence, int | float):
        confidence = 0.8
    if not description:
        if tool is None:
            return None
        description = f"Run {tool}"
    return PlannedStep(description=description, tool=tool, args=dict(args),
                       confidence=min(1.0, max(0.0, float(confidence))))


def _steps_from_json(value: Any) -> list[PlannedStep] | None:
    items: Any = value
    if isinstance(value, Mapping):
        items = next((value[k] for k in ("steps", "plan", "tasks") if isinstance(value.get(k), list)), None)
        if items is None and isinstance(value.get("plan"), Mapping):
            return _steps_from_json(value["plan"])
    if not isinstance(items, list):
        return None
    steps = [s for s in (_step_from_item(i) for i in items) if s is not None]
    return steps if steps or not items else None


def parse_plan(text: str) -> tuple[list[PlannedStep], bool]:
    """Read a plan from whatever the model answered. Returns (steps, structured): structured is
    False when the answer was free text and the steps were recovered from its lines."""
    for candidate in _json_candidates(text):
        try:
            parsed = json.loads(candidate)
        except ValueError:
            continue
        steps = _steps_from_json(parsed)
        if steps is not None:
            return steps, True
    listed = [m.group(1) for line in text.splitlines() if (m := _LIST_ITEM.match(line))]
    if listed:
        return [PlannedStep(description=d, confidence=0.5) for d in listed], False
    summary = " ".join(text.split())
    if not summary:
        return [], False
    return [PlannedStep(description=summary[:300], confidence=0.4)], False
