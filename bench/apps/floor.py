"""The framework floor: bare Quart routes on hypercorn, no auth, no validation, no event log.

- POST /stream {"events": N, "size": S}: N pre-encoded frames like Aura's, then [DONE]
  (the floor for cost per event and time to first event).
- GET /idle: one `ready` event, then a comment heartbeat every HEARTBEAT seconds until the client
  leaves (the floor for memory per parked stream).
- GET /wait/<id>: `ready` once the wait is registered, then `running` when POST /approve/<id> on
  any instance published to Redis (the floor for approval latency: a bare Quart POST -> a waiting
  coroutine over Redis Pub/Sub, one pattern subscription per process).
- POST /wait/<id> {"before": N, "after": M, "size": S}: the same wait, writing the frames Aura's
  approved run writes: N - 1 frames then `ready`, and after the decision `running` then M - 1
  frames, each S bytes (the floor for CPU per approval: the same wire work without Aura's).

Run: python -m bench.apps.floor --port P [--redis URL] [--heartbeat S]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import orjson
from quart import Quart, Response, request

from bench.apps.frames import frame_bytes, new_run_id, pad_for

app = Quart("floor")
HEARTBEAT_SECONDS = float(os.environ.get("BENCH_FLOOR_HEARTBEAT", "5"))
HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
           "X-Accel-Buffering": "no", "Connection": "keep-alive"}
DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"

_waiters: dict[str, asyncio.Future[bytes]] = {}
_redis: Any = None
_reader: asyncio.Task[None] | None = None


def _sse(frames: AsyncIterator[bytes]) -> Response:
    response = Response(frames, status=200, headers=HEADERS)
    response.timeout = None
    return response


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/stream")
async def stream() -> Response:
    body = orjson.loads(await request.get_data())
    count, size = int(body["events"]), int(body["size"])
    run_id = new_run_id()
    content = "x" * pad_for(size, run_id)

    async def frames() -> AsyncIterator[bytes]:
        for seq in range(1, count + 1):
            yield frame_bytes(seq, run_id, content)
            await asyncio.sleep(0)
        yield DONE

    return _sse(frames())


@app.get("/idle")
async def idle() -> Response:
    async def frames() -> AsyncIterator[bytes]:
        yield b"event: ready\ndata: {}\n\n"
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            yield PING

    return _sse(frames())


@app.route("/wait/<wait_id>", methods=["GET", "POST"])
async def wait(wait_id: str) -> Response:
    future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    _waiters[wait_id] = future
    before = after = 1
    run_id = content = ""
    if request.method == "POST":
        body = orjson.loads(await request.get_data())
        before, after, size = int(body["before"]), int(body["after"]), int(body["size"])
        run_id = new_run_id()
        content = "x" * pad_for(size, run_id)

    async def frames() -> AsyncIterator[bytes]:
        try:
            for seq in range(1, before):
                yield frame_bytes(seq, run_id, content)
                await asyncio.sleep(0)
            yield b"event: ready\ndata: {\"id\": \"%s\"}\n\n" % wait_id.encode()
            while True:
                try:
                    payload = await asyncio.wait_for(asyncio.shield(future), HEARTBEAT_SECONDS)
                    break
                except TimeoutError:
                    yield PING
            yield b"event: tool_execution\ndata: " + payload + b"\n\n"
            for seq in range(before + 1, before + after):
                yield frame_bytes(seq, run_id, content)
                await asyncio.sleep(0)
            yield DONE
        finally:
            _waiters.pop(wait_id, None)

    return _sse(frames())


@app.post("/approve/<wait_id>")
async def approve(wait_id: str) -> dict[str, Any]:
    payload = orjson.dumps({"type": "approval", "requestId": wait_id, "status": "running"})
    receivers = await _redis.publish(f"floor:channel:{wait_id}", payload)
    return {"requestId": wait_id, "receivers": receivers}


async def _read_signals(pubsub: Any) -> None:
    async for message in pubsub.listen():
        if message.get("type") != "pmessage":
            continue
        channel = message["channel"]
        wait_id = (channel.decode() if isinstance(channel, bytes) else channel).rsplit(":", 1)[1]
        future = _waiters.get(wait_id)
        if future is not None and not future.done():
            future.set_result(message["data"])


@app.before_serving
async def _start() -> None:
    global _redis, _reader
    url = os.environ.get("BENCH_FLOOR_REDIS")
    if url:
        from redis.asyncio import Redis

        _redis = Redis.from_url(url)
        pubsub = _redis.pubsub()
        await pubsub.psubscribe("floor:channel:*")
        _reader = asyncio.create_task(_read_signals(pubsub))


async def _serve(port: int) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.keep_alive_timeout = 75
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(app, config, shutdown_trigger=stop.wait)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(_serve(args.port))


if __name__ == "__main__":
    main()
