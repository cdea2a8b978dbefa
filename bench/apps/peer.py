"""The peer: a minimal Starlette + sse-starlette app, served by uvicorn.

POST /stream {"events": N, "size": S} streams N `content` events of about S bytes each (the same
envelope shape and framing as Aura's), then `data: [DONE]`. Like Aura it has a heartbeat and a
send timeout, and it yields to the event loop between events as any real async source does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.apps.frames import envelope, new_run_id, pad_for

HEARTBEAT_SECONDS = 5.0
SEND_TIMEOUT_SECONDS = 30.0


async def stream(request: Request) -> EventSourceResponse:
    body = await request.json()
    count, size = int(body["events"]), int(body["size"])
    run_id = new_run_id()
    content = "x" * pad_for(size, run_id)

    async def events() -> AsyncIterator[ServerSentEvent]:
        for seq in range(1, count + 1):
            data = orjson.dumps(envelope(seq, run_id, content)).decode()
            yield ServerSentEvent(data=data, event="content", id=str(seq), sep="\n")
            await asyncio.sleep(0)
        yield ServerSentEvent(data="[DONE]", sep="\n")

    return EventSourceResponse(events(), ping=HEARTBEAT_SECONDS, sep="\n", send_timeout=SEND_TIMEOUT_SECONDS,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/stream", stream, methods=["POST"]), Route("/health", health)])
