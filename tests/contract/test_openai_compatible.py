"""Contract tests: the OpenAI-compatible adapter against a local server speaking the real wire format."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import httpx
import pytest

from adapters.models.openai_compatible import OpenAICompatibleChatModel
from domain.model.chat import (
    ChatMessage,
    ChatRequest,
    ContentDelta,
    Finish,
    ModelChunk,
    ModelTurn,
    Purpose,
    ReasoningDelta,
    Role,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from domain.model.errors import ModelError
from tests.defaults import model_config

from .chat_server import DONE, ChatServer, Reply, Stream, content_frames, data_frame

KEY = "sk-test-Zq81vUu0c4nS3cr3tK3y"
PROMPT = "What is the weather in Zürich right now?"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
CONTENT_TEXT = ["The", " weather", " in", " Zürich", " is", " sunny", ",", " 21", "°C", "."]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

# a conversation after one tool call: the call, then its result
TOOL_HISTORY = [
    ChatMessage(Role.USER, PROMPT),
    ChatMessage(Role.ASSISTANT, tool_calls=(ToolCall("call_1", "get_weather", '{"city":"Zürich"}'),)),
    ChatMessage(Role.TOOL, '{"temp": 21}', tool_call_id="call_1", name="get_weather"),
]

ModelFactory = Callable[..., OpenAICompatibleChatModel]


class RecordingSleep:
    """Stands in for asyncio.sleep: remembers each back-off instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
async def server() -> AsyncIterator[ChatServer]:
    async with ChatServer() as chat_server:
        yield chat_server


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
async def make_model(server: ChatServer, sleep: RecordingSleep) -> AsyncIterator[ModelFactory]:
    async with httpx.AsyncClient() as client:
        def factory(**overrides: Any) -> OpenAICompatibleChatModel:
            settings: dict[str, Any] = {"base_url": f"{server.url}/v1", "model": "gpt-4o-mini", "api_key": KEY}
            return OpenAICompatibleChatModel(model_config(**(settings | overrides)), client, sleep=sleep)

        yield factory


def user_request(**fields: Any) -> ChatRequest:
    messages = [ChatMessage(Role.SYSTEM, "You are Aura."), ChatMessage(Role.USER, PROMPT)]
    return ChatRequest(messages=messages, purpose=Purpose.ANSWER, **fields)


async def collect(model: OpenAICompatibleChatModel, request: ChatRequest) -> list[ModelChunk]:
    return [chunk async for chunk in model.stream(request)]


async def collect_until_error(
    model: OpenAICompatibleChatModel, request: ChatRequest
) -> tuple[list[ModelChunk], ModelError]:
    received: list[ModelChunk] = []
    with pytest.raises(ModelError) as caught:
        async for chunk in model.stream(request):
            received.append(chunk)
    return received, caught.value


def assemble(chunks: list[ModelChunk]) -> ModelTurn:
    turn = ModelTurn()
    for chunk in chunks:
        turn.add(chunk)
    return turn


# --- streaming -------------------------------------------------------------------------------


async def test_streams_each_content_piece_then_one_finish_with_usage(
    server: ChatServer, make_model: ModelFactory
) -> None:
    server.enqueue(Stream.recording("content"))

    chunks = await collect(make_model(), user_request())

    assert chunks == [*(ContentDelta(piece) for piece in CONTENT_TEXT),
                      Finish("stop", Usage(prompt_tokens=24, completion_tokens=10))]


