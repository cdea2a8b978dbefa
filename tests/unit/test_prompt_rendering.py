"""The prompts' text is what their templates and json.dumps make of the values, character for
character, however it is rendered."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from domain.model.tools import ToolSpec
from domain.services import prompts

_SCALARS = (st.text() | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=2)
            | st.integers() | st.booleans() | st.none() | st.floats(allow_nan=True, allow_infinity=True))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
_KEYS = st.sampled_from([*prompts.KNOWN_CONTEXT_KEYS, "other", "x", "é", ""]) | st.text(max_size=6)


def _reference(context: dict[str, Any]) -> str:
    known = {k: context[k] for k in prompts.KNOWN_CONTEXT_KEYS if k in context}
    others = {k: v for k, v in context.items() if k not in known}
    if others:
        known["other"] = others
    return json.dumps(known, ensure_ascii=False, indent=2, sort_keys=True, default=str)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=6))
def test_a_context_renders_as_json_dumps_would(context: dict[str, Any]) -> None:
    assert prompts.render_context(context) == _reference(context)


def test_the_awkward_cases_render_alike() -> None:
    for context in [{}, {"title": 'quote " backslash \\ control \x00\x1f\x7f line sep \u2028 é 𝄞'},
                    {"metadata": {"b": [], "a": {}, "n": [0, -(2**63), 2**64 - 1, 2**64, True, None, 1.5, 1e16]}},
                    {"url": "u", "zeta": 1, "Ä": 2, "ä": 3, "other": {"nested": "x"}},
                    {"title": "lone \udc80 surrogate"}, {"metadata": {"deep": [[[[[[]]]]]]}}]:
        assert prompts.render_context(context) == _reference(context)


@settings(max_examples=200, deadline=None)
@given(st.text(), st.lists(st.text(max_size=12), max_size=3), st.integers(), st.integers(), st.text(),
       st.sampled_from([None, "git_log"]), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
def test_the_system_and_step_prompts_are_their_templates_filled_in(
        context: str, tools: list[str], index: int, total: int, description: str, tool: str | None,
        args: dict[str, str]) -> None:
    specs = [ToolSpec(name, "d", {"type": "object"}) for name in tools]
    assert prompts.system_prompt(context, specs) == prompts.SYSTEM.substitute(
        context=context, tools=", ".join(tools) or "none", version=prompts.PROMPTS_VERSION)
    suggestion = (f"The plan suggests calling {tool} with {json.dumps(args, ensure_ascii=False)}."
                  if tool else "The plan suggests no tool for this step.")
    assert prompts.step_prompt(index, total, description, tool, args) == prompts.STEP.substitute(
        index=index, total=total, description=description, suggestion=suggestion)


def test_braces_and_dollars_in_values_are_text() -> None:
    assert "{tools} $version ${x} {0}" in prompts.system_prompt("{tools} $version ${x} {0}", [])
