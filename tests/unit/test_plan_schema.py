"""A plan checked step by step against its own tool's variant gives the whole schema's verdict and
error, and the agent compiles its plan schema once per tool set."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from domain.model.plan import PlanSchema, _compiles_exactly, read_plan
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


def test_a_plan_with_too_few_or_too_many_steps_is_decided_without_the_whole_schema() -> None:
    """The offline model's plan for a direct answer, every run: `{"steps": []}`. Its count is the
    only error at the shortest path, so it is the whole schema's first error, found by hand."""
    checker = PlanSchema(SCHEMA)
    called: list[object] = []
    checker._whole = _Spy(checker._whole, called)  # type: ignore[assignment]
    reading = read_plan(json.dumps({"steps": []}), checker)
    assert reading == read_plan(json.dumps({"steps": []}), SCHEMA)
    assert reading.steps == [] and reading.problem == "the plan does not follow its schema at steps (minItems)"
    too_many = read_plan(json.dumps({"steps": [{"description": "", "tool": "nope"}] * 4}), checker)
    assert too_many.problem == "the plan does not follow its schema at steps (maxItems)"
    assert called == []


RICH = {"type": "object", "properties": {
    "n": {"type": "integer", "minimum": 1, "maximum": 5, "default": 2},
    "s": {"type": ["string", "null"], "minLength": 1, "maxLength": 3, "default": None},
    "k": {"type": "string", "enum": ["x", "y"]},
    "b": {"type": "boolean", "default": False},
    "arr": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "maxItems": 2},
    "o": {"anyOf": [{"type": "object", "required": ["a"]}, {"not": {"type": "object"}}]}},
    "required": ["n"], "additionalProperties": False}
# keywords the compiled check leaves to jsonschema: a pattern, a format, numbers compared by value,
# a keyword of draft 2020-12 only
ODD = {"type": "object", "properties": {
    "p": {"type": "string", "pattern": "^a$"}, "f": {"type": "string", "format": "date"},
    "e": {"enum": [1, "a"]}, "m": {"minimum": 2}, "u": {"type": "array", "uniqueItems": True},
    "d": {"type": "integer"}}, "dependentRequired": {"d": ["p"]}}
RICH_SCHEMA = prompts.plan_schema([ToolSpec("rich", "Rich.", RICH), ToolSpec("odd", "Odd.", ODD)], 3)
ARGS: list[Any] = [
    {"n": 1}, {"n": 5}, {"n": 0}, {"n": 6}, {"n": 1.0}, {"n": 1.5}, {"n": True}, {"n": "1"}, {},
    {"n": 2, "s": None}, {"n": 2, "s": ""}, {"n": 2, "s": "abcd"}, {"n": 2, "s": "é"}, {"n": 2, "s": 1},
    {"n": 2, "k": "x"}, {"n": 2, "k": "z"}, {"n": 2, "k": None}, {"n": 2, "b": 0}, {"n": 2, "b": True},
    {"n": 2, "arr": [1, 2.5]}, {"n": 2, "arr": [0]}, {"n": 2, "arr": [1, 2, 3]}, {"n": 2, "arr": [True]},
    {"n": 2, "o": {"a": 1}}, {"n": 2, "o": {}}, {"n": 2, "o": 3}, {"n": 2, "extra": 1}, [], None,
]
ODD_ARGS: list[Any] = [
    {"p": "a"}, {"p": "a\n"}, {"p": "ba"}, {"f": "2026-12-08"}, {"f": "not a date"}, {"e": 1}, {"e": True},
    {"e": 1.0}, {"m": True}, {"m": 1}, {"m": "x"}, {"u": [1, True]}, {"u": [1, 1.0]}, {"d": 1}, {"d": 1, "p": "a"}, {},
]


@pytest.mark.parametrize(("tool", "args"), [("rich", a) for a in ARGS] + [("odd", a) for a in ODD_ARGS],
                         ids=[f"rich-{json.dumps(a)}" for a in ARGS] + [f"odd-{json.dumps(a)}" for a in ODD_ARGS])
def test_a_steps_compiled_check_gives_jsonschemas_verdict(tool: str, args: Any) -> None:
    plan = {"steps": [{"description": "Do it", "tool": tool, "args": args}]}
    error = PlanSchema(RICH_SCHEMA).first_error(plan)
    whole = sorted(Draft202012Validator(RICH_SCHEMA).iter_errors(plan), key=lambda e: list(e.path))
    assert (None if error is None else ("/".join(map(str, error.path)), error.validator)) == (
        None if not whole else ("/".join(map(str, whole[0].path)), str(whole[0].validator)))


def test_a_compiled_check_fills_in_no_defaults() -> None:
    assert _compiles_exactly(RICH_SCHEMA["properties"]["steps"]["items"]["anyOf"][1])  # the compiled check runs
    reading = read_plan(json.dumps({"steps": [{"description": "Do it", "tool": "rich", "args": {"n": 3}}]}),
                        PlanSchema(RICH_SCHEMA))
    assert reading.problem is None and reading.steps[0].args == {"n": 3}


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
