"""Reaching a run from any instance: ownership checks, snapshots, cancel, resume."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from domain.model.approval import ApprovalStatus, StoredApproval
from domain.model.errors import IdempotencyKeyReused, NotFound, ResumedWithAnotherRequest, StoreUnavailable
from domain.model.events import Event, EventType, RunIds
from domain.model.identity import Principal
from domain.model.ports import ApprovalStore, Clock, ConversationStore, EventLog
from domain.model.run import RunRequest
from domain.model.runs import LostRun, RunControl, RunDirectory, RunEnd, RunFollower, RunRecord
from domain.runtime.feed import Subscription, SubscriptionOverflow
from domain.services.agent import Agent
from domain.services.runs import RunService
from domain.services.watch import RunWatch

log = logging.getLogger("aura.runs")

REPLAY_BATCH = 500
MAX_DECLARE_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Notice:
    """An event that is not part of the run's own sequence (it has no seq of its own): a gap in the
    log, or a snapshot of the run's state sent after such a gap."""

    type: EventType
    ids: RunIds
    timestamp: int
    data: dict[str, Any]

    def envelope(self) -> dict[str, Any]:
        return {"type": self.type.value, "version": "1.0", "seq": 0, "runId": self.ids.run_id,
                "sessionId": self.ids.session_id, "threadId": self.ids.thread_id, "traceId": self.ids.trace_id,
                "timestamp": self.timestamp, "data": self.data}


ResumeItem = Event | Notice | None  # None: nothing happened for a heartbeat interval


@dataclass(frozen=True, slots=True)
class Started:
    """A new run, as its first reader sees it."""

    watch: RunWatch


@dataclass(frozen=True, slots=True)
class Attached:
    """A retried POST: the existing run, replayed from the client's Last-Event-ID."""

    run_id: str
    items: AsyncIterator[ResumeItem]


