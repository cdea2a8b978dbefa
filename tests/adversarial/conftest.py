"""Fixtures of the adversarial suite: a dedicated redis-server per test (faults stop and restart it),
and a raw SSE reader that keeps the exact bytes and parses them strictly."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import e2e_workspace, start_aura  # noqa: F401  (re-exported fixtures)
from tests.redis_server import RedisServer, start_redis_server, stop_redis_server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """A redis-server of this test alone, in a one-item list so a restart can replace it."""
    holder = [start_redis_server(tmp_path)]
    yield holder
    if holder[0].process.poll() is None:
        stop_redis_server(holder[0])


def envelopes(body: str) -> list[dict[str, Any]]:
    out = []
    for block in body.split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data and data[0] != "[DONE]":
            out.append(json.loads("\n".join(data)))
    return out


class RawStream:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.body = ""
        self._chunks = response.aiter_text().__aiter__()

    async def until(self, needle: str, timeout: float) -> str:  # noqa: ASYNC109
        """Read until `needle` is in the body; fails after `timeout` seconds."""
        async def read() -> None:
            while needle not in self.body:
                try:
                    self.body += await self._chunks.__anext__()
                except StopAsyncIteration:
                    raise AssertionError(f"stream ended before {needle!r}:\n{self.body}") from None
        await asyncio.wait_for(read(), timeout)
        return self.body

    async def done(self, timeout: float) -> list[dict[str, Any]]:  # noqa: ASYNC109
        await self.until("data: [DONE]\n\n", timeout)
        assert self.body.endswith("data: [DONE]\n\n")
        return envelopes(self.body)

    @property
    def events(self) -> list[dict[str, Any]]:
        return envelopes(self.body)


@asynccontextmanager
async def raw_stream(client: httpx.AsyncClient, body: dict[str, Any],
                     headers: dict[str, str]) -> AsyncIterator[RawStream]:
    async with client.stream("POST", "/aura/test/stream", json=body, headers=headers) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        yield RawStream(response)
