"""What a reader of a run in flight sees: the small surface the HTTP adapter streams from."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from domain.model.events import Event
from domain.runtime.feed import Subscription
from domain.runtime.waits import BARE_CONTEXT
from domain.services.run_handle import RunHandle
from domain.services.runs import RunService


class RunWatch:
    """One reader of a run in flight: the run's events as they are logged (`next` raises
    SubscriptionOverflow when the reader fell too far behind and must resume from the log),
    whether the run waits for a human, and leaving, which happens once however often it is asked
    for. Every open stream keeps one, for as long as it is open: slots."""

    __slots__ = ("_handle", "_released", "_runs", "_subscription")

    def __init__(self, runs: RunService, handle: RunHandle, subscription: Subscription[Event]) -> None:
        self._runs = runs
        self._handle = handle
        self._subscription = subscription
        self._released = False

    @property
    def run_id(self) -> str:
        return self._handle.run_id

    @property
    def run_waits_for_a_human(self) -> bool:
        return self._handle.run.pending_approval is not None

    def next(self, wait_seconds: float | None) -> Coroutine[Any, Any, Event | None]:
        """The next event, or None when nothing came within `wait_seconds` (time for a heartbeat)."""
        return self._subscription.next(wait_seconds)

    def take_buffered(self, limit: int) -> list[Event]:
        """Events already buffered (no waiting), so a writer can send them in one write."""
        return self._subscription.take_buffered(limit)

    def release(self, *, disconnected: bool) -> None:
        """The reader leaves; `disconnected` when its client went away (the run's disconnect
        policy applies) rather than the stream having ended."""
        if not self._released:
            self._released = True
            self._runs.release(self._handle, self._subscription, disconnected=disconnected)

    def release_when_done(self, task: asyncio.Task[Any] | None) -> None:
        """Leave (as a disconnect) when `task` ends, if not before: a client that hangs up while the
        response headers are being sent cancels its task before the body's generator ever starts,
        and an unstarted generator runs no `finally`."""
        if task is not None:
            # The shared empty context: a callback keeps the context it was added in, and the
            # request's (a web framework's request and app contexts) would otherwise live as long
            # as the stream. `release` sets no context variable.
            task.add_done_callback(self, context=BARE_CONTEXT)

    def __call__(self, _task: object) -> None:
        """`task` ended (the watch itself is its callback: no bound method kept per stream)."""
        self.release(disconnected=True)