class RunAccess:
    def __init__(self, runs: RunService, directory: RunDirectory, event_log: EventLog, follower: RunFollower,
                 control: RunControl, clock: Clock, *,
                 conversations: ConversationStore | None = None, approvals: ApprovalStore | None = None,
                 retention_seconds: int) -> None:
        self._runs = runs
        self._approvals = approvals
        self._retention_seconds = retention_seconds
        self._sweeper: asyncio.Task[None] | None = None
        self._conversations = conversations
        self._directory = directory
        self._log = event_log
        self._follower = follower
        self._control = control
        self._clock = clock

    async def start(self, principal: Principal, request: RunRequest, *, trace_id: str | None,
                    idempotency: tuple[str, str] | None = None, fingerprint: str = "",
                    resume_run_id: str | None = None, after_seq: int = 0,
                    heartbeat_seconds: float) -> Started | Attached:
        """Start a run, or attach to the run a retried POST already started, so that a retry never
        runs the agent twice: the run its Last-Event-ID names (`resume_run_id`: this user's, asked
        with the same body, on any instance), or the run of an Idempotency-Key this user already
        used with the same body."""
        if resume_run_id is not None:
            record = await self.record_for(principal, resume_run_id)
            if record.fingerprint and record.fingerprint != fingerprint:
                raise ResumedWithAnotherRequest(
                    "Last-Event-ID names a run that was started with a different request body.")
            return Attached(record.run_id, self.resume(principal, record.run_id, after_seq, heartbeat_seconds))
        ids = self._runs.new_ids(request, trace_id)
        if idempotency is not None:
            key, fingerprint = idempotency
            claim = await self._directory.claim_idempotency(principal.tenant_id, principal.user_id, key, ids.run_id,
                                                            fingerprint, self._retention_seconds)
            if claim is not None:
                if claim.fingerprint != fingerprint:
                    raise IdempotencyKeyReused("This Idempotency-Key was used with a different request body.")
                await self.record_for(principal, claim.run_id)
                return Attached(claim.run_id, self.resume(principal, claim.run_id, after_seq, heartbeat_seconds))
        try:
            history = []
            if self._conversations is not None and request.thread_id is not None:
                turns = await self._conversations.open(principal.tenant_id, principal.user_id, ids.thread_id)
                history = Agent.history_messages(turns)
            handle, watcher = await self._runs.start(principal, request, ids=ids, history=history,
                                                     fingerprint=fingerprint)
        except BaseException:
            if idempotency is not None:
                await self._directory.release_idempotency(principal.tenant_id, principal.user_id, idempotency[0])
            raise
        return Started(RunWatch(self._runs, handle, watcher))

    async def record_for(self, principal: Principal, run_id: str) -> RunRecord:
        """The run's record, only for its own user and tenant (anyone else: not found)."""
        record = await self._directory.get(run_id)
        if record is None or record.tenant_id != principal.tenant_id or record.user_id != principal.user_id:
            raise NotFound("No such run.", code="run_not_found")
        return record

    async def snapshot(self, principal: Principal, run_id: str) -> dict[str, Any]:
        record = await self.record_for(principal, run_id)
        handle = self._runs.get(run_id)
        if handle is not None:
            return handle.run.snapshot()
        stored = await self._directory.get_snapshot(run_id)
        if stored is None:
            raise NotFound("The run's state is no longer retained.", code="run_not_found")
        if stored.get("status") in ("running", "waiting_approval") and record.status != "running":
            stored["status"] = record.status
        return stored

    async def cancel(self, principal: Principal, run_id: str) -> str:
        """Cancel wherever the run lives. Returns "cancelling" or the final status it already had."""
        record = await self.record_for(principal, run_id)
        if self._runs.cancel(run_id, "user_cancelled"):
            return "cancelling"
        if record.status != "running":
            return record.status
        await self._control.request_cancel(record.instance_id, run_id, "user_cancelled")
        return "cancelling"

    async def resume(self, principal: Principal, run_id: str, after_seq: int,
                     heartbeat_seconds: float) -> AsyncIterator[ResumeItem]:
        """Every event after `after_seq`, then the live run until its `end`. Watch first, then read
        the log, so nothing can fall between the replay and the live feed. A finished run is only
        read, never written: its resume replays what follows `after_seq` and ends. A store failure
        ends the stream with an `error` and an `end` notice (the run itself may go on: the client
        resumes later from its Last-Event-ID)."""
        record = await self.record_for(principal, run_id)
        handle = self._runs.get(run_id)
        watcher = self._runs.watch(handle) if handle is not None else None
        finished = False
        ids = RunIds(record.run_id, record.session_id, record.thread_id, record.trace_id)
        try:
            newest = await self._log.last_event(run_id)
            if newest is not None and newest.is_terminal and after_seq == newest.seq:
                finished = True
                return  # finished, and the client has its `end`: [DONE]
            async for item in self._resume(record, ids, watcher, newest, after_seq, heartbeat_seconds):
                yield item
                if item is not None and item.type is EventType.END:
                    finished = True
                    return
            # Every way through `_resume` ends with an `end` or raises: a stream never ends with a
            # [DONE] the client cannot tell from the run's end.
            raise StoreUnavailable("The run's resume ended before its end.")
        except StoreUnavailable as error:
            log.warning("resume of run %s stopped: %s", run_id, error.message)
            now = self._clock.timestamp()
            message = "Aura lost its connection to the event store; reconnect with Last-Event-ID to resume."
            yield Notice(EventType.ERROR, ids, now, {"errorType": error.code, "retryable": True, "message": message})
            yield Notice(EventType.END, ids, now, {"status": "failed", "reason": error.code, "message": message})
            finished = True  # this stream ended, not the run: not a disconnect
        finally:
            if watcher is not None and handle is not None:
                self._runs.release(handle, watcher, disconnected=not finished)

    async def _resume(self, record: RunRecord, ids: RunIds, watcher: Subscription[Event] | None,
                      newest: Event | None, after_seq: int, heartbeat_seconds: float) -> AsyncIterator[ResumeItem]:
        run_id = record.run_id
        if newest is not None and after_seq > newest.seq:
            # An id the log does not hold (a client's bookkeeping error, or events a dying Redis
            # master took with it): resume from the log's last event, or, when that is the run's
            # `end`, send it: the client cannot have it (its seq is not the one it names).
            log.info("resume of run %s from %d clamped to the log's last seq %d", run_id, after_seq, newest.seq)
            if newest.is_terminal:
                yield newest
                return
            after_seq = newest.seq
        last = after_seq
        first = await self._log.first_seq(run_id)
        if first is None or first > after_seq + 1:
            if first is not None or after_seq > 0 or record.status != "running":
                now = self._clock.timestamp()
                yield Notice(EventType.ERROR, ids, now, {
                    "errorType": "events_lost", "retryable": False,
                    "message": f"Events after {after_seq} are no longer retained; "
                               "a snapshot of the run's state follows."})
                handle = self._runs.get(run_id)
                snapshot = handle.run.snapshot() if handle else await self._directory.get_snapshot(run_id)
                yield Notice(EventType.SNAPSHOT, ids, now, snapshot or {"runId": run_id, "status": record.status})
            if first is not None:
                last = first - 1
        while True:
            batch = await self._log.read_after(run_id, last, REPLAY_BATCH)
            for event in batch:
                last = event.seq
                yield event
                if event.is_terminal:
                    return
            if len(batch) < REPLAY_BATCH:
                break
        if watcher is not None:
            try:
                while True:
                    live = await watcher.next(heartbeat_seconds)
                    if live is None:
                        yield None
                        continue
                    if live.seq <= last:
                        continue
                    last = live.seq
                    yield live
                    if live.is_terminal:
                        return
            except SubscriptionOverflow:
                pass  # too far behind, or the run was fenced here: the rest comes from the log
        current = await self._directory.get(run_id)
        if current is None or current.status != "running":
            yield await self._final_notice(run_id, ids, current)
            return
        async for item in self._follow_remote(record, last, heartbeat_seconds):
            yield item
            if isinstance(item, Event) and item.is_terminal:
                return
        # The follow ended without an `end`: the run's record was closed without one in its log.
        current = await self._directory.get(run_id)
        if current is None or current.status != "running":
            yield await self._final_notice(run_id, ids, current)
            return
        # A record still running here (read from another connection than the follow's, across a
        # failover): never a [DONE] without an `end`; the client reconnects and resumes.
        raise StoreUnavailable("The run's follow ended before its end.")

    async def _final_notice(self, run_id: str, ids: RunIds, current: RunRecord | None) -> Notice:
        """How a run ended whose log has no `end` after what the client has (the store refused
        the `end`, or the log expired): said rather than waited for, as the run's final record
        keeps it (its status, reason and message), else its snapshot; `unknown` only when neither
        says (both expired, or a record closed before it kept its `end`)."""
        if current is not None and current.end is not None:
            return Notice(EventType.END, ids, self._clock.timestamp(), current.end.data())
        snapshot = await self._directory.get_snapshot(run_id)
        end = RunEnd.from_data((snapshot or {}).get("end"))
        data = end.data() if end is not None else {
            "status": current.status if current else "failed", "reason": "unknown",
            "message": "The run ended; its final events are no longer retained."}
        return Notice(EventType.END, ids, self._clock.timestamp(), data)

    async def _follow_remote(self, record: RunRecord, last: int, heartbeat_seconds: float) -> AsyncIterator[ResumeItem]:
        """Follow a run owned by another instance (the follow counts as a reader for its owner,
        see `RunFollower`). An idle follow costs nothing here: when the owner stops, its lease
        lapses and the lost-run sweep of any instance (`watch_for_lost_runs`) declares the run
        lost, which logs the `error` run_lost and `end` every follower then reads."""
        idle_since = self._clock.now()
        async for event in self._follower.follow(record.run_id, last):
            if event is not None:
                idle_since = self._clock.now()
                yield event
                if event.is_terminal:
                    return
                continue
            if self._clock.now() - idle_since >= heartbeat_seconds:
                idle_since = self._clock.now()
                yield None

    async def declare_lost(self, record: RunRecord) -> bool:
        """Close a run whose owner stopped: its `error` run_lost and `end` logged, its record
        final, its slots freed and its pending approval cancelled, in one atomic step that
        applies only while the lease is absent and the log has no `end`. True when this call
        declared it."""
        ids = RunIds(record.run_id, record.session_id, record.thread_id, record.trace_id)
        message = "The instance running this run stopped; the run is lost. Please start it again."
        for _ in range(MAX_DECLARE_ATTEMPTS):
            newest = await self._log.last_event(record.run_id)
            if newest is not None and newest.is_terminal:
                return False
            last = newest.seq if newest is not None else 0
            now = self._clock.timestamp()
            error = Event(EventType.ERROR, last + 1, ids, now, {"errorType": "run_lost", "message": message,
                                                                "retryable": True})
            end_data = {"status": "failed", "reason": "run_lost", "message": message}
            end = Event(EventType.END, last + 2, ids, now, end_data)
            snapshot = await self._directory.get_snapshot(record.run_id)
            approval = None
            if snapshot is not None:
                pending = snapshot.get("pendingApproval")
                if isinstance(pending, dict) and self._approvals is not None:
                    stored = await self._approvals.read(str(pending.get("requestId")))
                    if stored is not None and stored.request.run_id == record.run_id:
                        if stored.request.status is ApprovalStatus.PENDING:
                            approval = (stored, stored.request.decide(ApprovalStatus.CANCELLED, by=None, at=now,
                                                                      reason="run_lost"))
                        else:
                            await settle_unheard_decision(self._approvals, stored, now)
                snapshot = {**snapshot, "status": "failed", "lastSeq": end.seq, "pendingApproval": None,
                            "end": end_data}
            outcome = await self._directory.declare_lost(LostRun(
                record=record, after_seq=last, error=error, end=end, snapshot=snapshot, approval=approval,
                retention_seconds=self._retention_seconds))
            if outcome == "moved":
                continue  # the log grew since it was read: the owner was alive after all, or is
            if outcome == "declared":
                log.warning("run %s lost: its owner %s stopped renewing the lease", record.run_id,
                            record.instance_id)
            return outcome == "declared"
        return False

    async def sweep_lost_runs(self, limit: int = 100) -> int:
        """Declare lost every run whose lease lapsed, whether or not anybody follows it; the
        number declared."""
        declared = 0
        for run_id in await self._directory.stale_runs(limit):
            record = await self._directory.get(run_id)
            if record is None or record.status != "running":
                continue
            if await self._directory.lease_holder(run_id) is None and await self.declare_lost(record):
                declared += 1
        return declared

    def watch_for_lost_runs(self, interval_seconds: float) -> None:
        """Sweep for lost runs every interval, in the background, until `aclose`."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep_forever(interval_seconds), name="lost-run sweeper")

    async def _sweep_forever(self, interval_seconds: float) -> None:
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.sweep_lost_runs()
            except StoreUnavailable:
                log.warning("could not look for lost runs")

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)


async def settle_unheard_decision(approvals: ApprovalStore, stored: StoredApproval, now: int) -> None:
    """A decision the run never heard (its instance stopped while it waited; Aura's API left the
    session record to that run): the session record follows it now, by the store's compare-and-set
    on the session (the follow-ups of a decision found already made), so a session that moved on
    is never changed. Done before the run is declared lost: a crash in between leaves the run to
    the next sweep, which does this again."""
    decided = stored.request
    await approvals.decide(decided.request_id, decided.status, decided_by=decided.decided_by,
                           decided_at=decided.decided_at or now, reason=decided.reason, expected=stored)