async def test_split_parallel_tool_calls_assemble_into_exact_calls(
    server: ChatServer, make_model: ModelFactory
) -> None:
    server.enqueue(Stream.recording("tool_calls"))

    chunks = await collect(make_model(), user_request(tools=[WEATHER_TOOL]))

    assert chunks == [
        ToolCallDelta(0, "call_8f2kQ1", "get_weather", ""),
        ToolCallDelta(0, None, None, '{"'),
        ToolCallDelta(0, None, None, "city"),
        ToolCallDelta(0, None, None, '":"'),
        ToolCallDelta(0, None, None, "Z"),
        ToolCallDelta(0, None, None, "ürich"),
        ToolCallDelta(0, None, None, '"}'),
        ToolCallDelta(1, "call_3Hq9xZ", "get_time", ""),
        ToolCallDelta(1, None, None, '{"time'),
        ToolCallDelta(1, None, None, 'zone":"'),
        ToolCallDelta(1, None, None, "Europe"),
        ToolCallDelta(1, None, None, "/Zurich"),
        ToolCallDelta(1, None, None, '"}'),
        Finish("tool_calls", Usage(prompt_tokens=96, completion_tokens=41)),
    ]
    turn = assemble(chunks)
    assert turn.tool_calls() == [
        ToolCall("call_8f2kQ1", "get_weather", '{"city":"Zürich"}'),
        ToolCall("call_3Hq9xZ", "get_time", '{"timezone":"Europe/Zurich"}'),
    ]
    assert (turn.text, turn.finish_reason) == ("", "tool_calls")


async def test_connection_close_framing_is_read_to_the_end(
    server: ChatServer, make_model: ModelFactory
) -> None:
    server.enqueue(Stream.recording("content", framing="close"))

    chunks = await collect(make_model(), user_request())

    assert assemble(chunks).text == "".join(CONTENT_TEXT)
    assert chunks[-1] == Finish("stop", Usage(prompt_tokens=24, completion_tokens=10))


async def test_finish_reason_without_done_ends_the_stream_normally(
    server: ChatServer, make_model: ModelFactory
) -> None:
    frames = content_frames(["Hi"], usage={"prompt_tokens": 3, "completion_tokens": 1})
    assert frames[-1] == DONE
    server.enqueue(Stream(frames[:-1], framing="close"))

    chunks = await collect(make_model(), user_request())

    assert chunks == [ContentDelta("Hi"), Finish("stop", Usage(prompt_tokens=3, completion_tokens=1))]


async def test_azure_chunks_with_prompt_filter_results_and_no_choices_are_skipped(
    server: ChatServer, make_model: ModelFactory
) -> None:
    server.enqueue(Stream.recording("azure_content"))
    model = make_model(base_url=server.url, flavour="azure", azure_deployment="gpt4o-prod",
                       azure_api_version="2024-10-21")

    chunks = await collect(model, user_request())

    assert chunks == [ContentDelta("Hallo"), ContentDelta(" aus"), ContentDelta(" Azure"), ContentDelta("."),
                      Finish("stop", Usage(prompt_tokens=12, completion_tokens=4))]
    sent = server.requests[0]
    assert (sent.method, sent.path) == ("POST", "/openai/deployments/gpt4o-prod/chat/completions"
                                                "?api-version=2024-10-21")
    assert sent.headers["api-key"] == KEY
    assert "authorization" not in sent.headers


async def test_a_consumer_may_stop_early_and_the_model_stays_usable(
    server: ChatServer, make_model: ModelFactory
) -> None:
    server.enqueue(Stream.recording("content"), Stream.recording("content"))
    model = make_model()

    async with aclosing(model.stream(user_request())) as chunks:
        first = await anext(chunks)
    second_run = await collect(model, user_request())

    assert first == ContentDelta("The")
    assert assemble(second_run).text == "".join(CONTENT_TEXT)
    assert len(server.requests) == 2


# --- the request sent ------------------------------------------------------------------------


async def test_sends_the_exact_body_and_headers_of_a_plain_request(
    server: ChatServer, make_model: ModelFactory
) -> None:
    server.enqueue(Stream.recording("content"))
    model = make_model(extra_headers={"x-dwp-source": "AURA"})

    await collect(model, user_request(trace_headers={"traceparent": TRACEPARENT}))

    sent = server.requests[0]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.body == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "You are Aura."}, {"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
    }
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["accept"] == "text/event-stream"
    assert sent.headers["traceparent"] == TRACEPARENT
    assert sent.headers["x-dwp-source"] == "AURA"
    assert "api-key" not in sent.headers


