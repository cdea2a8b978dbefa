"""The send timeout: a write that does not complete within the timeout ends the response; any other
cancellation still propagates; writes that complete at once arm no timer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from adapters.http.asgi import SendTimeoutMiddleware

SCOPE = {"type": "http"}


async def receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


class StallingTransport:
    """Accepts `fast` writes at once, then never completes another one (a client that stopped reading)."""

    def __init__(self, fast: int) -> None:
        self.fast = fast
        self.sent: list[dict[str, Any]] = []
        self.stalled = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        if len(self.sent) >= self.fast:
            self.stalled.set()
            await asyncio.Event().wait()
        self.sent.append(message)


def streaming_app(chunks: int, finished: list[str]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(chunks):
                await send({"type": "http.response.body", "body": b"x", "more_body": True})
            finished.append("all sent")
        except BaseException as exc:
            finished.append(type(exc).__name__)
            raise
    return app


async def test_a_stalled_write_ends_the_response_within_the_timeout_and_a_quarter() -> None:
    transport, finished = StallingTransport(fast=5), []
    middleware = SendTimeoutMiddleware(streaming_app(100, finished), timeout_seconds=0.2)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(middleware(SCOPE, receive, transport.send), timeout=5)
    assert 0.2 <= loop.time() - began < 0.2 * 1.25 + 0.2  # cut between 1 and 1.25 timeouts (+ scheduling)
    assert len(transport.sent) == 5 and finished == ["SlowClient"]  # the middleware swallows it
    assert len(middleware._writing) == 0 and middleware._expired == set()


async def test_writes_that_complete_at_once_are_never_cut() -> None:
    transport, finished = StallingTransport(fast=10_000), []
    middleware = SendTimeoutMiddleware(streaming_app(1000, finished), timeout_seconds=0.05)
    await middleware(SCOPE, receive, transport.send)
    assert finished == ["all sent"] and len(transport.sent) == 1001


async def test_a_cancellation_from_elsewhere_is_not_mistaken_for_a_slow_client() -> None:
    transport, finished = StallingTransport(fast=2), []
    middleware = SendTimeoutMiddleware(streaming_app(10, finished), timeout_seconds=30)
    task = asyncio.create_task(middleware(SCOPE, receive, transport.send))
    await transport.stalled.wait()
    task.cancel()  # e.g. the client disconnected
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == ["CancelledError"] and len(middleware._writing) == 0
