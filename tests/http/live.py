"""Reading a live SSE response through Quart's test client while the test acts on the service."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from quart import Quart
from quart.testing.connections import TestHTTPConnection

from tests.support import bearer, events_of, parse_sse

STREAM = "/aura/test/stream"
# How long an empty chunk may be followed by more before the response counts as ended.
END_GRACE_SECONDS = 5.0


class LiveStream:
    """Reads an SSE response frame by frame while the test acts on the service."""

    def __init__(self, connection: TestHTTPConnection) -> None:
        self.connection = connection
        self.buffer = ""
        self.body = ""

    async def until(self, event_type: str) -> dict[str, Any]:
        while True:
            while "\n\n" in self.buffer:
                frame, self.buffer = self.buffer.split("\n\n", 1)
                self.body += frame + "\n\n"
                if f"event: {event_type}\n" in frame + "\n":
                    data = "\n".join(line[6:] for line in frame.split("\n") if line.startswith("data: "))
                    payload: dict[str, Any] = json.loads(data)
                    return payload
            chunk = await self._chunk()
            assert chunk, f"stream ended before {event_type}"
            self.buffer += chunk.decode()

    async def _chunk(self) -> bytes:
        """The next non-empty body chunk, or b"" once the response ended. The test client hands on
        every body message, and Aura sends an empty one when its run starts waiting for a human
        (adapters/http/streams.py), so an empty chunk is the end only if nothing follows it."""
        chunk = await self.connection.receive()
        while not chunk:
            try:
                chunk = await asyncio.wait_for(self.connection.receive(), END_GRACE_SECONDS)
            except TimeoutError:
                return b""
        return chunk

    async def rest(self) -> list[dict[str, Any]]:
        while not self.buffer.endswith("data: [DONE]\n\n"):
            chunk = await self._chunk()
            assert chunk, "stream ended without [DONE]"
            self.buffer += chunk.decode()
        self.body += self.buffer
        return events_of(parse_sse(self.body))


async def open_stream(app: Quart, prompt: str, headers: dict[str, str] | None = None) -> tuple[Any, LiveStream]:
    """Open POST /aura/test/stream; the caller must `await context.__aexit__(None, None, None)`."""
    context = app.test_client().request(STREAM, method="POST",
                                        headers={**bearer(), "Content-Type": "application/json", **(headers or {})})
    connection = await context.__aenter__()
    await connection.send(json.dumps({"prompt": prompt}).encode())
    await connection.send_complete()
    return context, LiveStream(connection)