async def test_sends_tools_and_converts_tool_calls_and_tool_results(
    server: ChatServer, make_model: ModelFactory
) -> None:
    server.enqueue(Stream.recording("content"))

    await collect(make_model(), ChatRequest(TOOL_HISTORY, Purpose.STEP, tools=[WEATHER_TOOL]))

    body = server.requests[0].body
    assert body["messages"] == [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Zürich"}'}},
        ]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"},
    ]
    assert body["tools"] == [WEATHER_TOOL]
    assert body["tool_choice"] == "auto"
    assert "response_format" not in body


async def test_json_output_asks_for_a_json_object_and_settings_shape_the_body(
    server: ChatServer, make_model: ModelFactory
) -> None:
    server.enqueue(Stream.recording("content"))
    model = make_model(api_key=None, flavour="ollama", temperature=None, max_tokens=512, include_usage=False)

    await collect(model, user_request(json_output=True))

    sent = server.requests[0]
    assert sent.body == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "You are Aura."}, {"role": "user", "content": PROMPT}],
        "stream": True,
        "max_tokens": 512,
        "response_format": {"type": "json_object"},
    }
    assert "authorization" not in sent.headers


# --- retries ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "value", "delay"), [("retry-after", "3", 3.0),
                                                         ("retry-after-ms", "250", 0.25)])
async def test_rate_limit_then_success_waits_as_told_and_retries_once(
    server: ChatServer, make_model: ModelFactory, sleep: RecordingSleep, header: str, value: str, delay: float
) -> None:
    server.enqueue(Reply.error(429, "Rate limit reached", "rate_limit_exceeded", headers={header: value}),
                   Stream.recording("content"))

    chunks = await collect(make_model(), user_request())

    assert assemble(chunks).text == "".join(CONTENT_TEXT)
    assert sleep.delays == [delay]
    assert len(server.requests) == 2
    assert server.requests[1].body == server.requests[0].body


async def test_retry_after_beyond_the_backoff_cap_gives_up_at_once(
    server: ChatServer, make_model: ModelFactory, sleep: RecordingSleep
) -> None:
    server.enqueue(Reply.rate_limited(retry_after="30"), Stream.recording("content"))

    received, error = await collect_until_error(make_model(), user_request())

    assert (received, error.code, error.message) == ([], "llm_unavailable",
                                                     "The model is rate limited (HTTP 429).")
    assert sleep.delays == []
    assert len(server.requests) == 1


async def test_server_errors_are_retried_max_retries_times_with_exponential_backoff(
    server: ChatServer, make_model: ModelFactory, sleep: RecordingSleep
) -> None:
    server.enqueue(*(Reply.error(500, "The server had an error") for _ in range(3)),
                   Stream.recording("content"))

    received, error = await collect_until_error(make_model(), user_request())

    assert (received, error.code, error.message) == ([], "llm_unavailable", "The model is unavailable (HTTP 500).")
    assert sleep.delays == [0.5, 1.0]
    assert len(server.requests) == 3


async def test_backoff_is_capped(server: ChatServer, make_model: ModelFactory, sleep: RecordingSleep) -> None:
    server.enqueue(*(Reply.error(503, "Service unavailable") for _ in range(5)))

    _, error = await collect_until_error(make_model(max_retries=4, backoff_base_seconds=1.0,
                                                    backoff_max_seconds=3.0), user_request())

    assert error.code == "llm_unavailable"
    assert sleep.delays == [1.0, 2.0, 3.0, 3.0]


async def test_unreachable_server_is_retried_then_unavailable(
    make_model: ModelFactory, sleep: RecordingSleep
) -> None:
    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    _, error = await collect_until_error(make_model(base_url=f"http://127.0.0.1:{port}/v1"), user_request())

    assert (error.code, error.message) == ("llm_unavailable", "The model could not be reached.")
    assert sleep.delays == [0.5, 1.0]


