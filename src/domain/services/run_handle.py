"""A run in flight in this process: its task, its feed, and how it is stopped."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from domain.model.errors import RunFenced
from domain.model.events import Event
from domain.model.run import Run
from domain.model.runs import RunRecord
from domain.runtime.feed import RunFeed, Subscription


@dataclass(slots=True)
class RunHandle:
    run: Run
    feed: RunFeed
    task: asyncio.Task[None] | None
    record: RunRecord
    started: bool = False
    failure: Exception | None = None  # the store failed while the run was not writing to it
    deadline: float | None = None  # loop time by which the agent must be done; None once it is
    over_budget: bool = False
    # While no reader is attached after a disconnect: the timer of the grace period, then its check.
    disconnect_timer: asyncio.TimerHandle | None = None
    disconnect_check: asyncio.Task[None] | None = None
    # The grace period ended with the run read on another instance: kept until the lease renewal
    # reports that reader gone.
    read_elsewhere: bool = False

    @property
    def run_id(self) -> str:
        return self.run.ids.run_id

    @property
    def watchers(self) -> list[Subscription[Event]]:
        """The run's watchers: its feed hands each logged event to them."""
        return self.feed.watchers

    def fail(self, error: Exception) -> None:
        """Stop the run because its events can no longer be logged; it ends `failed` with the error."""
        if self.failure is None:
            self.failure = error
            self.cancel("store_unavailable")

    def lose_lease(self) -> None:
        """Another instance may declare the run lost now: stop it before it logs or does anything."""
        error = RunFenced("This instance no longer holds the run's lease.")
        self.feed.fence(error)
        self.fail(error)

    def exceed_budget(self) -> None:
        """The agent took longer than the run's budget: stop it; it ends `failed` budget_exceeded
        (unless it was already being cancelled for another reason)."""
        if self.run.cancel_reason is None and self.cancel("budget_exceeded"):
            self.over_budget = True

    def cancel(self, reason: str) -> bool:
        if self.task is None or self.task.done():
            return False
        if self.run.cancel_reason is not None:
            return True  # already cancelling: a second cancel would interrupt the clean-up
        self.run.cancel_reason = reason
        if self.started:
            self.task.cancel()
        else:
            # A task cancelled before its first step never enters its try block, so it could not
            # emit its `end`; let it start first.
            asyncio.get_running_loop().call_soon(self.task.cancel)
        return True
