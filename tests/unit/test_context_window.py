"""Requests built to fit the model's context window: what gives way, in which order, and the
typed refusal when nothing can."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from domain.model.chat import ChatMessage, ModelProfile, Role
from domain.model.errors import ContextOverflow
from domain.services.context_window import MESSAGE_OVERHEAD_TOKENS, ContextFitter, shorten_text


class CharProfile(ModelProfile):
    """One token a character: token arithmetic a test can do by hand."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.counted: list[str] = []

    async def context_window(self) -> int:
        return self.window

    async def count_tokens(self, texts: Sequence[str]) -> list[int]:
        self.counted.extend(texts)
        return [len(t) for t in texts]


def system(limit: int | None = None, context: str = "C" * 2000) -> str:
    shown = context if limit is None or limit >= len(context) else context[:limit] + "[cut]"
    return f"SYS<{shown}>"


def total(messages: Sequence[ChatMessage]) -> int:
    return sum(len(m.content) for m in messages) + MESSAGE_OVERHEAD_TOKENS * len(messages)


async def test_a_request_that_fits_is_sent_unchanged_with_its_whole_budget() -> None:
    messages = [ChatMessage(Role.SYSTEM, "s" * 100), ChatMessage(Role.USER, "u" * 100)]
    fitted = await ContextFitter(CharProfile(1000)).fit(messages, max_tokens=300)
    assert fitted.messages == messages and fitted.max_tokens == 300 and fitted.notes == ()
    assert fitted.prompt_tokens == 200 + 2 * MESSAGE_OVERHEAD_TOKENS


async def test_history_goes_oldest_first_a_whole_turn_at_a_time() -> None:
    history = []
    for n in range(5):
        history += [ChatMessage(Role.USER, f"q{n}" + "x" * 198), ChatMessage(Role.ASSISTANT, f"a{n}" + "y" * 198)]
    messages = [ChatMessage(Role.SYSTEM, "s" * 100), *history, ChatMessage(Role.USER, "now")]
    fitted = await ContextFitter(CharProfile(1500), margin_ratio=0, min_margin_tokens=0).fit(
        messages, max_tokens=500, history=len(history))
    kept = [m.content[:2] for m in fitted.messages[1:-1]]
    assert kept == ["q3", "a3", "q4", "a4"]  # the two newest turns, whole
    assert fitted.messages[0].content == "s" * 100 and fitted.messages[-1].content == "now"
    assert total(fitted.messages) + 500 <= 1500
    assert fitted.notes == ("To fit the model's 1500-token context window, Aura left out the 6 oldest "
                            "message(s) of this conversation.",)


async def test_a_huge_tool_output_is_shortened_with_a_visible_marker() -> None:
    output = "line of tool output\n" * 3000  # 60,000 characters
    messages = [ChatMessage(Role.SYSTEM, "s" * 100), ChatMessage(Role.USER, "check it"),
                ChatMessage(Role.TOOL, output, tool_call_id="c1", name="read")]
    fitted = await ContextFitter(CharProfile(4096)).fit(messages, max_tokens=512)
    shortened = fitted.messages[2].content
    assert shortened.startswith("line of tool output\n")
    assert "more characters left out to fit the model's context window]" in shortened
    assert total(fitted.messages) + 512 <= 4096
    assert fitted.messages[2].tool_call_id == "c1"
    assert "shortened 1 tool output(s)" in fitted.notes[0]


async def test_a_large_page_context_is_rendered_again_shortened() -> None:
    messages = [ChatMessage(Role.SYSTEM, system()), ChatMessage(Role.USER, "what is on the page?")]
    fitted = await ContextFitter(CharProfile(1024), margin_ratio=0, min_margin_tokens=0).fit(
        messages, max_tokens=256, render_system=system, context_chars=2000)
    assert fitted.messages[0].content.startswith("SYS<CCC") and fitted.messages[0].content.endswith("[cut]>")
    assert total(fitted.messages) + 256 <= 1024
    assert "shortened the page context" in fitted.notes[0]


async def test_the_answer_budget_shrinks_before_the_request_is_refused() -> None:
    messages = [ChatMessage(Role.SYSTEM, "s" * 100), ChatMessage(Role.USER, "u" * 800)]
    fitted = await ContextFitter(CharProfile(1100), margin_ratio=0, min_margin_tokens=0).fit(messages, max_tokens=400)
    assert fitted.max_tokens == 1100 - 900 - 2 * MESSAGE_OVERHEAD_TOKENS
    assert "kept 192 instead of 400 tokens for the answer" in fitted.notes[0]


async def test_a_prompt_larger_than_the_window_is_a_typed_refusal() -> None:
    messages = [ChatMessage(Role.SYSTEM, "s" * 100), ChatMessage(Role.USER, "u" * 5000)]
    with pytest.raises(ContextOverflow) as caught:
        await ContextFitter(CharProfile(4096)).fit(messages, max_tokens=512)
    assert caught.value.code == "context_overflow" and not caught.value.retryable
    assert "4096 tokens" in caught.value.message and "Shorten the prompt" in caught.value.message


async def test_tools_sent_with_the_request_count_against_the_window() -> None:
    tools = [{"type": "function", "function": {"name": "t", "description": "d" * 600, "parameters": {}}}]
    messages = [ChatMessage(Role.SYSTEM, "s"), *[ChatMessage(r, "h" * 200) for r in (Role.USER, Role.ASSISTANT)],
                ChatMessage(Role.USER, "go")]
    fitted = await ContextFitter(CharProfile(1200), margin_ratio=0, min_margin_tokens=0).fit(
        messages, max_tokens=300, tools=tools, history=2)
    assert [m.content for m in fitted.messages] == ["s", "go"]  # the tools' 700-odd tokens pushed the turn out


def test_shorten_text_says_how_much_was_left_out() -> None:
    assert shorten_text("abcdef", 10) == "abcdef"
    assert shorten_text("abcdef", 2) == "ab\n…[4 more characters left out to fit the model's context window]"


async def test_the_same_tuple_of_tools_is_counted_once_and_a_list_or_other_tools_again() -> None:
    profile = CharProfile(100_000)
    fitter = ContextFitter(profile)
    messages = [ChatMessage(Role.USER, "hi")]
    tools = ({"type": "function", "function": {"name": "a"}},)
    first = await fitter.fit(messages, max_tokens=10, tools=tools)
    again = await fitter.fit(messages, max_tokens=10, tools=tools)
    tools_json = '[{"type": "function", "function": {"name": "a"}}]'
    assert profile.counted.count(tools_json) == 1
    assert first.prompt_tokens == again.prompt_tokens == len("hi") + MESSAGE_OVERHEAD_TOKENS + len(tools_json)
    other = ({"type": "function", "function": {"name": "b"}},)
    assert (await fitter.fit(messages, max_tokens=10, tools=other)).prompt_tokens == first.prompt_tokens
    listed = [dict(tools[0])]
    await fitter.fit(messages, max_tokens=10, tools=listed)
    listed[0]["function"] = {"name": "longer"}  # a list may change between calls: counted each time
    changed = await fitter.fit(messages, max_tokens=10, tools=listed)
    assert profile.counted.count(tools_json) == 2
    assert changed.prompt_tokens == first.prompt_tokens + len("longer") - len("a")
