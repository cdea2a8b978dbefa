"""A deterministic planner behind the ChatModel port.

It reads the facts the agent passes as `hints` (prompt, context, current step) and the tool results
in the conversation, so every plan, tool call and answer it produces reflects what really happened.
Directives in the prompt, one per line, make a run fully scripted:

    @git_status {"repo_path": "."}        run that tool as a plan step
    @answer {"text": "...", "chunks": 20}  answer with exactly this text in that many chunks
    @answer {"text": "...", "chunks": 20, "intervalMs": 50}   ... paced like a slow model

Like a model read from the network, the answer suspends between chunks (at least a bare yield to
the event loop), so a run's events interleave with other work as they would in production.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from domain.model.chat import (
    ChatMessage,
    ChatRequest,
    ContentDelta,
    Finish,
    ModelChunk,
    Purpose,
    Role,
    ToolCallDelta,
    Usage,
)
from domain.model.errors import ModelError
from domain.model.ports import ChatModel

# The arguments are the rest of the line, stripped by str.strip: a lazy `(.*?)\s*$` tries the end
# of the line after every character, ~0.16 ms for the 4 KB `@answer` line of the bench's runs.
_DIRECTIVE = re.compile(r"\s*@([A-Za-z_][A-Za-z0-9_]*)(.*)")
ANSWER_DIRECTIVE = "answer"
MAX_INTERVAL_MS = 10_000
MAX_SCRIPTED_CHUNKS = 100_000


@dataclass(frozen=True, slots=True)
class Directive:
    line: int
    name: str
    args: dict[str, Any]


def parse_directives(prompt: str) -> list[Directive]:
    """Directives of a prompt; bad JSON is a clear error naming the line."""
    directives = []
    for number, line in enumerate(prompt.splitlines(), start=1):
        match = _DIRECTIVE.match(line)
        if not match:
            continue
        name, raw = match.group(1), match.group(2).strip()
        try:
            args = json.loads(raw) if raw else {}
        except ValueError:
            raise ModelError(f"Line {number}: the arguments of @{name} are not valid JSON.",
                             code="invalid_directive") from None
        if not isinstance(args, dict):
            raise ModelError(f"Line {number}: the arguments of @{name} must be a JSON object.",
                             code="invalid_directive")
        directives.append(Directive(number, name, args))
    return directives


def _words(text: str) -> list[str]:
    """Split into chunks that concatenate back to exactly `text`."""
    return re.findall(r"\S+\s*|\s+", text) or [text]


def _even_chunks(text: str, count: int) -> list[str]:
    count = max(1, min(count, len(text) or 1, MAX_SCRIPTED_CHUNKS))
    size, extra = divmod(len(text), count)
    chunks, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        chunks.append(text[start:end])
        start = end
    return chunks


_KEYWORD_TOOLS = (
    (("status", "changes", "modified", "uncommitted"), "git_status", "Check the repository's working tree"),
    (("log", "history", "commits", "recent"), "git_log", "Read the recent commit history"),
    (("branch", "branches"), "git_branches", "List the repository's branches"),
    (("diff",), "git_diff", "Look at the uncommitted changes"),
)


def _planned_tools(request: ChatRequest) -> set[str] | None:
    """The tools a plan may name, read from the plan's schema (None when there is none)."""
    schema = request.json_schema
    if not schema:
        return None
    try:
        variants = schema["properties"]["steps"]["items"]["anyOf"]
    except (KeyError, TypeError):
        return None
    return {name for v in variants for name in v.get("properties", {}).get("tool", {}).get("enum", [])}


