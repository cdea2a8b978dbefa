"""Plans and the user-facing timeline, and a robust reader of the plans models write."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import fastjsonschema
from jsonschema import Draft202012Validator, ValidationError


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
            "status": self.status._value_,
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
        return {"stepId": self.step_id, "title": self.title, "status": self.status._value_,
                "progress": self.progress}


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_NO_TOOL = frozenset({"", "null", "none", "no tool", "n/a"})


def _json_candidates(text: str) -> list[str]:
    """The fenced blocks, the whole text, then its outermost braces: each distinct text once (an
    answer that is just the plan's JSON is the whole text and its braces alike, and a plan that
    fails its schema costs a full check per candidate)."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)]
    candidates.append(text)
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    return list(dict.fromkeys(candidates))


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


@dataclass(frozen=True, slots=True)
class PlanError:
    """The first error of a plan by the whole schema (jsonschema's errors sorted by path): where,
    and the keyword it breaks."""

    path: tuple[str | int, ...]
    validator: str


# Keywords a compiled (fastjsonschema, draft 7) validator checks exactly as jsonschema's draft
# 2020-12 does, and annotations both ignore. A variant using any other keyword (a `$ref`, a
# `pattern`, a `format`, ...) is checked by jsonschema alone: the compiled check is only ever a
# faster way to the same verdict, and `use_default=False` keeps it from filling in defaults.
_COMPILED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "minLength", "maxLength", "minimum",
    "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "items", "enum", "const",
    "minProperties", "maxProperties", "anyOf", "allOf", "oneOf", "not",
    "title", "description", "default", "examples", "$comment", "readOnly", "writeOnly", "deprecated"})
_JSON_TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})


