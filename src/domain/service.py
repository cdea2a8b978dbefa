"""Runs in flight: start them, feed their watchers, cancel them, end them on every path."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from domain.agent import Agent
from domain.errors import ApprovalTimeout, AuraError, RunCancelled, StoreUnavailable
from domain.events import Event, EventType, RunIds, RunStatus
from domain.identity import Principal
from domain.model import ChatMessage
from domain.ports import Clock, EventLog, IdFactory
from domain.run import DisconnectPolicy, Run, RunRequest

log = logging.getLogger("aura.runs")

SAFE_INTERNAL_MESSAGE = "Aura hit an internal error; the run was stopped. Please try again."


class SubscriptionOverflow(Exception):
    """A watcher fell too far behind; it must reconnect and resume from the event log."""


class Subscription:
    """One watcher's bounded buffer of a run's live events."""

    def __init__(self, max_buffered: int) -> None:
        self._events: deque[Event] = deque()
        self._max = max_buffered
        self._ready = asyncio.Event()
        self.overflowed = False

    def push(self, event: Event) -> None:
        if self.overflowed:
            return
        if len(self._events) >= self._max:
            self.overflowed = True
            self._events.clear()  # free the memory now; the watcher resumes from the log
        else:
            self._events.append(event)
        self._ready.set()

    async def next(self, wait_seconds: float | None) -> Event | None:
        """The next event, or None when nothing came within `wait_seconds` (time for a heartbeat)."""
        if not self._events and not self.overflowed:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), wait_seconds)
            except TimeoutError:
                return None
        if self.overflowed:
            raise SubscriptionOverflow
        return self._events.popleft()


@dataclass(slots=True)
class RunHandle:
    run: Run
    task: asyncio.Task[None] | None
    watchers: set[Subscription]
    started: bool = False

    @property
    def run_id(self) -> str:
        return self.run.ids.run_id

    def cancel(self, reason: str) -> bool:
        if self.task is None or self.task.done():
            return False
        if self.run.cancel_reason is None:
            self.run.cancel_reason = reason
        if self.started:
            self.task.cancel()
        else:
            # A task cancelled before its first step never enters its try block, so it could not
            # emit its `end`; let it start first.
            asyncio.get_running_loop().call_soon(self.task.cancel)
        return True


@dataclass(frozen=True, slots=True)
class RunLimits:
    max_run_seconds: float = 900.0
    watcher_buffer: int = 4096


class RunService:
    def __init__(self, agent: Agent, clock: Clock, ids: IdFactory, event_log: EventLog,
                 limits: RunLimits) -> None:
        self._agent = agent
        self._clock = clock
        self._ids = ids
        self._log = event_log
        self._limits = limits
        self._runs: dict[str, RunHandle] = {}
        self.accepting = True

    # -- queries ---------------------------------------------------------------------------
    def get(self, run_id: str) -> RunHandle | None:
        return self._runs.get(run_id)

    def active(self) -> list[RunHandle]:
        return list(self._runs.values())

    def new_trace_id(self) -> str:
        return self._ids.new_id("")[-32:]

    # -- life cycle ------------------------------------------------------------------------
    def start(self, principal: Principal, request: RunRequest, *, trace_id: str | None = None,
              history: Sequence[ChatMessage] = ()) -> tuple[RunHandle, Subscription]:
        """Create the run and its first watcher before the agent runs, so no event is missed."""
        ids = RunIds(
            run_id=self._ids.new_id("run"),
            session_id=self._ids.new_id("ses"),
            thread_id=request.thread_id or self._ids.new_id("thr"),
            trace_id=trace_id or self.new_trace_id(),
        )
        watchers: set[Subscription] = set()
        run = Run(ids, principal, request, self._clock, partial(self._publish, watchers))
        handle = RunHandle(run=run, task=None, watchers=watchers)
        watcher = self.watch(handle)
        self._runs[ids.run_id] = handle
        handle.task = asyncio.create_task(self._drive(handle, history), name=f"run {ids.run_id}")
        return handle, watcher

    def watch(self, handle: RunHandle) -> Subscription:
        watcher = Subscription(self._limits.watcher_buffer)
        handle.watchers.add(watcher)
        return watcher

    def release(self, handle: RunHandle, watcher: Subscription, *, disconnected: bool) -> None:
        """A watcher left. When the client went away mid-run and the run's policy is `cancel`,
        and nobody else watches, the run stops (its pending approval is cancelled)."""
        handle.watchers.discard(watcher)
        if (disconnected and not handle.watchers
                and handle.run.request.on_disconnect is DisconnectPolicy.CANCEL):
            handle.cancel("client_disconnected")

    def cancel(self, run_id: str, reason: str = "user_cancelled") -> bool:
        handle = self._runs.get(run_id)
        return handle.cancel(reason) if handle else False

    async def shutdown(self, reason: str = "server_shutdown") -> None:
        """Stop taking runs, cancel every run, and wait until each has emitted its `end`."""
        self.accepting = False
        handles = list(self._runs.values())
        for handle in handles:
            handle.cancel(reason)
        tasks = [h.task for h in handles if h.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals -------------------------------------------------------------------------
    async def _publish(self, watchers: set[Subscription], event: Event) -> None:
        """Log first, then feed the in-process watchers directly (no Redis round trip)."""
        failure: Exception | None = None
        try:
            await self._log.append(event)
        except StoreUnavailable as exc:
            failure = exc
        for watcher in tuple(watchers):
            watcher.push(event)
        if failure is not None and event.type not in (EventType.ERROR, EventType.END):
            raise failure

    async def _drive(self, handle: RunHandle, history: Sequence[ChatMessage]) -> None:
        run = handle.run
        handle.started = True
        try:
            await run.emit(EventType.START, {
                "message": "Aura started working on your request.",
                "resumeUrl": f"/aura/runs/{run.ids.run_id}/events",
            })
            async with asyncio.timeout(self._limits.max_run_seconds):
                await self._agent.execute(run, history)
            await run.end(RunStatus.COMPLETED, "completed", "The run completed.")
        except asyncio.CancelledError:
            reason = run.cancel_reason or "cancelled"
            await self._finish(run, RunStatus.CANCELLED, reason, "The run was cancelled.")
        except TimeoutError:
            await self._finish(run, RunStatus.FAILED, "budget_exceeded",
                               f"The run took longer than {self._limits.max_run_seconds:g} s.",
                               error=("budget_exceeded", False))
        except ApprovalTimeout as exc:
            await self._finish(run, RunStatus.TIMEOUT, exc.code, exc.message, error=(exc.code, False))
        except RunCancelled as exc:
            await self._finish(run, RunStatus.CANCELLED, exc.code, exc.message)
        except AuraError as exc:
            await self._finish(run, RunStatus.FAILED, exc.code, exc.message, error=(exc.code, exc.retryable))
        except Exception:
            log.exception("run %s failed", run.ids.run_id)
            await self._finish(run, RunStatus.FAILED, "internal_error", SAFE_INTERNAL_MESSAGE,
                               error=("internal_error", True))
        finally:
            self._runs.pop(run.ids.run_id, None)
            try:
                await self._log.close_run(run.ids.run_id)
            except StoreUnavailable:
                log.warning("could not set the retention of run %s's event log", run.ids.run_id)

    async def _finish(self, run: Run, status: RunStatus, reason: str, message: str,
                      error: tuple[str, bool] | None = None) -> None:
        try:
            if error is not None:
                await run.error(error[0], message, retryable=error[1])
            await run.end(status, reason, message)
        except Exception:  # the terminal events were still delivered in-process
            log.exception("could not record the end of run %s", run.ids.run_id)
