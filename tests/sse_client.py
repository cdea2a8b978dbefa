"""An SSE reader over real HTTP (httpx + httpx-sse), for end-to-end tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from httpx_sse import EventSource, aconnect_sse

from tests.support import check_event


class RunReader:
    def __init__(self, source: EventSource) -> None:
        self.source = source
        self.response = source.response
        self.events: list[dict[str, Any]] = []
        self.done = False
        self._iterator = source.aiter_sse().__aiter__()

    async def next(self) -> dict[str, Any] | None:
        """The next event envelope; None after [DONE]."""
        sse = await self._iterator.__anext__()
        if sse.data == "[DONE]":
            self.done = True
            return None
        envelope: dict[str, Any] = json.loads(sse.data)
        assert sse.id == f"{envelope['runId']}:{envelope['seq']}" and sse.event == envelope["type"]
        check_event(envelope)
        self.events.append(envelope)
        return envelope

    async def until(self, event_type: str) -> dict[str, Any]:
        while True:
            envelope = await self.next()
            assert envelope is not None, f"[DONE] before {event_type}"
            if envelope["type"] == event_type:
                return envelope

    async def rest(self) -> list[dict[str, Any]]:
        while await self.next() is not None:
            pass
        return self.events


@asynccontextmanager
async def open_run(client: httpx.AsyncClient, body: dict[str, Any],
                   headers: dict[str, str]) -> AsyncIterator[RunReader]:
    async with aconnect_sse(client, "POST", "/aura/test/stream", json=body, headers=headers) as source:
        if source.response.status_code != 200:
            await source.response.aread()
            raise AssertionError(f"HTTP {source.response.status_code}: {source.response.text}")
        yield RunReader(source)
