"""ASGI middleware of the HTTP adapter."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from domain.runtime.deadlines import Sweep

log = logging.getLogger("aura.http")

ASGIApp = Any


class SlowClient(Exception):
    """The client did not take a response chunk within the send timeout."""


class SendTimeoutMiddleware:
    """Bounds every response write. hypercorn's `send` waits while the socket buffer is full, so a
    client that stops reading would otherwise pin its stream (and the run's memory) forever.

    Almost every write completes at once, so a write costs only noting when it started: the
    writes in progress are a `Sweep`, one timer per process that looks at them a few times per
    timeout and interrupts those that have waited too long (a write is cut between 1 and 1.25
    timeouts after it began). A timer per write, cancelled a moment later, was measurable at a
    thousand streams."""

    def __init__(self, app: ASGIApp, timeout_seconds: float) -> None:
        self.app = app
        self.timeout_seconds = timeout_seconds
        self._writing: Sweep[asyncio.Task[Any]] = Sweep(timeout_seconds, self._interrupt)
        self._expired: set[asyncio.Task[Any]] = set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, _BoundedSend(self, send))
        except SlowClient:
            pass  # the response task was torn down; hypercorn closes the connection

    async def bounded_send(self, send: Any, message: dict[str, Any]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._writing.start(task)
        try:
            await send(message)
        except asyncio.CancelledError:
            if task in self._expired:
                self._expired.discard(task)
                if task.uncancel() == 0:  # our interruption alone: report it as a slow client
                    log.warning("dropped a client that read nothing for %.0f s", self.timeout_seconds)
                    raise SlowClient from None
            raise
        finally:
            self._writing.stop(task)

    def _interrupt(self, task: asyncio.Task[Any]) -> None:
        self._expired.add(task)
        task.cancel()


class _BoundedSend:
    """A response's `send`, bounded by the middleware. An object with two slots rather than a
    closure (a function and four cells): every open stream keeps one, for as long as it is open."""

    __slots__ = ("_middleware", "_send")

    def __init__(self, middleware: SendTimeoutMiddleware, send: Any) -> None:
        self._middleware = middleware
        self._send = send

    def __call__(self, message: dict[str, Any]) -> Any:
        return self._middleware.bounded_send(self._send, message)
