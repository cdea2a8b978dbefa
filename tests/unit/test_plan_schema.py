"""A plan checked step by step against its own tool's variant gives the whole schema's verdict and
error, and the agent compiles its plan schema once per tool set."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from domain.model.plan import PlanSchema, read_plan
from domain.model.tools import ToolSpec
from domain.services import prompts
from tests.unit.fakes import RecordingTool, ScriptedModel, text
from tests.unit.harness import Harness, collect

SPECS = [
    ToolSpec("git_commit", "Commit.", {"type": "object", "properties": {
        "repo_path": {"type": "string", "minLength": 1}, "message": {"type": "string", "maxLength": 20}},
        "required": ["repo_path", "message"], "additionalProperties": False}),
    ToolSpec("read", "Read.", {"type": "object", "properties": {"value": {"type": "integer", "minimum": 0}}}),
]
SCHEMA = prompts.plan_schema(SPECS, 3)
COMMIT = {"description": "Commit it", "tool": "git_commit", "args": {"repo_path": "r", "message": "m"}}

PLANS: list[Any] = [
    {"steps": [COMMIT]},
    {"steps": [{"description": "Think", "tool": None}, {"description": "Read", "tool": "read", "args": {}}]},
    {"steps": [{"description": "Read", "tool": "read", "args": {"value": 3}}, COMMIT, COMMIT]},
    {"steps": [COMMIT] * 4},  # too many
    {"steps": []},
    {"steps": [{**COMMIT, "args": {"repo_path": "r"}}]},
    {"steps": [{**COMMIT, "args": {"repo_path": "r", "message": "m" * 21}}]},
    {"steps": [{**COMMIT, "args": {"repo_path": "r", "message": "m", "extra": 1}}]},
    {"steps": [{"description": "Read", "tool": "read", "args": {"value": -1}}]},
    {"steps": [{"description": "Read", "tool": "read", "args": {"value": True}}]},
    {"steps": [{"description": "Read", "tool": "nope", "args": {}}]},
    {"steps": [{"description": "Read", "tool": ["read"], "args": {}}]},
    {"steps": [{"description": "Read", "tool": {"x": 1}, "args": {}}]},
    {"steps": [{"description": "Read", "tool": 1, "args": {}}]},
    {"steps": [{"description": "Read", "tool": True, "args": {}}]},
    {"steps": [{"description": "Read", "args": {}}]},
    {"steps": [{"description": "", "tool": None}]},
    {"steps": [{"tool": None}]},
    {"steps": [{"description": "Think", "tool": None, "args": {}}]},
    {"steps": [{"description": "Think", "tool": "read"}]},
    {"steps": ["a step"]},
    {"steps": [None]},
    {"steps": [COMMIT], "extra": 1},
    {"steps": {"0": COMMIT}},
    {"plan": [COMMIT]},
    [COMMIT],
    "steps",
    None,
]


def _whole_error(value: Any) -> tuple[str, str] | None:
    errors = sorted(Draft202012Validator(SCHEMA).iter_errors(value), key=lambda e: list(e.path))
    return None if not errors else ("/".join(map(str, errors[0].path)), str(errors[0].validator))


@pytest.mark.parametrize("plan", PLANS, ids=[json.dumps(p)[:60] for p in PLANS])
def test_a_plan_checked_by_its_tools_variant_gets_the_whole_schemas_verdict_and_error(plan: Any) -> None:
    error = PlanSchema(SCHEMA).first_error(plan)
    assert (None if error is None else ("/".join(map(str, error.path)), str(error.validator))) == _whole_error(plan)
    # and read_plan says the same with the schema or its compiled form
    compiled = read_plan(json.dumps(plan), PlanSchema(SCHEMA))
    assert compiled == read_plan(json.dumps(plan), SCHEMA)


class _Spy:
    def __init__(self, validator: Draft202012Validator, called: list[object]) -> None:
        self._validator, self._called = validator, called

    def iter_errors(self, value: Any) -> Any:
        self._called.append(value)
        return self._validator.iter_errors(value)


def test_the_cheap_check_is_the_one_that_runs_on_a_valid_plan() -> None:
    checker = PlanSchema(SCHEMA)
    called: list[object] = []
    checker._whole = _Spy(checker._whole, called)  # type: ignore[assignment]
    assert checker.first_error({"steps": [COMMIT]}) is None
    assert called == []  # the whole schema (every variant tried per step) never ran
    checker.first_error({"steps": [{"description": "Read", "tool": "nope"}]})
    assert len(called) == 1  # a failing plan: the whole schema names the error


def test_an_answer_that_is_just_a_failing_plan_is_checked_once() -> None:
    """The whole text and its outermost braces are the same text then: one candidate, one whole
    schema's check, the same problem (the offline model's plan for a direct answer, every run)."""
    checker = PlanSchema(SCHEMA)
    called: list[object] = []
    checker._whole = _Spy(checker._whole, called)  # type: ignore[assignment]
    reading = read_plan(json.dumps({"steps": []}), checker)
    assert reading == read_plan(json.dumps({"steps": []}), SCHEMA)
    assert reading.steps == [] and reading.problem == "the plan does not follow its schema at steps (minItems)"
    assert called == [{"steps": []}]


def test_a_schema_whose_steps_are_not_told_apart_by_tool_is_checked_whole() -> None:
    schema = {"type": "object", "properties": {"steps": {"type": "array", "items": {"anyOf": [
        {"type": "object", "properties": {"tool": {"type": "string"}}}, {"type": "string"}]}}}}
    checker = PlanSchema(schema)
    assert checker._outline is None
    assert checker.first_error({"steps": ["x", {"tool": "any"}]}) is None
    error = checker.first_error({"steps": [1]})
    assert error is not None and error.validator == "anyOf"


async def test_the_agent_builds_its_plan_schema_once_for_its_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[int] = []
    real = prompts.plan_schema

    def counting(specs: Any, max_steps: int) -> dict[str, Any]:
        built.append(max_steps)
        return real(specs, max_steps)

    monkeypatch.setattr(prompts, "plan_schema", counting)
    plan = json.dumps({"steps": [{"description": "Think", "tool": None}]})
    model = ScriptedModel(text(plan), text("thought"), text("Done"), text(plan), text("thought"), text("Done"))
    h = Harness(model, tools=[RecordingTool("read")])
    for _ in range(2):
        _, watcher = await h.start("Please check")
        events = await collect(watcher)
        assert events[-1].data["status"] == "completed"
    assert len(built) == 1
    schemas = [r.json_schema for r in model.requests if r.json_schema is not None]
    assert len(schemas) == 2 and schemas[0] == real(h.registry.specs(), built[0])
