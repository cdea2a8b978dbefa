"""Plans and the user-facing timeline, and a robust reader of the plans models write."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from jsonschema import Draft202012Validator


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
_NO_TOOL = frozenset({"", "null", "none", "no tool", "n/a"})


def _json_candidates(text: str) -> list[str]:
    candidates = [m.group(1) for m in _FENCE.finditer(text)]
    candidates.append(text)
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    return candidates


def _normalised(value: Any) -> Any:
    """The common near-misses of a model without enforced structured output, put right: a "none"
    tool, missing arguments, extra keys beside the three a step has."""
    if not isinstance(value, Mapping) or not isinstance(value.get("steps"), list):
        return value
    steps = []
    for item in value["steps"]:
        if not isinstance(item, Mapping):
            steps.append(item)
            continue
        tool = item.get("tool")
        if isinstance(tool, str) and tool.strip().lower() in _NO_TOOL:
            tool = None
        step: dict[str, Any] = {"description": item.get("description"), "tool": tool}
        if tool is not None:
            step["args"] = item.get("args", {})
        steps.append(step)
    return {"steps": steps}


@dataclass(frozen=True, slots=True)
class PlanReading:
    steps: list[PlannedStep]
    problem: str | None = None  # why no plan could be read; `steps` is empty then


def read_plan(text: str, schema: Mapping[str, Any], is_echo: Callable[[str], bool] = lambda _: False) -> PlanReading:
    """The plan in the model's answer, valid against `schema` (see prompts.plan_schema), or why
    there is none. Free text is never read as a plan: a step shown to the user is one the model
    gave as such, never its prose or an echo of the instructions (`is_echo`)."""
    validator = Draft202012Validator(dict(schema))
    problem = "the answer holds no JSON object"
    for candidate in _json_candidates(text):
        try:
            value = _normalised(json.loads(candidate))
        except ValueError:
            continue
        error = next(iter(sorted(validator.iter_errors(value), key=lambda e: list(e.path))), None)
        if error is not None:
            where = "/".join(str(p) for p in error.path) or "plan"
            # the rule broken, never the model's text (the user sees this)
            problem = f"the plan does not follow its schema at {where} ({error.validator})"
            continue
        steps = [PlannedStep(description=" ".join(str(item["description"]).split()), tool=item["tool"],
                             args=dict(item.get("args") or {})) for item in value["steps"]]
        echoed = next((s.description for s in steps if is_echo(s.description) or not s.description), None)
        if echoed is not None:
            return PlanReading([], "a step repeats the instructions instead of describing work")
        return PlanReading(steps)
    return PlanReading([], problem)


def _unescaped_prefix(raw: str) -> str:
    """The decoded text of a JSON string's body seen so far (an escape cut by the stream waits)."""
    for end in range(len(raw), max(-1, len(raw) - 7), -1):
        try:
            return str(json.loads(f'"{raw[:end]}"'))
        except ValueError:
            continue
    return ""


_DESCRIPTION_START = re.compile(r'"description"\s*:\s*"')


def descriptions_so_far(partial_json: str) -> list[tuple[str, bool]]:
    """The step descriptions of a plan still being generated, each as far as it has been written
    and whether it is complete: what the user is shown while the model plans."""
    found: list[tuple[str, bool]] = []
    for match in _DESCRIPTION_START.finditer(partial_json):
        start = match.end()
        position = start
        while position < len(partial_json):
            char = partial_json[position]
            if char == "\\":
                position += 2
                continue
            if char == '"':
                break
            position += 1
        complete = position < len(partial_json)
        found.append((_unescaped_prefix(partial_json[start:min(position, len(partial_json))]), complete))
    return found