async def test_cut_after_the_first_content_chunk_fails_without_retry(
    server: ChatServer, make_model: ModelFactory, sleep: RecordingSleep
) -> None:
    # Frame 1 only opens the assistant message; frame 2 carries the first text the caller sees.
    server.enqueue(Stream.recording("content", cut_after=2), Stream.recording("content"))

    received, error = await collect_until_error(make_model(), user_request())

    assert received == [ContentDelta("The")]
    assert (error.code, error.message) == ("llm_unavailable", "The model's answer stream was cut off.")
    assert sleep.delays == []
    assert len(server.requests) == 1


async def test_a_stream_that_ends_before_any_delta_is_retried(
    server: ChatServer, make_model: ModelFactory, sleep: RecordingSleep
) -> None:
    server.enqueue(Stream.recording("content", framing="close", cut_after=1), Stream.recording("content"))

    chunks = await collect(make_model(), user_request())

    assert assemble(chunks).text == "".join(CONTENT_TEXT)
    assert sleep.delays == [0.5]
    assert len(server.requests) == 2


async def test_an_error_chunk_after_the_first_delta_is_unavailable_without_retry(
    server: ChatServer, make_model: ModelFactory, sleep: RecordingSleep
) -> None:
    frames = content_frames(["Hel"])[:2]
    frames.append(data_frame({"error": {"message": "The server had an error", "type": "server_error"}}))
    server.enqueue(Stream(frames), Stream.recording("content"))

    received, error = await collect_until_error(make_model(), user_request())

    assert received == [ContentDelta("Hel")]
    assert (error.code, error.message) == ("llm_unavailable", "The model failed while answering.")
    assert len(server.requests) == 1


# --- bad responses ---------------------------------------------------------------------------


async def test_malformed_json_is_a_bad_response_and_not_retried(
    server: ChatServer, make_model: ModelFactory, sleep: RecordingSleep
) -> None:
    frames = content_frames(["Hel"])[:2]
    frames.append('data: {"id":"chatcmpl-x","choices":[{"index":0,"delta":{"content":"lo\n\n')
    server.enqueue(Stream(frames), Stream.recording("content"))

    received, error = await collect_until_error(make_model(), user_request())

    assert received == [ContentDelta("Hel")]
    assert (error.code, error.message, error.retryable) == (
        "llm_bad_response", "The model sent a malformed stream chunk.", False)
    assert len(server.requests) == 1


@pytest.mark.parametrize("payload", [
    "[1, 2]",
    '{"choices": "none"}',
    '{"choices": [{"index": 0, "delta": {"content": 5}}]}',
    '{"choices": [{"index": 0, "delta": "text"}]}',
    '{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": "0", "function": {"name": "f"}}]}}]}',
    '{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": {}}}]}}]}',
    '{"choices": [], "usage": {"prompt_tokens": "many"}}',
])
async def test_chunks_of_an_unexpected_shape_are_bad_responses(
    server: ChatServer, make_model: ModelFactory, payload: str
) -> None:
    server.enqueue(Stream([data_frame(payload), DONE]))

    _, error = await collect_until_error(make_model(), user_request())

    assert error.code == "llm_bad_response"
    assert len(server.requests) == 1


async def test_a_prompt_beyond_the_window_is_a_context_overflow_not_a_generic_rejection(
    server: ChatServer, make_model: ModelFactory, sleep: RecordingSleep
) -> None:
    server.enqueue(Reply.error(400, f"Your messages resulted in too many tokens: {PROMPT}", "context_length_exceeded",
                               "invalid_request_error"))
    _, error = await collect_until_error(make_model(), user_request())
    assert (error.code, error.retryable) == ("context_overflow", False)
    assert error.message == ("The request is larger than the model's context window; set "
                             "AURA_MODEL__CONTEXT_WINDOW to the model's real window.")
    assert PROMPT not in str(error) and sleep.delays == []


