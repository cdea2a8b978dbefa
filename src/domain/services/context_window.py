"""Requests that fit the model's context window.

Every model call is built to fit: the prompt's tokens plus the completion budget (`max_tokens`)
plus a margin for the chat template stay within the window. What gives way, in this order: a tool
output or page context larger than a quarter of the room is shortened to it; earlier turns of the
thread are left out, oldest first; tool outputs and the page context are halved, largest first,
down to a floor; the completion budget shrinks down to its minimum. Whatever is shortened says so
in the text the model reads (a visible marker). A request that still cannot fit is refused with
`context_overflow` before anything is sent: a model server told to read more than its window
either fails mid-stream or silently forgets the start of the conversation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from domain.model.chat import ChatMessage, ModelProfile, Role
from domain.model.errors import ContextOverflow

# Role markers and separators a chat template adds around each message.
MESSAGE_OVERHEAD_TOKENS = 4
# Nothing is shortened below this: a stub of a tool output still tells the model what it was.
MIN_ITEM_TOKENS = 48
SHORTENED_MARKER = "\n…[{left} more characters left out to fit the model's context window]"


@dataclass(frozen=True, slots=True)
class FittedRequest:
    messages: list[ChatMessage]
    max_tokens: int
    prompt_tokens: int  # as counted (or safely estimated) by the model profile
    window: int
    notes: tuple[str, ...] = ()  # what was left out or shortened, in words for the user
    # which kinds of change were made: history, tool_outputs, page_context, answer_budget
    kinds: frozenset[str] = frozenset()

    @property
    def changed(self) -> bool:
        return bool(self.notes)


def shorten_text(text: str, keep_chars: int) -> str:
    """`text` cut to `keep_chars` characters and a marker saying how much was left out."""
    keep_chars = max(0, keep_chars)
    if keep_chars >= len(text):
        return text
    return text[:keep_chars] + SHORTENED_MARKER.format(left=len(text) - keep_chars)


def _message_text(message: ChatMessage) -> str:
    return message.content + "".join(call.name + call.arguments for call in message.tool_calls)


class ContextFitter:
    def __init__(self, profile: ModelProfile, *, min_completion_tokens: int = 64, margin_ratio: float = 0.03,
                 min_margin_tokens: int = 32) -> None:
        self._profile = profile
        self._min_completion = min_completion_tokens
        self._margin_ratio = margin_ratio
        self._min_margin = min_margin_tokens
        # the tools last counted and their tokens: an agent offers the same tuple on every call
        self._tools_counted: tuple[Sequence[Mapping[str, object]], int] | None = None

    async def window(self) -> int:
        return await self._profile.context_window()

    async def _tool_tokens(self, tools: Sequence[Mapping[str, object]]) -> int:
        counted = self._tools_counted
        if counted is not None and counted[0] is tools and isinstance(tools, tuple):
            return counted[1]
        tokens = (await self._profile.count_tokens([json.dumps(list(tools), ensure_ascii=False)]))[0]
        if isinstance(tools, tuple):  # a list may change in place: only a tuple is remembered
            self._tools_counted = (tools, tokens)
        return tokens

    async def fit(self, messages: Sequence[ChatMessage], *, max_tokens: int,
                  tools: Sequence[Mapping[str, object]] = (), history: int = 0,
                  render_system: Callable[[int | None], str] | None = None,
                  context_chars: int = 0) -> FittedRequest:
        """Fit `messages` (the system message first, then `history` messages of earlier turns, then
        this run's) with `max_tokens` kept for the completion. `render_system(limit)` renders the
        system message with the page context cut to `limit` characters (None: whole), of
        `context_chars` in all."""
        window = await self._profile.context_window()
        margin = max(self._min_margin, math.ceil(window * self._margin_ratio))
        state = _Fitting(self._profile, list(messages), history, render_system, context_chars)
        await state.count_all()
        tool_tokens = 0
        if tools:
            tool_tokens = await self._tool_tokens(tools)

        def room(reserve: int) -> int:
            return window - margin - reserve - tool_tokens

        if state.total() <= room(max_tokens):
            return FittedRequest(state.messages, max_tokens, state.total() + tool_tokens, window)

        # 1. no single tool output or page context takes more than a quarter of the room
        cap = max(MIN_ITEM_TOKENS, room(max_tokens) // 4)
        for index in state.shortenable():
            if state.counts[index] > cap:
                await state.shrink(index, cap)
        # 2. earlier turns of the thread, oldest first
        while state.total() > room(max_tokens) and state.history_left:
            state.drop_oldest_turn()
        # 3. tool outputs and page context, largest first, down to the floor
        while state.total() > room(max_tokens):
            candidates = [i for i in state.shortenable() if state.counts[i] > MIN_ITEM_TOKENS]
            if not candidates:
                break
            largest = max(candidates, key=lambda i: state.counts[i])
            await state.shrink(largest, max(MIN_ITEM_TOKENS, state.counts[largest] // 2))
        # 4. a smaller completion budget
        reserve = max_tokens
        if state.total() > room(reserve):
            reserve = window - margin - tool_tokens - state.total()
            if reserve < min(self._min_completion, max_tokens):
                raise ContextOverflow(
                    f"The request does not fit the model's context window: about {state.total() + tool_tokens} "
                    f"tokens with nothing left to shorten, and the window holds {window} tokens, "
                    f"{min(self._min_completion, max_tokens)} of them kept for the answer. Shorten the prompt "
                    "or start a new thread.")
            state.notes.append(f"kept {reserve} instead of {max_tokens} tokens for the answer")
        return FittedRequest(state.messages, reserve, state.total() + tool_tokens, window,
                             tuple(state.describe(window)), state.kinds(reserve != max_tokens))


class _Fitting:
    """The messages of one request while they are made to fit, with their token counts."""

    def __init__(self, profile: ModelProfile, messages: list[ChatMessage], history: int,
                 render_system: Callable[[int | None], str] | None, context_chars: int) -> None:
        self._profile = profile
        self.messages = messages
        self.history_left = history
        self._render_system = render_system if messages and messages[0].role is Role.SYSTEM else None
        self._context_chars = context_chars
        self._context_limit: int | None = None
        self._originals: dict[int, str] = {}
        self.counts: list[int] = []
        self.dropped = 0
        self.shortened_tools: set[int] = set()
        self.context_shortened = False
        self.exhausted: set[int] = set()  # shortened as far as they go
        self.notes: list[str] = []

    async def count_all(self) -> None:
        self.counts = await self._profile.count_tokens([_message_text(m) for m in self.messages])

    def total(self) -> int:
        return sum(self.counts) + MESSAGE_OVERHEAD_TOKENS * len(self.messages)

    def shortenable(self) -> list[int]:
        found = [i for i, m in enumerate(self.messages) if m.role is Role.TOOL]
        if self._render_system is not None and self._context_chars > 0:
            found.append(0)
        return [i for i in found if i not in self.exhausted]

    def drop_oldest_turn(self) -> None:
        # A turn is the user's prompt and the answer: both go, so roles keep alternating.
        count = min(2, self.history_left)
        del self.messages[1:1 + count]
        del self.counts[1:1 + count]
        self.history_left -= count
        self.dropped += count
        # indexes of shortened tool messages move down with the messages after the dropped ones
        self._originals = {(i - count if i > 0 else i): text for i, text in self._originals.items()}
        self.shortened_tools = {i - count for i in self.shortened_tools}
        self.exhausted = {(i - count if i > 0 else i) for i in self.exhausted}

    async def shrink(self, index: int, target: int) -> None:
        """Shorten message `index` (a tool output, or the page context in the system message) to
        about `target` tokens: by the ratio of counts, recounted, a few times at most."""
        before = self.counts[index]
        for _ in range(4):
            current = self.counts[index]
            if current <= target:
                break
            ratio = target / current * 0.9
            message = self.messages[index]
            if index == 0 and self._render_system is not None:
                limit = self._context_limit if self._context_limit is not None else self._context_chars
                self._context_limit = max(0, int(limit * ratio))
                content = self._render_system(self._context_limit)
                self.context_shortened = True
            else:
                original = self._originals.setdefault(index, message.content)
                kept = min(len(original), int(len(message.content) * ratio))
                content = shorten_text(original, kept)
                self.shortened_tools.add(index)
            self.messages[index] = replace(message, content=content)
            self.counts[index] = (await self._profile.count_tokens([_message_text(self.messages[index])]))[0]
            if ratio <= 0:
                break
        if self.counts[index] >= before or (index == 0 and self._context_limit == 0):
            self.exhausted.add(index)

    def kinds(self, budget_cut: bool) -> frozenset[str]:
        made = {"history": bool(self.dropped), "tool_outputs": bool(self.shortened_tools),
                "page_context": self.context_shortened, "answer_budget": budget_cut}
        return frozenset(kind for kind, done in made.items() if done)

    def describe(self, window: int) -> list[str]:
        parts: list[str] = []
        if self.dropped:
            parts.append(f"left out the {self.dropped} oldest message(s) of this conversation")
        if self.shortened_tools:
            parts.append(f"shortened {len(self.shortened_tools)} tool output(s)")
        if self.context_shortened:
            parts.append("shortened the page context")
        parts.extend(self.notes)
        return [f"To fit the model's {window}-token context window, Aura " + "; ".join(parts) + "."] if parts else []
