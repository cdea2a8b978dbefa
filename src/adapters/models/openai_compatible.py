"""The `ChatModel` port over an OpenAI-compatible Chat Completions API, streamed as SSE.

One adapter serves OpenAI, Azure OpenAI, vLLM, Ollama (`/v1`) and llama.cpp's `llama-server`:
they all accept the same request and stream the same `chat.completion.chunk` frames. Differences:

* Azure addresses a deployment (`/openai/deployments/{name}/chat/completions?api-version=...`)
  and authenticates with an `api-key` header; its first chunk carries only
  `prompt_filter_results` with empty `choices`, which is skipped.
* Structured output: a request's JSON Schema goes as `response_format: {"type": "json_schema",
  "json_schema": {"name", "schema", "strict": false}}` to OpenAI, Azure, vLLM and Ollama, and as
  `{"type": "json_object", "schema": ...}` to llama.cpp (llama-server and llama-cpp-python's
  server both enforce it with a grammar; the latter refuses the `json_schema` type). Without a
  schema, `json_output` asks for `{"type": "json_object"}` (JSON mode) everywhere.
* The completion budget is `max_completion_tokens` for OpenAI and Azure (their reasoning models
  refuse `max_tokens`) and `max_tokens` for the others (llama-cpp-python's server ignores the
  newer name and would generate until the window is full).
* A tool the model must call goes as `tool_choice: {"type": "function", "function": {"name"}}`;
  llama-cpp-python's server then constrains the arguments to the tool's schema.
* Reasoning streamed apart from the answer (`delta.reasoning_content` of vLLM and DeepSeek,
  `delta.reasoning` of Ollama and newer vLLM) becomes `ReasoningDelta`.
* `stream_options.include_usage` is documented by OpenAI, Azure, vLLM and Ollama; llama-server
  reports usage in its last chunk anyway. Turn `include_usage` off for a server that rejects it.
* Tool calling needs a model (and for llama-server the `--jinja` flag) that supports it.

Failures become `ModelError` with stable codes and safe messages: never the key, never the raw
response body (it may echo the prompt or the key). Retries happen only before the first chunk
has been handed to the caller; afterwards the caller has streamed tokens and must decide itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import httpx
from httpx_sse import EventSource, SSEError

from domain.model.chat import (
    ChatMessage,
    ChatRequest,
    ContentDelta,
    Finish,
    ModelChunk,
    ReasoningDelta,
    Role,
    ToolCallDelta,
    Usage,
)
from domain.model.errors import ModelError
from domain.model.ports import ChatModel
from domain.runtime.waits import Backoff

logger = logging.getLogger(__name__)

Flavour = Literal["openai", "azure", "vllm", "ollama", "llamacpp"]
Sleep = Callable[[float], Awaitable[None]]

_REDACTED = "***"
# An error body's `code`/`type` is echoed only when it looks like an identifier, never free text.
_SAFE_ERROR_CODE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_BAD_REQUEST_STATUSES = frozenset({400, 404, 422})
_CREDENTIAL_STATUSES = frozenset({401, 403})
# OpenAI's and Azure's code for a prompt longer than the window (vLLM answers a plain 400)
_CONTEXT_OVERFLOW_CODES = frozenset({"context_length_exceeded"})


@dataclass(frozen=True, kw_only=True)
class OpenAICompatibleConfig:
    """The fields without a default come from the settings (app/settings.py, the one place a
    setting's default is written); the others are this adapter's own."""

    base_url: str
    model: str
    api_key: str | None
    flavour: Flavour
    azure_deployment: str | None
    azure_api_version: str | None
    temperature: float | None
    timeout_seconds: float  # longest silence allowed between two chunks
    max_retries: int
    # how a JSON Schema is asked for; "auto" picks by flavour (see the module's docstring)
    structured_output: Literal["auto", "json_schema", "json_object"]
    # how the conversation is sent: "native" (system, user, assistant with `tool_calls`, tool) or
    # "plain" (user and assistant turns only, for chat templates that know no other roles);
    # "auto" = plain for llama.cpp
    messages: Literal["auto", "native", "plain"]
    max_tokens: int | None = None
    connect_timeout_seconds: float = 10.0
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 8.0
    include_usage: bool = True
    extra_headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.flavour == "azure" and not (self.azure_deployment and self.azure_api_version):
            raise ValueError("the azure flavour needs azure_deployment and azure_api_version")
        if self.max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        if self.timeout_seconds <= 0 or self.connect_timeout_seconds <= 0:
            raise ValueError("timeouts must be positive")
        if self.backoff_base_seconds < 0 or self.backoff_max_seconds < 0:
            raise ValueError("backoff times must not be negative")

    def __repr__(self) -> str:
        # The key, and any extra header value (it may be a credential), never reach a log line.
        shown: list[str] = []
        for f in fields(self):
            value: Any = getattr(self, f.name)
            if f.name == "api_key" and value is not None:
                value = _REDACTED
            elif f.name == "extra_headers":
                value = {name: _REDACTED for name in value}
            shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    @property
    def completions_url(self) -> str:
        base = self.base_url.rstrip("/")
        if self.flavour == "azure":
            return f"{base}/openai/deployments/{self.azure_deployment}/chat/completions"
        return f"{base}/chat/completions"


class _TransientFailure(Exception):
    """A failure worth another attempt, as long as nothing has been yielded yet."""

    def __init__(self, error: ModelError, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


class OpenAICompatibleChatModel(ChatModel):
    def __init__(
        self,
        config: OpenAICompatibleConfig,
        client: httpx.AsyncClient,
        *,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._config = config
        self._client = client  # the composition root's: it closes it at shutdown
        self._sleep = sleep
        self._timeout = httpx.Timeout(config.timeout_seconds, connect=config.connect_timeout_seconds)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ModelChunk, None]:
        body = self.request_body(request)
        headers = self.request_headers(request)
        attempt = 0
        while True:
            yielded = False
            try:
                async with aclosing(self._attempt(body, headers, attempt)) as chunks:
                    async for chunk in chunks:
                        yielded = True
                        yield chunk
                return
            except _TransientFailure as failure:
                delay = None if yielded else self._retry_delay(failure, attempt)
                if delay is None:
                    raise failure.error from failure.__cause__
                attempt += 1
                logger.info("model request failed (%s); retry %d of %d in %.2fs",
                            failure.error.message, attempt, self._config.max_retries, delay)
                await self._sleep(delay)

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body sent to `/chat/completions` for this request."""
        config = self._config
        body: dict[str, Any] = {
            "model": config.model,
            "messages": self._messages_to_wire(request.messages),
            "stream": True,
        }
        if config.include_usage:
            body["stream_options"] = {"include_usage": True}
        if config.temperature is not None:
            body["temperature"] = config.temperature
        max_tokens = request.max_tokens if request.max_tokens is not None else config.max_tokens
        if max_tokens is not None:
            body["max_completion_tokens" if config.flavour in ("openai", "azure") else "max_tokens"] = max_tokens
        if request.tools:
            body["tools"] = [self._tool_for_server(tool) for tool in request.tools]
            body["tool_choice"] = ({"type": "function", "function": {"name": request.tool_choice}}
                                   if request.tool_choice else "auto")
        if request.json_schema is not None:
            body["response_format"] = self._schema_format(request.json_schema)
        elif request.json_output:
            body["response_format"] = {"type": "json_object"}
        return body

    def _messages_to_wire(self, messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
        style = self._config.messages
        if style == "auto":
            style = "plain" if self._config.flavour == "llamacpp" else "native"
        if style == "native":
            return [_message_to_wire(m) for m in messages]
        # Plain: what Gemma's own chat template does with a system message (it opens the first
        # user turn), and tool calls and results written out — llama-cpp-python's server drops
        # `tool` messages from chat formats without that role and refuses a null assistant
        # content, so the model would never see what a tool returned.
        wire = [self._plain_message(m) for m in messages if m.role is not Role.SYSTEM]
        system = "\n\n".join(m.content for m in messages if m.role is Role.SYSTEM)
        if system:
            first_user = next((w for w in wire if w["role"] == "user"), None)
            if first_user is None:
                wire.insert(0, {"role": "user", "content": system})
            else:
                first_user["content"] = f"{system}\n\n{first_user['content']}"
        return wire

    @staticmethod
    def _plain_message(message: ChatMessage) -> dict[str, Any]:
        if message.role is Role.TOOL:
            return {"role": "user", "content": f"Result of the tool {message.name or 'call'}:\n{message.content}"}
        if message.role is Role.ASSISTANT and message.tool_calls:
            calls = "; ".join(f"{call.name} with {call.arguments or '{}'}" for call in message.tool_calls)
            return {"role": "assistant", "content": (message.content + "\n" if message.content else "")
                    + f"I call {calls}."}
        return {"role": message.role.value, "content": message.content}

    def _schema_for_server(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        if self._config.flavour != "llamacpp":
            return dict(schema)
        # llama.cpp turns a schema into a grammar by unrolling every bound: a `maxLength` of 1024
        # is a rule nested 1024 deep, which llama-cpp-python's server fails to parse and dies
        # of. The bounds are left out of what constrains generation; Aura validates with them.
        return dict(_without_bounds(schema))

    def _tool_for_server(self, tool: Mapping[str, Any]) -> dict[str, Any]:
        function = tool.get("function")
        if self._config.flavour != "llamacpp" or not isinstance(function, Mapping):
            return dict(tool)
        return {**tool, "function": {**function, "parameters": _without_bounds(function.get("parameters") or {})}}

    def _schema_format(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        style = self._config.structured_output
        if style == "auto":
            style = "json_object" if self._config.flavour == "llamacpp" else "json_schema"
        if style == "json_object":
            return {"type": "json_object", "schema": self._schema_for_server(schema)}
        # not strict: OpenAI's strict mode refuses schemas with defaults and optional properties,
        # which tool parameter schemas have
        return {"type": "json_schema", "json_schema": {"name": "aura_output", "schema": dict(schema), "strict": False}}

    def request_headers(self, request: ChatRequest) -> dict[str, str]:
        headers = {"accept": "text/event-stream"}
        headers.update(self._config.extra_headers)
        headers.update(request.trace_headers)
        # Credentials last, so neither configured nor trace headers can replace them.
        if self._config.api_key:
            if self._config.flavour == "azure":
                headers["api-key"] = self._config.api_key
            else:
                headers["authorization"] = f"Bearer {self._config.api_key}"
        return headers

    def _retry_delay(self, failure: _TransientFailure, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None when it is time to give up."""
        config = self._config
        if attempt >= config.max_retries:
            return None
        if failure.retry_after is not None:
            # Retrying earlier than the server allows only burns an attempt; waiting longer than
            # our cap holds the user's stream hostage. Give up instead.
            return failure.retry_after if failure.retry_after <= config.backoff_max_seconds else None
        return Backoff(config.backoff_base_seconds, config.backoff_max_seconds).delay(attempt + 1)

    async def _attempt(
        self, body: dict[str, Any], headers: dict[str, str], attempt: int
    ) -> AsyncGenerator[ModelChunk, None]:
        config = self._config
        params = {"api-version": config.azure_api_version} if config.flavour == "azure" else None
        started = time.perf_counter()
        try:
            async with self._client.stream(
                "POST", config.completions_url, json=body, headers=headers, params=params,
                timeout=self._timeout,
            ) as response:
                logger.debug("model responded status=%d after %.0f ms (attempt %d, %s)",
                             response.status_code, (time.perf_counter() - started) * 1000, attempt,
                             config.flavour)
                if response.status_code != 200:
                    raise await _status_failure(response)
                async for chunk in _parse_stream(response):
                    yield chunk
        except httpx.ConnectTimeout as exc:
            raise _TransientFailure(
                ModelError("The model could not be reached in time.", code="llm_timeout", retryable=True)
            ) from exc
        except httpx.TimeoutException as exc:
            raise ModelError("The model did not answer in time.", code="llm_timeout",
                             retryable=True) from exc
        except httpx.ConnectError as exc:
            raise _TransientFailure(_unavailable("The model could not be reached.")) from exc
        except httpx.TransportError as exc:
            # The connection broke (e.g. an incomplete chunked body): a cut stream.
            raise _TransientFailure(_unavailable("The model's answer stream was cut off.")) from exc
        finally:
            logger.debug("model request finished after %.0f ms (attempt %d)",
                         (time.perf_counter() - started) * 1000, attempt)


_GRAMMAR_BOUNDS = frozenset({"maxLength", "minLength", "pattern", "format", "minimum", "maximum",
                             "exclusiveMinimum", "exclusiveMaximum"})


def _without_bounds(schema: Any) -> Any:
    if isinstance(schema, Mapping):
        return {key: _without_bounds(value) for key, value in schema.items() if key not in _GRAMMAR_BOUNDS
                or not isinstance(value, int | float | str) or key == "properties"}
    if isinstance(schema, list):
        return [_without_bounds(item) for item in schema]
    return schema


def _unavailable(message: str) -> ModelError:
    return ModelError(message, code="llm_unavailable", retryable=True)


def _bad_response(message: str) -> ModelError:
    return ModelError(message, code="llm_bad_response", retryable=False)


def _message_to_wire(message: ChatMessage) -> dict[str, Any]:
    wire: dict[str, Any] = {"role": message.role.value, "content": message.content}
    if message.role is Role.TOOL:
        if not message.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        wire["tool_call_id"] = message.tool_call_id
    elif message.role is Role.ASSISTANT and message.tool_calls:
        # OpenAI's canonical form: no text beside tool calls is null, not "".
        wire["content"] = message.content or None
        wire["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}
            for call in message.tool_calls
        ]
    if message.name and message.role in (Role.USER, Role.SYSTEM, Role.ASSISTANT):
        wire["name"] = message.name
    return wire


def _retry_after_seconds(headers: httpx.Headers) -> float | None:
    """`retry-after-ms` (OpenAI, Azure) or `retry-after` in seconds; HTTP dates are not used."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            seconds = float(raw) * scale
        except ValueError:
            continue
        if seconds >= 0:
            return seconds
    return None


def _safe_error_code(body: bytes) -> str | None:
    """The provider's machine-readable error code, if the body has one; never its free text."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return None
    for key in ("code", "type"):
        value = error.get(key)
        if isinstance(value, str) and _SAFE_ERROR_CODE.match(value):
            return value
    return None


async def _status_failure(response: httpx.Response) -> Exception:
    status = response.status_code
    if status in _CREDENTIAL_STATUSES:
        return ModelError(f"The model provider refused the credentials (HTTP {status}).",
                          code="llm_unavailable", retryable=False)
    if status == 429 or status >= 500:
        what = "rate limited" if status == 429 else "unavailable"
        return _TransientFailure(_unavailable(f"The model is {what} (HTTP {status})."),
                                 _retry_after_seconds(response.headers))
    code = _safe_error_code(await response.aread())
    if code in _CONTEXT_OVERFLOW_CODES:
        return ModelError("The request is larger than the model's context window; set AURA_MODEL__CONTEXT_WINDOW "
                          "to the model's real window.", code="context_overflow", retryable=False)
    detail = f"HTTP {status}, {code}" if code else f"HTTP {status}"
    if status in _BAD_REQUEST_STATUSES:
        return _bad_response(f"The model rejected the request ({detail}).")
    return _bad_response(f"The model answered with an unexpected status ({detail}).")


@dataclass(slots=True)
class _StreamState:
    finish_reason: str | None = None
    usage: Usage | None = None
    done: bool = False


async def _parse_stream(response: httpx.Response) -> AsyncGenerator[ModelChunk, None]:
    state = _StreamState()
    try:
        async for event in EventSource(response).aiter_sse():
            if not event.data:
                continue
            if event.data.strip() == "[DONE]":
                state.done = True
                break
            for chunk in _chunks_of(event.data, state):
                yield chunk
    except SSEError as exc:
        raise _bad_response("The model did not answer with an event stream.") from exc
    if not state.done and state.finish_reason is None:
        raise _TransientFailure(_unavailable("The model's answer stream was cut off."))
    # A server that sends [DONE] without any finish reason leaves the reason unknown.
    yield Finish(reason=state.finish_reason or "unknown", usage=state.usage)


def _chunks_of(data: str, state: _StreamState) -> list[ModelChunk]:
    """The deltas of one `chat.completion.chunk`; records finish reason and usage in `state`."""
    try:
        payload = json.loads(data)
    except ValueError:
        raise _bad_response("The model sent a malformed stream chunk.") from None
    if not isinstance(payload, dict):
        raise _bad_response("The model sent a stream chunk of an unexpected shape.")
    if payload.get("error") is not None:
        # Providers report failures that happen after the 200 as an `error` chunk.
        raise _TransientFailure(_unavailable("The model failed while answering."))
    usage = payload.get("usage")
    if usage is not None:
        state.usage = _usage_of(usage)
    choices = payload.get("choices")
    if choices is None:
        choices = []
    if not isinstance(choices, list):
        raise _bad_response("The model sent a stream chunk of an unexpected shape.")
    chunks: list[ModelChunk] = []
    for choice in choices:
        if not isinstance(choice, dict):
            raise _bad_response("The model sent a stream chunk of an unexpected shape.")
        if choice.get("index", 0) != 0:
            continue  # Aura always asks for one choice (n=1).
        chunks.extend(_deltas_of(choice.get("delta")))
        reason = choice.get("finish_reason")
        if reason is not None:
            if not isinstance(reason, str):
                raise _bad_response("The model sent a stream chunk of an unexpected shape.")
            state.finish_reason = reason
    return chunks


def _deltas_of(delta: Any) -> list[ModelChunk]:
    if delta is None:
        return []
    if not isinstance(delta, dict):
        raise _bad_response("The model sent a stream chunk of an unexpected shape.")
    chunks: list[ModelChunk] = []
    content = delta.get("content")
    if content is not None and not isinstance(content, str):
        raise _bad_response("The model sent a stream chunk of an unexpected shape.")
    for key in ("reasoning_content", "reasoning"):
        reasoning = delta.get(key)
        if isinstance(reasoning, str) and reasoning:
            chunks.append(ReasoningDelta(reasoning))
            break
    if content:
        chunks.append(ContentDelta(content))
    tool_calls = delta.get("tool_calls")
    if tool_calls is None:
        return chunks
    if not isinstance(tool_calls, list):
        raise _bad_response("The model sent a stream chunk of an unexpected shape.")
    for position, item in enumerate(tool_calls):
        chunks.append(_tool_call_delta(item, position))
    return chunks


def _tool_call_delta(item: Any, position: int) -> ToolCallDelta:
    if not isinstance(item, dict):
        raise _bad_response("The model sent a tool call of an unexpected shape.")
    # Some servers omit `index` when they send whole calls; their list position stands in.
    index = item.get("index", position)
    function = item.get("function") or {}
    call_id = item.get("id")
    if not isinstance(function, dict):
        raise _bad_response("The model sent a tool call of an unexpected shape.")
    name = function.get("name")
    arguments = function.get("arguments")
    if (
        isinstance(index, bool) or not isinstance(index, int)
        or not isinstance(call_id, str | None)
        or not isinstance(name, str | None)
        or not isinstance(arguments, str | None)
    ):
        raise _bad_response("The model sent a tool call of an unexpected shape.")
    return ToolCallDelta(index=index, id=call_id or None, name=name or None, arguments=arguments or "")


def _usage_of(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        raise _bad_response("The model sent usage of an unexpected shape.")
    counts = [usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)]
    if any(isinstance(n, bool) or not isinstance(n, int) for n in counts):
        raise _bad_response("The model sent usage of an unexpected shape.")
    return Usage(prompt_tokens=counts[0], completion_tokens=counts[1])
