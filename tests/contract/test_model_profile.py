"""The model profile against the endpoints servers really have: the context window each reports
(or not), the tokenizer endpoints of llama-cpp-python, llama-server and vLLM, tiktoken, and the
safe estimate whenever none of them answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from adapters.models.profile import ServerModelProfile
from domain.model.chat import estimate_tokens
from tests.defaults import DEFAULTS, model_config

Handler = Callable[[httpx.Request], httpx.Response]


def profile(flavour: str, handler: Handler, **options: Any) -> ServerModelProfile:
    azure = {"azure_deployment": "d", "azure_api_version": "2024-10-21"} if flavour == "azure" else {}
    config = model_config(model="m", flavour=flavour, **azure)
    settings = {"context_window": DEFAULTS.model.context_window,
                "default_context_window": DEFAULTS.model.default_context_window, "tokenizer": DEFAULTS.model.tokenizer}
    return ServerModelProfile(config, httpx.AsyncClient(transport=httpx.MockTransport(handler)), **(settings | options))


def json_reply(payload: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=payload)


async def test_the_setting_wins_and_the_server_is_not_asked() -> None:
    asked: list[str] = []
    window = await profile("llamacpp", lambda r: asked.append(r.url.path) or json_reply({}),
                           context_window=8192).context_window()
    assert window == 8192 and asked == []


async def test_llama_server_reports_n_ctx_on_props() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/props"
        return json_reply({"default_generation_settings": {"n_ctx": 16384}})

    assert await profile("llamacpp", handler).context_window() == 16384


async def test_vllm_reports_max_model_len_of_the_served_model() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/models"
        return json_reply({"data": [{"id": "other", "max_model_len": 1}, {"id": "m", "max_model_len": 32768}]})

    assert await profile("vllm", handler).context_window() == 32768


@pytest.mark.parametrize("flavour", ["llamacpp", "vllm"])
async def test_a_server_that_reports_nothing_gets_the_conservative_default(flavour: str) -> None:
    # llama-cpp-python's server has no /props and lists models without a length
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return json_reply({"object": "list", "data": [{"id": "m", "object": "model"}]})
        return json_reply({"detail": "Not Found"}, 404)

    assert await profile(flavour, handler, default_context_window=4096).context_window() == 4096


@pytest.mark.parametrize("flavour", ["openai", "ollama", "azure"])
async def test_openai_azure_and_ollama_are_never_asked_for_a_window(flavour: str) -> None:
    asked: list[str] = []
    p = profile(flavour, lambda r: asked.append(r.url.path) or json_reply({}), default_context_window=5000)
    assert await p.context_window() == 5000 and asked == []


async def test_llama_cpp_python_counts_with_its_extras_endpoint_once_per_text() -> None:
    asked: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append((request.url.path, json.loads(request.content)))
        return json_reply({"count": len(json.loads(request.content)["input"].split())})

    p = profile("llamacpp", handler)
    assert await p.count_tokens(["one two three", "four"]) == [3, 1]
    assert await p.count_tokens(["one two three"]) == [3]  # cached
    assert sorted(json.dumps(a) for a in asked) == [json.dumps(["/extras/tokenize/count", {"input": "four"}]),
                                                    json.dumps(["/extras/tokenize/count", {"input": "one two three"}])]


async def test_llama_server_counts_the_tokens_its_tokenize_endpoint_returns() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/tokenize":
            return json_reply({"tokens": [1, 2, 3, 4]})
        return json_reply({"detail": "Not Found"}, 404)

    assert await profile("llamacpp", handler).count_tokens(["anything"]) == [4]


async def test_a_tokenizer_that_fails_gives_way_to_the_safe_estimate_and_is_not_asked_again_at_once() -> None:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return json_reply({"error": "boom"}, 500)

    p = profile("vllm", handler)
    text = "ü" * 30
    assert await p.count_tokens([text]) == [estimate_tokens(text)] == [20]
    assert await p.count_tokens(["more text"]) == [estimate_tokens("more text")]
    assert asked == ["/extras/tokenize/count", "/tokenize"]


async def test_tiktoken_counts_openai_models_and_an_encoding_that_cannot_load_means_estimates() -> None:
    import tiktoken

    # a real tiktoken Encoding (one token a byte) stands in for o200k_base, whose file this
    # machine cannot download
    byte_encoding = tiktoken.Encoding("bytes", pat_str=r".", mergeable_ranks={bytes([b]): b for b in range(256)},
                                      special_tokens={})
    loaded: list[str] = []
    p = profile("openai", lambda r: json_reply({}), tiktoken_loader=lambda model: loaded.append(model) or byte_encoding)
    assert await p.count_tokens(["héllo"]) == [6] and loaded == ["m"]

    def offline(model: str) -> Any:
        raise OSError("no network")

    q = profile("azure", lambda r: json_reply({}), tiktoken_loader=offline)
    assert await q.count_tokens(["a" * 30, "b" * 3]) == [10, 1]