def _compiles_exactly(schema: Any) -> bool:
    """True when `schema` uses only keywords (and forms of them) both validators agree on."""
    if type(schema) is not dict or not schema.keys() <= _COMPILED_KEYWORDS:
        return False
    kind = schema.get("type", "object")
    if not all(t in _JSON_TYPES for t in (kind if type(kind) is list else [kind])):
        return False
    # only strings and null compared by value: the two may differ on 1 against true or 1.0
    values = [*schema.get("enum", ()), *([schema["const"]] if "const" in schema else [])]
    if not all(v is None or type(v) is str for v in values):
        return False
    subschemas: list[Any] = []
    for key in ("properties",):
        if key in schema:
            if type(schema[key]) is not dict:
                return False
            subschemas.extend(schema[key].values())
    for key in ("additionalProperties",):
        if key in schema and type(schema[key]) is not bool:
            subschemas.append(schema[key])
    if "items" in schema:
        subschemas.append(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            if type(schema[key]) is not list:
                return False
            subschemas.extend(schema[key])
    if "not" in schema:
        subschemas.append(schema["not"])
    return all(_compiles_exactly(sub) for sub in subschemas)


def _variant_check(variant: Mapping[str, Any]) -> Callable[[Any], bool]:
    """Whether a step follows `variant`: compiled when it compiles exactly (about a tenth of
    jsonschema's cost), else jsonschema's. fastjsonschema turns a schema into Python code, so it
    is only ever given schemas Aura itself builds from its tool registrations (the container's
    tools and their parameters), never one a client or a model sends."""
    if _compiles_exactly(variant):
        compiled = fastjsonschema.compile(dict(variant), use_default=False, detailed_exceptions=False)

        def check(value: Any) -> bool:
            try:
                compiled(value)
            except fastjsonschema.JsonSchemaValueException:
                return False
            return True

        return check
    return Draft202012Validator(variant).is_valid


def _outline_bounds(schema: Mapping[str, Any], steps: Mapping[str, Any]) -> tuple[int, int | None] | None:
    """The steps' count bounds when the schema's outline is prompts.plan_schema's (an object of
    exactly `steps`, an array), so a plan's outline is checked by hand; else None."""
    if (schema.keys() != {"type", "properties", "required", "additionalProperties"}
            or schema["type"] != "object" or schema["required"] != ["steps"]
            or schema["additionalProperties"] is not False or list(schema["properties"]) != ["steps"]
            or not steps.keys() <= {"type", "minItems", "maxItems", "items"} or steps.get("type") != "array"):
        return None
    least, most = steps.get("minItems", 0), steps.get("maxItems")
    if type(least) is not int or (most is not None and (type(most) is not int or most < least)):
        return None
    return least, most


class PlanSchema:
    """A plan's JSON Schema with its validators compiled once (a schema is built per tool set,
    not per run). When its steps are `anyOf` variants told apart by their `tool` (`null`, or one
    tool's name: prompts.plan_schema), a plan is checked step by step against its own tool's
    variant alone: the same verdict as the whole schema (a step can only match the variant of
    its tool) at a fraction of the cost, and a plan with too few or too many steps (the offline
    model's plan for a direct answer is `{"steps": []}`) gets the whole schema's first error
    without running it (it is the only error at the shortest path: `steps`' count). Any other
    plan that fails is checked against the whole schema again, so the reported error is the
    whole schema's."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema: dict[str, Any] = dict(schema)
        self._whole = Draft202012Validator(self.schema)
        self._outline: Draft202012Validator | None = None
        self._bounds: tuple[int, int | None] | None = None
        self._variants: dict[str | None, Callable[[Any], bool]] = {}
        steps = self.schema.get("properties", {}).get("steps")
        variants = steps.get("items", {}).get("anyOf") if isinstance(steps, Mapping) else None
        if not isinstance(variants, list):
            return
        by_tool: dict[str | None, Callable[[Any], bool]] = {}
        for variant in variants:
            tool = variant.get("properties", {}).get("tool") if isinstance(variant, Mapping) else None
            if tool == {"type": "null"} and "tool" in variant.get("required", ()):
                name: str | None = None
            elif (isinstance(tool, Mapping) and set(tool) == {"type", "enum"} and tool["type"] == "string"
                  and len(tool["enum"]) == 1 and isinstance(tool["enum"][0], str)
                  and "tool" in variant.get("required", ())):
                name = tool["enum"][0]
            else:
                return  # not told apart by the tool: the whole schema checks every plan
            if name in by_tool:
                return
            by_tool[name] = _variant_check(variant)
        self._variants = by_tool
        self._bounds = _outline_bounds(self.schema, steps)
        self._outline = Draft202012Validator({**self.schema, "properties": {
            **self.schema["properties"], "steps": {k: v for k, v in steps.items() if k != "items"}}})

    def _outline_error(self, value: Any) -> PlanError | bool | None:
        """The outline's verdict: a PlanError (the whole schema's first), None (the steps are to
        be checked), or False (the whole schema decides)."""
        bounds = self._bounds
        if bounds is not None and type(value) is dict and len(value) == 1 and type(value.get("steps")) is list:
            count, (least, most) = len(value["steps"]), bounds
            if count < least:
                return PlanError(("steps",), "minItems")
            if most is not None and count > most:
                return PlanError(("steps",), "maxItems")
            return None
        if self._outline is None or not self._outline.is_valid(value):
            return False
        return None

    def _matches(self, value: Any) -> bool:
        """True when every step of `value` (whose outline is valid) surely follows its variant."""
        for step in value["steps"]:
            tool = step.get("tool", ...) if isinstance(step, Mapping) else ...
            check = self._variants.get(tool) if tool is None or isinstance(tool, str) else None
            if check is None or not check(step):
                return False
        return True

    def first_error(self, value: Any) -> PlanError | None:
        outline = self._outline_error(value)
        if isinstance(outline, PlanError):
            return outline
        if outline is None and self._matches(value):
            return None
        error: ValidationError | None = next(
            iter(sorted(self._whole.iter_errors(value), key=lambda e: list(e.path))), None)
        return None if error is None else PlanError(tuple(error.path), str(error.validator))


def read_plan(text: str, schema: Mapping[str, Any] | PlanSchema,
              is_echo: Callable[[str], bool] = lambda _: False) -> PlanReading:
    """The plan in the model's answer, valid against `schema` (see prompts.plan_schema), or why
    there is none. Free text is never read as a plan: a step shown to the user is one the model
    gave as such, never its prose or an echo of the instructions (`is_echo`)."""
    checker = schema if isinstance(schema, PlanSchema) else PlanSchema(schema)
    problem = "the answer holds no JSON object"
    for candidate in _json_candidates(text):
        try:
            value = _normalised(json.loads(candidate))
        except ValueError:
            continue
        error = checker.first_error(value)
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
