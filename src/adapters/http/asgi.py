"""ASGI middleware of the HTTP adapter."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("aura.http")

ASGIApp = Any


class SlowClient(Exception):
    """The client did not take a response chunk within the send timeout."""


class SendTimeoutMiddleware:
    """Bounds every response write. hypercorn's `send` waits while the socket buffer is full, so a
    client that stops reading would otherwise pin its stream (and the run's memory) forever."""

    def __init__(self, app: ASGIApp, timeout_seconds: float) -> None:
        self.app = app
        self.timeout_seconds = timeout_seconds

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def bounded_send(message: dict[str, Any]) -> None:
            try:
                async with asyncio.timeout(self.timeout_seconds):  # no extra task per write
                    await send(message)
            except TimeoutError:
                log.warning("dropped a client that read nothing for %.0f s", self.timeout_seconds)
                raise SlowClient from None

        try:
            await self.app(scope, receive, bounded_send)
        except SlowClient:
            pass  # the response task was torn down; hypercorn closes the connection
