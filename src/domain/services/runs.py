"""Runs in flight: start them, feed their watchers, cancel them, end them on every path."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from domain.model.chat import ChatMessage
from domain.model.errors import ApprovalTimeout, AuraError, RunCancelled, RunFenced, StoreUnavailable
from domain.model.events import Event, EventType, RunIds, RunStatus
from domain.model.identity import Principal
from domain.model.ports import Clock, ConversationStore, EventLog, IdFactory, StartRateLimiter
from domain.model.run import DisconnectPolicy, Run, RunRequest
from domain.model.runs import RunDirectory, RunRecord
from domain.model.telemetry import Telemetry, detached_log_context
from domain.services.agent import Agent

log = logging.getLogger("aura.runs")

SAFE_INTERNAL_MESSAGE = "Aura hit an internal error; the run was stopped. Please try again."


class SubscriptionOverflow(Exception):
    """A watcher fell too far behind, or the run can no longer feed it (fenced, or its log refused
    an event); it must resume from the event log."""


class Subscription:
    """One watcher's bounded buffer of a run's live events.

    A quiet stream needs a heartbeat, so every wait has a deadline; but a busy stream waits
    thousands of times per heartbeat interval. Instead of a timer per wait (created, then cancelled
    a moment later, filling the loop's timer heap at a thousand streams), a subscription keeps at
    most one timer, which fires at the earliest deadline it was armed for and re-arms itself for
    the current one when the stream was not quiet after all."""

    __slots__ = ("_deadline", "_events", "_max", "_timer", "_waiter", "overflowed")

    def __init__(self, max_buffered: int) -> None:
        # Made by the first push and dropped whenever the watcher waits on an empty buffer: an
        # empty deque still holds a block of 64 slots, and a parked stream waits for a long time.
        self._events: deque[Event] | None = None
        self._max = max_buffered
        self._waiter: asyncio.Future[None] | None = None  # set while `next` waits
        self.overflowed = False
        self._deadline: float | None = None  # when the current wait becomes a heartbeat
        self._timer: asyncio.TimerHandle | None = None

    def push(self, event: Event) -> None:
        if self.overflowed:
            return
        events = self._events
        if events is None:
            events = self._events = deque()
        if len(events) >= self._max:
            self.overflowed = True
            self._events = None  # free the memory now; the watcher resumes from the log
        else:
            events.append(event)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self, wait_seconds: float | None) -> Event | None:
        """The next event, or None when nothing came within `wait_seconds` (time for a heartbeat)."""
        if not self._events and not self.overflowed:
            self._events = None
            loop = asyncio.get_running_loop()
            if wait_seconds is None:
                self._deadline = None
            else:
                self._deadline = loop.time() + wait_seconds
                if self._timer is None:
                    self._timer = loop.call_at(self._deadline, self._deadline_reached)
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
            if not self._events and not self.overflowed:
                return None  # only the timer wakes a wait without an event: heartbeat time
        if self.overflowed:
            raise SubscriptionOverflow
        assert self._events is not None
        return self._events.popleft()

    def _deadline_reached(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            if not self._events:
                self._wake()
        else:  # the stream was busy since this timer was armed: wait for the current deadline
            self._timer = loop.call_at(deadline, self._deadline_reached)

    def detach(self) -> None:
        """The run can no longer feed this watcher (it was fenced, or the log refused an event):
        the watcher resumes from the event log, which holds whatever the run logged."""
        self.overflowed = True
        self._events = None
        self._wake()

    def close(self) -> None:
        """The watcher left: drop the timer now rather than when it would have fired."""
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def take_buffered(self, limit: int) -> list[Event]:
        """Events already buffered (no waiting), so a writer can send them in one write."""
        taken: list[Event] = []
        events = self._events
        while events and len(taken) < limit and not self.overflowed:
            taken.append(events.popleft())
        return taken


# A run waits for these to be logged before it goes on: its `start` (so the client's first event
# goes out before the run's own work takes the loop: one round trip of waiting, no CPU), before it
# parks on an approval (a resumer must see the `hitl`), before a tool acts on the world, and before
# it ends (the log is complete when the run's retention starts). Everything else is delivered as
# soon as it is logged, while the run keeps working.
_SETTLE = frozenset({EventType.START, EventType.HITL, EventType.TOOL_EXECUTION, EventType.END})
_ALWAYS_SENT = frozenset({EventType.ERROR, EventType.END})
# Content chunks are the bulk of a run's events and change only the answer; the snapshot is saved
# with every other event (and the final answer), so it costs little and is never far behind.
_SNAPSHOT_SKIP = frozenset({EventType.CONTENT, EventType.THOUGHT})


class RunFeed:
    """A run's way out: each event is logged, then handed to the run's watchers, in order.

    The run does not suspend for every log write: events are submitted to the event log, which
    writes many at once and reports each back in order; only then does an event reach a watcher
    ("logged before it is written to any client"). A failed write is raised to the run at its next
    event (the failed event itself is still delivered, as is every `error` and `end` after it)."""

    # Slots, and bound methods instead of closures, for every object a run keeps: a run waiting for
    # approval keeps them for as long as the approval takes (docs/performance.md, parked runs).
    __slots__ = ("_failure", "_log", "_max_unlogged", "_telemetry", "_unlogged", "_wait_until", "_waiter",
                 "fenced", "on_failure", "run", "watchers")

    def __init__(self, event_log: EventLog, telemetry: Telemetry,
                 on_failure: Callable[[Exception], None] | None = None, max_unlogged: int = 512) -> None:
        # A list: a run has one watcher or a few, and a set of one is three times the size (a
        # parked run keeps it for as long as the approval takes).
        self.watchers: list[Subscription] = []
        # Told of a failed write while the run is not publishing (set once the run's handle exists).
        self.on_failure = on_failure
        self.run: Run | None = None  # whose snapshot `emit` logs with its events
        self._log = event_log
        self._telemetry = telemetry
        self._max_unlogged = max_unlogged
        self._unlogged = 0
        self._failure: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wait_until = 0
        # The log refused the run (its lease is gone, or its log has an `end` or another event at a
        # seq): nothing more is logged or delivered; the watchers resume from the log.
        self.fenced = False

    async def emit(self, event: Event) -> None:
        """The run's event sink: each event with the run's snapshot, except content chunks and
        thoughts (the bulk of a run's events, which change only the answer)."""
        snapshot = None
        if event.type not in _SNAPSHOT_SKIP or (event.type is EventType.CONTENT and not event.data.get("chunk")):
            assert self.run is not None
            snapshot = self.run.snapshot()
        await self.publish(event, snapshot)

    def fence(self, error: RunFenced) -> None:
        if not self.fenced:
            self.fenced = True
            self._failure = error
            for watcher in tuple(self.watchers):
                watcher.detach()

    async def publish(self, event: Event, snapshot: Mapping[str, Any] | None) -> None:
        if self.fenced or (self._failure is not None and event.type not in _ALWAYS_SENT):
            assert self._failure is not None
            raise self._failure
        self._unlogged += 1
        self._log.submit(event, snapshot, partial(self._logged, event))
        if event.type in _SETTLE:
            await self._until_unlogged(0)
        elif self._unlogged >= self._max_unlogged:
            await self._until_unlogged(self._max_unlogged // 2)  # the log is slower than the run
        else:
            return
        if self.fenced or (self._failure is not None and event.type not in _ALWAYS_SENT):
            assert self._failure is not None
            raise self._failure

    def close(self) -> None:
        """The run is over: drop the links back to it. The run's sink is this feed's `emit`, and
        the feed held the run (for its snapshots) and its handle (`on_failure`): reference cycles,
        which only a garbage collection frees, and the collector then frees every finished run's
        plan, conversation and events at once, in pauses of tens of milliseconds under load
        (docs/performance.md). Without them a finished run is freed as soon as its last watcher
        lets go."""
        self.run = None
        self.on_failure = None

    def _logged(self, event: Event, error: Exception | None) -> None:
        self._unlogged -= 1
        first_failure = error is not None and not self.fenced and (
            self._failure is None or isinstance(error, RunFenced))
        if isinstance(error, RunFenced) or self.fenced:
            # Not delivered: the log holds something else at this seq (or will: a run_lost).
            if isinstance(error, RunFenced):
                self.fence(error)
        else:
            if error is not None:
                self._telemetry.store_error()
                self._failure = self._failure or error
            if error is None:
                for watcher in tuple(self.watchers):
                    watcher.push(event)
            else:
                # An event the log did not take (or whose replicas did not confirm it) goes to no
                # client: a client must never hold an event a resume may not find (a Redis failover
                # drops what the old master took last). Its watchers resume from the log instead,
                # which says how far the run got, or that the store is unavailable.
                for watcher in tuple(self.watchers):
                    watcher.detach()
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (first_failure or self._unlogged <= self._wait_until):
            waiter.set_result(None)  # the run is in `publish`: it raises the failure itself
        elif first_failure and waiter is None and (event.type not in _ALWAYS_SENT or isinstance(error, RunFenced)) \
                and self.on_failure is not None:
            assert error is not None
            self.on_failure(error)  # the run is elsewhere (waiting for approval, say): stop it

    async def _until_unlogged(self, count: int) -> None:
        while self._unlogged > count:
            self._waiter = asyncio.get_running_loop().create_future()
            self._wait_until = count
            try:
                await self._waiter
            finally:
                self._waiter = None


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

    @property
    def run_id(self) -> str:
        return self.run.ids.run_id

    @property
    def watchers(self) -> list[Subscription]:
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


class TooManyRuns(AuraError):
    code = "too_many_runs"
    retryable = True

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"Too many concurrent runs for this {scope} (limit {limit}); retry when one ends.")
        self.scope = scope


class RunStartsTooFrequent(AuraError):
    code = "too_many_run_starts"
    retryable = True

    def __init__(self, retry_after_seconds: float) -> None:
        super().__init__(f"Too many runs started; retry in {retry_after_seconds:g} s.")
        self.retry_after_seconds = retry_after_seconds


class ShuttingDown(AuraError):
    code = "shutting_down"
    retryable = True


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
        self._lease_task: asyncio.Task[None] | None = None
        self._budget_timer: asyncio.TimerHandle | None = None
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
                    fingerprint: str = "") -> tuple[RunHandle, Subscription]:
        """Admit the run (limits), record it in the directory with this instance's lease, and
        create its first watcher before the agent runs, so no event is missed."""
        if not self.accepting:
            raise ShuttingDown("Aura is shutting down; retry on another instance.")
        if self._start_limiter is not None:
            wait = await self._start_limiter.admit(principal.tenant_id, principal.user_id)
            if wait is not None:
                raise RunStartsTooFrequent(wait)
        ids = ids or self.new_ids(request, trace_id)
        record = RunRecord(
            run_id=ids.run_id, session_id=ids.session_id, thread_id=ids.thread_id, trace_id=ids.trace_id,
            tenant_id=principal.tenant_id, user_id=principal.user_id, instance_id=self.instance_id,
            created_at=self._clock.timestamp(), fingerprint=fingerprint)
        full = await self._directory.admit(
            record, user_limit=self._limits.max_runs_per_user, tenant_limit=self._limits.max_runs_per_tenant,
            slot_seconds=self._limits.max_run_seconds, lease_seconds=self._limits.lease_seconds)
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
        self._arm_budget()
        self._ensure_lease_renewal()
        return handle, watcher

    def watch(self, handle: RunHandle) -> Subscription:
        watcher = Subscription(self._limits.watcher_buffer)
        handle.watchers.append(watcher)
        if handle.feed.fenced:
            watcher.detach()  # the run's rest is in the event log only
        return watcher

    def release(self, handle: RunHandle, watcher: Subscription, *, disconnected: bool) -> None:
        """A watcher left. When the client went away mid-run and the run's policy is `cancel`,
        and nobody else watches, the run stops (its pending approval is cancelled)."""
        if watcher in handle.watchers:
            handle.watchers.remove(watcher)
        watcher.close()
        if (disconnected and not handle.watchers
                and handle.run.request.on_disconnect is DisconnectPolicy.CANCEL):
            grace = self._limits.disconnect_grace_seconds
            if grace <= 0:
                handle.cancel("client_disconnected")
            elif handle.disconnect_timer is None:
                # A reader may come back (a retried POST, a tab shown again, another instance): the
                # run is cancelled only if none did within the grace period.
                handle.disconnect_timer = asyncio.get_running_loop().call_later(
                    grace, self._disconnect_due, handle)

    def _disconnect_due(self, handle: RunHandle) -> None:
        handle.disconnect_timer = None
        if handle.watchers or handle.task is None or handle.task.done():
            return  # a reader came back here, or the run is over
        handle.disconnect_check = asyncio.create_task(self._cancel_unless_read(handle),
                                                      name=f"disconnect grace {handle.run_id}")

    async def _cancel_unless_read(self, handle: RunHandle) -> None:
        try:
            elsewhere = await self._directory.has_reader(handle.run_id)
        except StoreUnavailable:
            elsewhere = False
        if handle.watchers:
            return
        if elsewhere:  # followed through another instance: look again after another grace period
            handle.disconnect_timer = asyncio.get_running_loop().call_later(
                self._limits.disconnect_grace_seconds, self._disconnect_due, handle)
            return
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
        if self._lease_task is not None:
            self._lease_task.cancel()
            await asyncio.gather(self._lease_task, return_exceptions=True)
        if self._budget_timer is not None:
            self._budget_timer.cancel()
            self._budget_timer = None

    def _arm_budget(self) -> None:
        """One timer per process for the runs' time budget, at the earliest deadline of an agent
        still working. Every run has the same budget and `_runs` keeps them in start order, so the
        oldest such run's is the earliest; a timer per run (asyncio.timeout) was one more handle
        and object kept by every run waiting for approval."""
        if self._budget_timer is not None:
            return
        for handle in self._runs.values():
            if handle.deadline is not None:
                self._budget_timer = asyncio.get_running_loop().call_at(handle.deadline, self._budget_due)
                return

    def _budget_due(self) -> None:
        self._budget_timer = None
        now = asyncio.get_running_loop().time()
        for handle in list(self._runs.values()):
            if handle.deadline is None:
                continue
            if handle.deadline > now:
                break
            handle.deadline = None
            handle.exceed_budget()
        self._arm_budget()

    def _ensure_lease_renewal(self) -> None:
        if self._lease_task is None or self._lease_task.done():
            self._lease_task = asyncio.create_task(self._renew_leases(), name="run lease renewal")

    async def _renew_leases(self) -> None:
        """One loop per process renews the leases of all its runs in one round trip."""
        interval = self._limits.lease_seconds / 3
        while self._runs:
            await asyncio.sleep(interval)
            try:
                lost = await self._directory.renew_leases(list(self._runs), self.instance_id,
                                                          self._limits.lease_seconds)
            except StoreUnavailable:
                log.warning("could not renew run leases")
                continue
            for run_id in lost:
                handle = self._runs.get(run_id)
                if handle is not None:
                    log.warning("run %s: this instance lost its lease; stopping it", run_id)
                    handle.lose_lease()

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
            del history  # the agent keeps the conversation; this frame waits as long as the run
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
            if handle.disconnect_timer is not None:
                handle.disconnect_timer.cancel()
                handle.disconnect_timer = None
            handle.feed.close()
            self._telemetry.run_ended(run.status.value)
            self._runs.pop(run.ids.run_id, None)
            try:
                await self._log.close_run(run.ids.run_id)
                if not handle.feed.fenced and not await self._directory.close(handle.record, run.status.value,
                                                     self._limits.retention_seconds):
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