class OfflineChatModel(ChatModel):
    def __init__(self, default_repo: str = ".") -> None:
        self._default_repo = default_repo

    async def stream(self, request: ChatRequest) -> AsyncIterator[ModelChunk]:
        # A model call is network I/O: the caller always suspends at least once, so a run never
        # keeps the event loop (and the first events it already produced) to itself.
        await asyncio.sleep(0)
        interval: float | None = None  # the answer suspends between its chunks, like a stream
        if request.purpose is Purpose.PLAN:
            chunks = [json.dumps({"steps": self._plan(request)}, ensure_ascii=False)]
        elif request.purpose is Purpose.STEP:
            async for chunk in self._step(request):
                yield chunk
            return
        else:
            chunks, interval = self._answer(request)
        for text in chunks:
            yield ContentDelta(text)
            if interval is not None:
                await asyncio.sleep(interval)
        yield Finish("stop", Usage(prompt_tokens=sum(len(m.content) for m in request.messages) // 4,
                                   completion_tokens=sum(len(c) for c in chunks) // 4))

    # -- planning ------------------------------------------------------------------------
    def _plan(self, request: ChatRequest) -> list[dict[str, Any]]:
        prompt = str(request.hints.get("prompt", ""))
        directives = parse_directives(prompt)
        tool_directives = [d for d in directives if d.name != ANSWER_DIRECTIVE]
        if directives:
            known = _planned_tools(request)
            for directive in tool_directives:
                if known is not None and directive.name not in known:
                    # a scripted run names a tool that does not exist: say so, as the agent once did
                    raise ModelError(f"Line {directive.line}: the prompt names an unknown tool {directive.name!r}. "
                                     f"Available tools: {', '.join(sorted(known))}.", code="unknown_tool")
            return [{"description": f"Run {d.name}", "tool": d.name, "args": d.args, "confidence": 1.0}
                    for d in tool_directives]
        available = {t["function"]["name"] for t in request.tools} if request.tools else None
        words = set(re.findall(r"[a-z]+", prompt.lower()))
        steps: list[dict[str, Any]] = [{"description": "Read the request and the page context",
                                        "tool": None, "args": {}, "confidence": 0.9}]
        for keywords, tool, description in _KEYWORD_TOOLS:
            if words.intersection(keywords) and (available is None or tool in available):
                steps.append({"description": description, "tool": tool,
                              "args": {"repo_path": self._default_repo}, "confidence": 0.7})
        steps.append({"description": "Summarise the findings for the user", "tool": None, "args": {},
                      "confidence": 0.9})
        return steps

    # -- steps ---------------------------------------------------------------------------
    async def _step(self, request: ChatRequest) -> AsyncIterator[ModelChunk]:
        step = request.hints.get("step") or {}
        last = request.messages[-1] if request.messages else None
        tool = step.get("tool")
        if tool and last is not None and last.role is Role.USER:
            index = int(step.get("index", 0))
            yield ToolCallDelta(index=0, id=f"call_{index}", name=tool)
            arguments = json.dumps(step.get("args") or {}, ensure_ascii=False)
            # split the arguments the way real models stream them
            half = len(arguments) // 2
            yield ToolCallDelta(index=0, arguments=arguments[:half])
            yield ToolCallDelta(index=0, arguments=arguments[half:])
            yield Finish("tool_calls")
            return
        results = self._results_since_last_user(request.messages)
        if results:
            note = "; ".join(self._describe(m) for m in results)
        else:
            note = f"Done: {step.get('description', 'step')}."
        yield ContentDelta(note)
        yield Finish("stop")

    @staticmethod
    def _results_since_last_user(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        found: list[ChatMessage] = []
        for message in reversed(messages):
            if message.role is Role.USER:
                break
            if message.role is Role.TOOL:
                found.append(message)
        return list(reversed(found))

    @staticmethod
    def _describe(message: ChatMessage) -> str:
        try:
            value = json.loads(message.content)
        except ValueError:
            return f"{message.name}: {message.content[:300]}"
        if isinstance(value, Mapping) and isinstance(value.get("summary"), str):
            return f"{message.name}: {value['summary']}"
        return f"{message.name}: {json.dumps(value, ensure_ascii=False)[:300]}"

    # -- answer --------------------------------------------------------------------------
    def _answer(self, request: ChatRequest) -> tuple[list[str], float]:
        prompt = str(request.hints.get("prompt", ""))
        scripted = [d for d in parse_directives(prompt) if d.name == ANSWER_DIRECTIVE]
        if scripted:
            args = scripted[-1].args
            text = str(args.get("text", ""))
            chunks = args.get("chunks", 1)
            interval_ms = args.get("intervalMs", 0)
            if (not text or not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1
                    or not isinstance(interval_ms, int | float) or isinstance(interval_ms, bool)
                    or not 0 <= interval_ms <= MAX_INTERVAL_MS):
                raise ModelError('@answer needs {"text": non-empty string, "chunks": positive integer, '
                                 f'"intervalMs": optional number from 0 to {MAX_INTERVAL_MS}}}.',
                                 code="invalid_directive")
            return _even_chunks(text, chunks), interval_ms / 1000
        findings = [self._describe(m) for m in request.messages if m.role is Role.TOOL]
        context = request.hints.get("context") or {}
        where = context.get("title") or context.get("path") if isinstance(context, Mapping) else None
        asked = " ".join(line for line in prompt.splitlines() if not _DIRECTIVE.match(line)).strip()
        lines = [(f"Here is what I found for “{asked[:200]}”" if asked else "Here is what I found")
                 + (f" on {where}" if where else "") + ":"]
        if findings:
            lines.extend(f"- {finding}" for finding in findings)
        else:
            lines.append("- No tool was needed; I reviewed your request and the page context.")
        lines.append("(Answered by Aura's offline model.)")
        return _words("\n".join(lines)), 0.0
