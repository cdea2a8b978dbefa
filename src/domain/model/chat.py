"""The chat model interface: messages and tool schemas in, a stream of deltas out."""

from __future__ import annotations

import json
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # raw JSON text as the model produced it


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


def messages_text(messages: Sequence[ChatMessage]) -> bytes:
    """The messages as the text `pack_messages` compresses; also what a preset dictionary for it is
    made of (`zdict`: text the packed conversations are likely to repeat)."""
    rows = [[m.role.value, m.content, [[c.id, c.name, c.arguments] for c in m.tool_calls], m.tool_call_id, m.name]
            for m in messages]
    # ensure_ascii: any string (even one with lone surrogates) round-trips through ASCII
    return json.dumps(rows, separators=(",", ":")).encode("ascii")


def pack_messages(messages: Sequence[ChatMessage], zdict: bytes = b"") -> bytes:
    """The messages as one compressed value, for a run that will not need them for a long time (a
    run waiting for approval): a conversation's text compresses well, and one bytes object holds
    far less than a message object and a string per message. `unpack_messages` with the same
    `zdict` gives them back equal."""
    compressor = zlib.compressobj(1, zdict=zdict) if zdict else zlib.compressobj(1)
    return compressor.compress(messages_text(messages)) + compressor.flush()


def unpack_messages(packed: bytes, zdict: bytes = b"") -> list[ChatMessage]:
    decompressor = zlib.decompressobj(zdict=zdict) if zdict else zlib.decompressobj()
    text = decompressor.decompress(packed) + decompressor.flush()
    return [ChatMessage(Role(role), content, tuple(ToolCall(*call) for call in calls), tool_call_id, name)
            for role, content, calls, tool_call_id, name in json.loads(text)]


class Purpose(StrEnum):
    """Why the agent asks the model. Remote models ignore it; the offline model plans by it."""

    PLAN = "plan"
    STEP = "step"
    ANSWER = "answer"


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: Sequence[ChatMessage]
    purpose: Purpose
    tools: Sequence[Mapping[str, Any]] = ()
    json_output: bool = False
    # The JSON Schema the answer must follow (structured output), where the server can enforce one.
    json_schema: Mapping[str, Any] | None = None
    # A tool the model must call (the native `tool_choice`); None lets the model choose.
    tool_choice: str | None = None
    # The completion budget of this call: the answer is cut (finish reason `length`) beyond it.
    max_tokens: int | None = None
    # Structured facts the agent already holds (prompt, context, current step); only the offline
    # model reads them, so no remote model ever depends on them.
    hints: Mapping[str, Any] = field(default_factory=dict)
    trace_headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Reasoning a model streams apart from its answer (`reasoning_content` of vLLM, DeepSeek, Ollama)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str
    usage: Usage | None = None


ModelChunk = ContentDelta | ReasoningDelta | ToolCallDelta | Finish


@dataclass(slots=True)
class _PendingCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ModelTurn:
    """Assembles the deltas of one model answer into text and complete tool calls."""

    text_parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    _calls: dict[int, _PendingCall] = field(default_factory=dict)

    def add(self, chunk: ModelChunk) -> None:
        if isinstance(chunk, ContentDelta):
            self.text_parts.append(chunk.text)
        elif isinstance(chunk, ReasoningDelta):
            return
        elif isinstance(chunk, ToolCallDelta):
            call = self._calls.setdefault(chunk.index, _PendingCall())
            if chunk.id:
                call.id = chunk.id
            if chunk.name and chunk.name != call.name:
                # OpenAI sends the name once; llama-cpp-python's server repeats it whole in every
                # delta of the call, which must not make "readread…"
                call.name = chunk.name if chunk.name.startswith(call.name) else call.name + chunk.name
            call.arguments.append(chunk.arguments)
        else:
            self.finish_reason = chunk.reason
            self.usage = chunk.usage

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def tool_calls(self) -> list[ToolCall]:
        return [
            ToolCall(id=c.id or f"call_{i}", name=c.name, arguments="".join(c.arguments))
            for i, c in sorted(self._calls.items())
        ]


class ModelProfile(ABC):
    """A port: what Aura knows of the model it talks to — how many tokens its context window holds
    and how many tokens a text is for it — so every request is built to fit."""

    @abstractmethod
    async def context_window(self) -> int:
        """The model's context window in tokens (prompt and completion together)."""

    @abstractmethod
    async def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """The token count of each text, exact where the model's tokenizer is known, else a safe
        over-estimate."""


# A byte of UTF-8 per 3 is more than any common tokenizer gives for prose, code or JSON (about 4
# characters a token for English), and a CJK character (3 bytes) counts as one token.
ESTIMATE_BYTES_PER_TOKEN = 3


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / ESTIMATE_BYTES_PER_TOKEN)


class EstimatedModelProfile(ModelProfile):
    """A known window and a safe estimate of token counts: for a model whose tokenizer Aura cannot
    reach (and the offline model)."""

    def __init__(self, context_window: int) -> None:
        self._window = context_window

    async def context_window(self) -> int:
        return self._window

    async def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [estimate_tokens(text) for text in texts]