@pytest.mark.parametrize(("reply", "message"), [
    (Reply.error(404, "The model `gpt-9` does not exist", "model_not_found", "invalid_request_error"),
     "The model rejected the request (HTTP 404, model_not_found)."),
    (Reply(422, f"unprocessable: {PROMPT}"), "The model rejected the request (HTTP 422)."),
])
async def test_rejected_requests_are_bad_responses_with_safe_messages(
    server: ChatServer, make_model: ModelFactory, sleep: RecordingSleep, reply: Reply, message: str
) -> None:
    server.enqueue(reply)

    _, error = await collect_until_error(make_model(), user_request())

    assert (error.code, error.message, error.retryable) == ("llm_bad_response", message, False)
    assert PROMPT not in str(error)
    assert sleep.delays == []


async def test_a_json_answer_instead_of_an_event_stream_is_a_bad_response(
    server: ChatServer, make_model: ModelFactory
) -> None:
    server.enqueue(Reply(200, {"id": "chatcmpl-x", "object": "chat.completion", "choices": []}))

    _, error = await collect_until_error(make_model(), user_request())

    assert (error.code, error.message) == ("llm_bad_response", "The model did not answer with an event stream.")


# --- timeouts and credentials ----------------------------------------------------------------


@pytest.mark.parametrize(("stall_after", "expected"), [(0, []), (2, [ContentDelta("The")])])
async def test_silence_longer_than_the_read_timeout_is_a_retryable_timeout(
    server: ChatServer, make_model: ModelFactory, sleep: RecordingSleep,
    stall_after: int, expected: list[ModelChunk],
) -> None:
    server.enqueue(Stream.recording("content", stall_after=stall_after), Stream.recording("content"))

    received, error = await collect_until_error(make_model(timeout_seconds=0.05), user_request())

    assert received == expected
    assert (error.code, error.message, error.retryable) == (
        "llm_timeout", "The model did not answer in time.", True)
    assert len(server.requests) == 1


async def test_refused_credentials_are_unavailable_and_never_echo_the_key(
    server: ChatServer, make_model: ModelFactory, sleep: RecordingSleep
) -> None:
    server.enqueue(Reply.error(401, f"Incorrect API key provided: {KEY}.", "invalid_api_key",
                               "invalid_request_error"))

    _, error = await collect_until_error(make_model(), user_request())

    assert (error.code, error.message, error.retryable) == (
        "llm_unavailable", "The model provider refused the credentials (HTTP 401).", False)
    assert KEY not in str(error)
    assert KEY not in repr(error)
    assert sleep.delays == []


def test_the_config_repr_hides_the_key_and_extra_header_values() -> None:
    config = model_config(base_url="https://api.openai.com/v1", model="gpt-4o-mini", api_key=KEY,
                                    extra_headers={"x-proxy-auth": "proxy-secret"})

    shown = repr(config)

    assert KEY not in shown
    assert "proxy-secret" not in shown
    assert "api_key='***'" in shown
    assert "extra_headers={'x-proxy-auth': '***'}" in shown


def test_the_azure_flavour_needs_a_deployment_and_an_api_version() -> None:
    with pytest.raises(ValueError, match="azure_deployment and azure_api_version"):
        model_config(base_url="https://x.openai.azure.com", model="gpt-4o", flavour="azure")


