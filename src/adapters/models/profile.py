"""The `ModelProfile` port for an OpenAI-compatible server: its context window and token counts.

The window is the configured one (`AURA_MODEL__CONTEXT_WINDOW`), else what the server reports —
vLLM's `max_model_len` on `GET /v1/models`, llama-server's `n_ctx` on `GET /props` — else a
conservative default. OpenAI, Azure, Ollama and llama-cpp-python's server report none (Ollama's
`/api/show` gives the model's trained length, not the `num_ctx` it really runs with).

Token counts come from tiktoken for OpenAI and Azure models, from the server's own tokenizer for
llama.cpp (llama-server `POST /tokenize`, llama-cpp-python `POST /extras/tokenize/count`) and vLLM
(`POST /tokenize`), and otherwise — or when those fail — from a safe over-estimate. Counts are
cached by text, so a conversation's messages are counted once, not on every call.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import httpx

from adapters.models.openai_compatible import OpenAICompatibleConfig
from domain.model.chat import ModelProfile, estimate_tokens

logger = logging.getLogger(__name__)

Tokenizer = Literal["auto", "tiktoken", "server", "estimate"]
CACHE_ENTRIES = 4096
PARALLEL_COUNTS = 8
RETRY_SERVER_TOKENIZER_SECONDS = 60.0


def server_root(base_url: str) -> str:
    """The server's root URL: the OpenAI-compatible base without its `/v1`."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


class TiktokenCounter:
    """Counts with the model's tiktoken encoding. The encoding's file is loaded once, off the
    event loop (tiktoken fetches it on first use unless TIKTOKEN_CACHE_DIR holds it)."""

    def __init__(self, model: str, load: Callable[[str], Any] | None = None) -> None:
        self._model = model
        self._load = load or _load_tiktoken
        self._encoding: Any = None
        self._lock = asyncio.Lock()
        self._failed = False

    async def count(self, text: str) -> int:
        if self._encoding is None:
            if self._failed:
                raise LookupError("the tiktoken encoding could not be loaded")
            async with self._lock:
                if self._encoding is None and not self._failed:
                    try:
                        self._encoding = await asyncio.to_thread(self._load, self._model)
                    except Exception:
                        # once per process: no model call waits for a download that cannot succeed
                        self._failed = True
                        logger.warning("tiktoken's encoding for %s could not be loaded (offline? set "
                                       "TIKTOKEN_CACHE_DIR); token counts are estimated", self._model)
                        raise
            if self._encoding is None:
                raise LookupError("the tiktoken encoding could not be loaded")
        return len(self._encoding.encode(text, disallowed_special=()))


def _load_tiktoken(model: str) -> Any:
    import tiktoken

    try:
        return tiktoken.encoding_for_model(model)
    except KeyError:  # a model tiktoken does not know (an Azure deployment's own name, a new model)
        return tiktoken.get_encoding("o200k_base")


class ServerTokenCounter:
    """Counts with the model server's tokenizer, trying the endpoints of each server kind in turn
    and keeping the first that answers."""

    def __init__(self, config: OpenAICompatibleConfig, client: httpx.AsyncClient) -> None:
        self._config = config
        self._client = client
        root = server_root(config.base_url)
        self._endpoints: list[tuple[str, Callable[[str], dict[str, Any]], Callable[[Any], int]]] = [
            (f"{root}/extras/tokenize/count", lambda text: {"input": text}, lambda body: int(body["count"])),
            (f"{root}/tokenize", lambda text: {"content": text, "model": config.model, "prompt": text},
             _count_of_tokenize),
        ]
        self._chosen: int | None = None
        self._retry_at = 0.0

    async def count(self, text: str) -> int:
        if time.monotonic() < self._retry_at:
            raise LookupError("the model server's tokenizer did not answer recently")
        order = [self._chosen] if self._chosen is not None else range(len(self._endpoints))
        for index in order:
            url, body, read = self._endpoints[index]
            try:
                response = await self._client.post(url, json=body(text), headers=self._headers(), timeout=10.0)
                if response.status_code == 200:
                    count = read(response.json())
                    self._chosen = index
                    return count
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                continue
        # estimates for a while, rather than two failing requests for every text
        self._retry_at = time.monotonic() + RETRY_SERVER_TOKENIZER_SECONDS
        raise LookupError("the model server's tokenizer did not answer")

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._config.api_key}"} if self._config.api_key else {}


def _count_of_tokenize(body: Any) -> int:
    # llama-server answers {"tokens": [...]}, vLLM {"count": n, "tokens": [...]}
    if isinstance(body, dict) and isinstance(body.get("count"), int):
        return int(body["count"])
    return len(body["tokens"])


class ServerModelProfile(ModelProfile):
    def __init__(self, config: OpenAICompatibleConfig, client: httpx.AsyncClient, *,
                 context_window: int | None, default_context_window: int, tokenizer: Tokenizer,
                 tiktoken_loader: Callable[[str], Any] | None = None) -> None:
        self._config = config
        self._client = client
        self._configured = context_window
        self._default = default_context_window
        self._window: int | None = context_window
        self._window_lock = asyncio.Lock()
        if tokenizer == "auto":
            tokenizer = {"openai": "tiktoken", "azure": "tiktoken", "llamacpp": "server",
                         "vllm": "server"}.get(config.flavour, "estimate")  # type: ignore[assignment]
        self.tokenizer = tokenizer
        self._counter: Callable[[str], Awaitable[int]] | None = None
        if tokenizer == "tiktoken":
            self._counter = TiktokenCounter(config.model, tiktoken_loader).count
        elif tokenizer == "server":
            self._counter = ServerTokenCounter(config, client).count
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._limit = asyncio.Semaphore(PARALLEL_COUNTS)

    async def context_window(self) -> int:
        if self._window is None:
            async with self._window_lock:
                if self._window is None:
                    reported = await self._reported_window()
                    self._window = reported or self._default
                    logger.info("model context window: %d tokens (%s)", self._window,
                                "reported by the server" if reported else "default; set AURA_MODEL__CONTEXT_WINDOW")
        return self._window

    async def _reported_window(self) -> int | None:
        config = self._config
        headers = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        try:
            if config.flavour == "vllm":
                response = await self._client.get(f"{config.base_url.rstrip('/')}/models", headers=headers,
                                                  timeout=10.0)
                models = response.json().get("data", []) if response.status_code == 200 else []
                for model in models:
                    if isinstance(model, dict) and model.get("id") == config.model:
                        return _positive(model.get("max_model_len"))
                return _positive(models[0].get("max_model_len")) if len(models) == 1 else None
            if config.flavour == "llamacpp":
                response = await self._client.get(f"{server_root(config.base_url)}/props", headers=headers,
                                                  timeout=10.0)
                if response.status_code != 200:
                    return None
                props = response.json()
                settings = props.get("default_generation_settings") or {}
                return _positive(settings.get("n_ctx")) or _positive(props.get("n_ctx"))
        except (httpx.HTTPError, ValueError, AttributeError):
            logger.warning("could not read the model's context window from the server")
        return None

    async def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return list(await asyncio.gather(*(self._count(text) for text in texts)))

    async def _count(self, text: str) -> int:
        if self._counter is None or not text:
            return estimate_tokens(text)
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        try:
            async with self._limit:
                count = await self._counter(text)
        except Exception as exc:  # any tokenizer failure falls back to the safe estimate
            logger.warning("token count fell back to an estimate: %s", type(exc).__name__)
            return estimate_tokens(text)
        self._cache[key] = count
        if len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return count


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
