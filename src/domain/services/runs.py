"""Runs in flight: start them within their limits, give them watchers, cancel them, end them on
every path (each with its `end`, its directory record and, for a thread, its turn)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from domain.model.chat import ChatMessage
from domain.model.errors import (
    ApprovalTimeout,
    AuraError,
    RunCancelled,
    RunFenced,
    ShuttingDown,
    StoreUnavailable,
    TooManyRuns,
)
from domain.model.events import Event, EventType, RunIds, RunStatus
from domain.model.identity import Principal
from domain.model.ports import Clock, ConversationStore, EventLog, IdFactory, StartRateLimiter
from domain.model.run import DisconnectPolicy, Run, RunRequest
from domain.model.runs import RunDirectory, RunEnd, RunRecord
from domain.model.telemetry import Telemetry, detached_log_context
from domain.runtime.deadlines import Timer
from domain.runtime.feed import RunFeed, Subscription
from domain.services.agent import Agent
from domain.services.disconnects import DisconnectGrace
from domain.services.leases import LeaseRenewal
from domain.services.run_handle import RunHandle

log = logging.getLogger("aura.runs")

SAFE_INTERNAL_MESSAGE = "Aura hit an internal error; the run was stopped. Please try again."


@dataclass(frozen=True, slots=True)
class RunLimits:
    """Values come from the settings (app/settings.py, the one place a default is written)."""

    max_run_seconds: float
    watcher_buffer: int
    lease_seconds: float
    retention_seconds: int
    max_runs_per_user: int
    max_runs_per_tenant: int
    disconnect_grace_seconds: float


class RunService:
    def __init__(self, agent: Agent, clock: Clock, ids: IdFactory, event_log: EventLog, directory: RunDirectory,
                 limits: RunLimits, instance_id: str, conversations: ConversationStore | None,
                 telemetry: Telemetry, start_limiter: StartRateLimiter | None = None) -> None:
        self._telemetry = telemetry
        self._start_limiter = start_limiter
        self._agent = agent
        self._conversations = conversations
        self._clock = clock
        self._ids = ids
        self._log = event_log
        self._directory = directory
        self._limits = limits
        self.instance_id = instance_id
        self._runs: dict[str, RunHandle] = {}
        self._disconnects = DisconnectGrace(directory, limits.disconnect_grace_seconds)
        self._leases = LeaseRenewal(directory, instance_id, limits.lease_seconds, self._runs,
                                    on_unread=self._disconnects.unread)
        # The agents' time budgets on one timer for the process, at the earliest deadline of an
        # agent still working. Every run has the same budget and `_runs` keeps them in start order,
        # so the oldest such run's is the earliest: no keyed deadlines (`Deadlines`) needed, and a
        # run keeps nothing for its budget but `RunHandle.deadline` (a timer per run, as
        # asyncio.timeout would be, was one more handle kept by every run waiting for approval).
        self._budget_timer = Timer()
        self.accepting = True

    # -- queries ---------------------------------------------------------------------------
    def get(self, run_id: str) -> RunHandle | None:
        return self._runs.get(run_id)

    def active(self) -> list[RunHandle]:
        return list(self._runs.values())

    def new_trace_id(self) -> str:
        return self._ids.new_id("")[-32:]

    def new_ids(self, request: RunRequest, trace_id: str | None = None) -> RunIds:
        return RunIds(
            run_id=self._ids.new_id("run"),
            session_id=self._ids.new_id("ses"),
            thread_id=request.thread_id or self._ids.new_id("thr"),
            trace_id=trace_id or self.new_trace_id(),
        )

    # -- life cycle ------------------------------------------------------------------------
    async def start(self, principal: Principal, request: RunRequest, *, ids: RunIds | None = None,
                    trace_id: str | None = None, history: Sequence[ChatMessage] = (),
                    fingerprint: str = "") -> tuple[RunHandle, Subscription[Event]]:
        """Admit the run (limits), record it in the directory with this instance's lease, and
        create its first watcher before the agent runs, so no event is missed."""
        if not self.accepting:
            raise ShuttingDown("Aura is shutting down; retry on another instance.")
        ids = ids or self.new_ids(request, trace_id)
        record = RunRecord(
            run_id=ids.run_id, session_id=ids.session_id, thread_id=ids.thread_id, trace_id=ids.trace_id,
            tenant_id=principal.tenant_id, user_id=principal.user_id, instance_id=self.instance_id,
            created_at=self._clock.timestamp(), fingerprint=fingerprint)
        full = await self._directory.admit(
            record, user_limit=self._limits.max_runs_per_user, tenant_limit=self._limits.max_runs_per_tenant,
            slot_seconds=self._limits.max_run_seconds, lease_seconds=self._limits.lease_seconds,
            starts=self._start_limiter)
        if full is not None:
            raise TooManyRuns(full, self._limits.max_runs_per_user if full == "user"
                              else self._limits.max_runs_per_tenant)
        feed = RunFeed(self._log, self._telemetry)
        run = feed.run = Run(ids, principal, request, self._clock, feed.emit)
        handle = RunHandle(run=run, feed=feed, task=None, record=record)
        feed.on_failure = handle.fail
        watcher = self.watch(handle)
        self._runs[ids.run_id] = handle
        handle.deadline = asyncio.get_running_loop().time() + self._limits.max_run_seconds
        # Its own context, with only the log context: the request's would keep Quart's request
        # and app contexts for as long as the run lives.
        context = detached_log_context(runId=ids.run_id, sessionId=ids.session_id, traceId=ids.trace_id,
                                       tenantId=principal.tenant_id, userId=principal.user_id)
        handle.task = asyncio.create_task(self._drive(handle, history), name=f"run {ids.run_id}", context=context)
        self._budget_timer.arm(handle.deadline, self._budget_due)
        self._leases.ensure()
        return handle, watcher

    def watch(self, handle: RunHandle) -> Subscription[Event]:
        watcher: Subscription[Event] = Subscription(self._limits.watcher_buffer)
        handle.watchers.append(watcher)
        if handle.feed.fenced:
            watcher.detach()  # the run's rest is in the event log only
        return watcher

    def release(self, handle: RunHandle, watcher: Subscription[Event], *, disconnected: bool) -> None:
        """A watcher left. When the client went away mid-run and the run's policy is `cancel`,
        and nobody else watches, the run stops (its pending approval is cancelled)."""
        if watcher in handle.watchers:
            handle.watchers.remove(watcher)
        watcher.close()
        if (disconnected and not handle.watchers
                and handle.run.request.on_disconnect is DisconnectPolicy.CANCEL):
            self._disconnects.start(handle)

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
        await self._leases.stop()
        self._budget_timer.cancel()

    def _budget_due(self) -> None:
        now = asyncio.get_running_loop().time()
        for handle in list(self._runs.values()):
            if handle.deadline is None:
                continue
            if handle.deadline > now:
                self._budget_timer.arm(handle.deadline, self._budget_due)
                return
            handle.deadline = None
            handle.exceed_budget()

    # -- internals -------------------------------------------------------------------------
    async def _drive(self, handle: RunHandle, history: Sequence[ChatMessage]) -> None:
        run = handle.run
        handle.started = True
        self._telemetry.run_started()
        try:
            await run.emit(EventType.START, {
                "message": "Aura started working on your request.",
                "resumeUrl": f"/aura/runs/{run.ids.run_id}/events",
            })
            agent_run = self._agent.execute(run, history)
            # This frame waits as long as the run and the agent keeps its own copy of the conversation
            # (pinned by tests/unit/runtime/test_memory.py: `history` is not a local of a parked run).
            del history
            answer = await agent_run
            handle.deadline = None  # the budget is the agent's: what follows is not cut short by it
            await self._remember(run, answer)
            await run.end(RunStatus.COMPLETED, *run.completion)
        except asyncio.CancelledError:
            if handle.over_budget:
                await self._finish(run, RunStatus.FAILED, "budget_exceeded",
                                   f"The run took longer than {self._limits.max_run_seconds:g} s.",
                                   error=("budget_exceeded", False))
            elif handle.feed.fenced:
                pass  # nothing may be logged: whoever declares the run lost writes its end
            elif handle.failure is not None:
                error = handle.failure
                code, message = (error.code, error.message) if isinstance(error, AuraError) else (
                    StoreUnavailable.code, "The event log is unavailable.")
                await self._finish(run, RunStatus.FAILED, code, message, error=(code, True))
            else:
                reason = run.cancel_reason or "cancelled"
                await self._finish(run, RunStatus.CANCELLED, reason, "The run was cancelled.")
        except TimeoutError:
            await self._finish(run, RunStatus.FAILED, "budget_exceeded",
                               f"The run took longer than {self._limits.max_run_seconds:g} s.",
                               error=("budget_exceeded", False))
        except ApprovalTimeout as exc:
            await self._finish(run, RunStatus.TIMEOUT, exc.code, exc.message, error=(exc.code, False))
        except RunFenced:
            pass  # the log refused the run's events: it is over for this instance
        except RunCancelled as exc:
            await self._finish(run, RunStatus.CANCELLED, exc.code, exc.message)
        except AuraError as exc:
            await self._finish(run, RunStatus.FAILED, exc.code, exc.message, error=(exc.code, exc.retryable))
        except Exception:
            log.exception("run %s failed", run.ids.run_id)
            await self._finish(run, RunStatus.FAILED, "internal_error", SAFE_INTERNAL_MESSAGE,
                               error=("internal_error", True))
        finally:
            handle.deadline = None
            self._disconnects.stop(handle)
            handle.feed.close()
            self._telemetry.run_ended(run.status.value)
            self._runs.pop(run.ids.run_id, None)
            try:
                await self._log.close_run(run.ids.run_id)
                if not handle.feed.fenced and not await self._directory.close(
                        handle.record, run.status.value, self._limits.retention_seconds,
                        RunEnd.from_data(run.end_data)):
                    log.warning("run %s ended after its lease lapsed; its end is the declaration's",
                                run.ids.run_id)
            except StoreUnavailable:
                log.warning("could not record the end of run %s in the directory", run.ids.run_id)

    async def _remember(self, run: Run, answer: str) -> None:
        # Only a thread the client named is continued later: a run without one keeps no history.
        if self._conversations is None or run.request.thread_id is None:
            return
        turn = {"runId": run.ids.run_id, "prompt": run.request.prompt, "answer": answer,
                "tools": run.tool_notes, "at": self._clock.timestamp()}
        try:
            await self._conversations.append(run.principal.tenant_id, run.principal.user_id, run.ids.thread_id, turn)
        except StoreUnavailable:
            log.warning("could not store the turn of run %s in its thread", run.ids.run_id)

    async def _finish(self, run: Run, status: RunStatus, reason: str, message: str,
                      error: tuple[str, bool] | None = None) -> None:
        try:
            if error is not None:
                await run.error(error[0], message, retryable=error[1])
            await run.end(status, reason, message)
        except RunFenced:
            pass  # the log refused the run: whoever declares it lost writes its end
        except Exception:  # the terminal events were still delivered in-process
            log.exception("could not record the end of run %s", run.ids.run_id)