async def test_logs_never_contain_the_key_or_the_prompt(
    server: ChatServer, make_model: ModelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server.enqueue(Reply.rate_limited(retry_after="1"), Stream.recording("content"))
    caplog.set_level(logging.DEBUG)

    await collect(make_model(), user_request())

    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "status=429" in logged
    assert KEY not in logged
    assert PROMPT not in logged


# --- what a real model needs: budgets, schemas, forced tools, reasoning ------------------------

PLAN_SCHEMA = {"type": "object", "properties": {"steps": {"type": "array", "items": {
    "type": "object", "properties": {"description": {"type": "string", "minLength": 1, "maxLength": 200}}}}},
    "required": ["steps"]}


@pytest.mark.parametrize(("flavour", "budget_field", "response_format"), [
    ("openai", "max_completion_tokens",
     {"type": "json_schema", "json_schema": {"name": "aura_output", "schema": PLAN_SCHEMA, "strict": False}}),
    ("vllm", "max_tokens",
     {"type": "json_schema", "json_schema": {"name": "aura_output", "schema": PLAN_SCHEMA, "strict": False}}),
    ("ollama", "max_tokens",
     {"type": "json_schema", "json_schema": {"name": "aura_output", "schema": PLAN_SCHEMA, "strict": False}}),
    # llama.cpp: its own form, without the bounds its grammar compiler unrolls (a maxLength of 200
    # killed llama-cpp-python's server)
    ("llamacpp", "max_tokens", {"type": "json_object", "schema": {
        "type": "object", "properties": {"steps": {"type": "array", "items": {
            "type": "object", "properties": {"description": {"type": "string"}}}}}, "required": ["steps"]}}),
])
async def test_a_plan_request_carries_its_budget_and_schema_in_each_servers_form(
    server: ChatServer, make_model: ModelFactory, flavour: str, budget_field: str, response_format: dict[str, Any]
) -> None:
    server.enqueue(Stream.recording("content"))
    await collect(make_model(flavour=flavour), user_request(json_output=True, json_schema=PLAN_SCHEMA, max_tokens=300))
    body = server.requests[0].body
    assert body[budget_field] == 300 and ({"max_tokens", "max_completion_tokens"} - {budget_field}).isdisjoint(body)
    assert body["response_format"] == response_format


async def test_a_forced_tool_is_named_in_tool_choice_and_llamacpp_gets_unbounded_parameters(
    server: ChatServer, make_model: ModelFactory
) -> None:
    bounded = {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 1024, "pattern": "^[A-Z]"}}}}}
    server.enqueue(Stream.recording("content"), Stream.recording("content"))
    await collect(make_model(), user_request(tools=[bounded], tool_choice="get_weather"))
    await collect(make_model(flavour="llamacpp"), user_request(tools=[bounded], tool_choice="get_weather"))
    openai_body, llama_body = server.requests[0].body, server.requests[1].body
    assert openai_body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert openai_body["tools"] == [bounded]
    assert llama_body["tools"][0]["function"]["parameters"] == {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}


async def test_llamacpp_gets_plain_turns_its_chat_templates_can_show_the_model(
    server: ChatServer, make_model: ModelFactory
) -> None:
    server.enqueue(Stream.recording("content"))
    await collect(make_model(flavour="llamacpp"),
                  ChatRequest([ChatMessage(Role.SYSTEM, "You are Aura."), *TOOL_HISTORY], Purpose.STEP))
    assert server.requests[0].body["messages"] == [
        {"role": "user", "content": f"You are Aura.\n\n{PROMPT}"},
        {"role": "assistant", "content": 'I call get_weather with {"city":"Zürich"}.'},
        {"role": "user", "content": 'Result of the tool get_weather:\n{"temp": 21}'},
    ]


async def test_reasoning_deltas_and_a_tool_name_repeated_in_every_delta(
    server: ChatServer, make_model: ModelFactory
) -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return data_frame({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    call = {"index": 0, "id": "call_0", "type": "function", "function": {"name": "get_weather"}}
    server.enqueue(Stream([
        chunk({"role": "assistant", "reasoning_content": "Thinking about "}),
        chunk({"reasoning": "the city."}),
        # llama-cpp-python's server: the whole name again in every delta of the call
        chunk({"tool_calls": [{**call, "function": {"name": "get_weather", "arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{**call, "function": {"name": "get_weather", "arguments": '"Zürich"}'}}]}),
        chunk({}, "tool_calls"), DONE]))
    chunks = await collect(make_model(flavour="llamacpp"), user_request())
    assert [c.text for c in chunks if isinstance(c, ReasoningDelta)] == ["Thinking about ", "the city."]
    assert assemble(chunks).tool_calls() == [ToolCall("call_0", "get_weather", '{"city":"Zürich"}')]
