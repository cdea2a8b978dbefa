"""Reaching a run from any instance: ownership checks, snapshots, cancel, resume."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from domain.agent import Agent
from domain.errors import InvalidInput, NotFound
from domain.events import Event, EventType, RunIds
from domain.identity import Principal
from domain.ports import Clock, ConversationStore, EventLog
from domain.run import RunRequest
from domain.runs import RunControl, RunDirectory, RunFollower, RunRecord
from domain.service import RunHandle, RunService, Subscription

log = logging.getLogger("aura.runs")

REPLAY_BATCH = 500


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


class IdempotencyKeyReused(InvalidInput):
    code = "idempotency_key_reused"


@dataclass(frozen=True, slots=True)
class Started:
    """A new run and its first watcher."""

    handle: RunHandle
    watcher: Subscription


@dataclass(frozen=True, slots=True)
class Attached:
    """A retried POST: the existing run, replayed from the client's Last-Event-ID."""

    run_id: str
    items: AsyncIterator[ResumeItem]


class RunAccess:
    def __init__(self, runs: RunService, directory: RunDirectory, event_log: EventLog, follower: RunFollower,
                 control: RunControl, clock: Clock, *,
                 conversations: ConversationStore | None = None) -> None:
        self._runs = runs
        self._conversations = conversations
        self._directory = directory
        self._log = event_log
        self._follower = follower
        self._control = control
        self._clock = clock

    async def start(self, principal: Principal, request: RunRequest, *, trace_id: str | None,
                    idempotency: tuple[str, str] | None = None, after_seq: int = 0,
                    heartbeat_seconds: float = 15.0, retention_seconds: int = 3600) -> Started | Attached:
        """Start a run, or, for an Idempotency-Key this user already used with the same body,
        attach to the run it started (a retried POST never runs the agent twice)."""
        ids = self._runs.new_ids(request, trace_id)
        if idempotency is not None:
            key, fingerprint = idempotency
            claim = await self._directory.claim_idempotency(principal.tenant_id, principal.user_id, key, ids.run_id,
                                                            fingerprint, retention_seconds)
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
            handle, watcher = await self._runs.start(principal, request, ids=ids, history=history)
        except BaseException:
            if idempotency is not None:
                await self._directory.release_idempotency(principal.tenant_id, principal.user_id, idempotency[0])
            raise
        return Started(handle, watcher)

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
        the log, so nothing can fall between the replay and the live feed."""
        record = await self.record_for(principal, run_id)
        handle = self._runs.get(run_id)
        watcher = self._runs.watch(handle) if handle is not None else None
        finished = False
        try:
            last = after_seq
            first = await self._log.first_seq(run_id)
            if first is None or first > after_seq + 1:
                ids = RunIds(record.run_id, record.session_id, record.thread_id, record.trace_id)
                now = self._clock.timestamp()
                yield Notice(EventType.ERROR, ids, now, {
                    "errorType": "events_lost", "retryable": False,
                    "message": f"Events after {after_seq} are no longer retained; "
                               "a snapshot of the run's state follows."})
                snapshot = handle.run.snapshot() if handle else await self._directory.get_snapshot(run_id)
                yield Notice(EventType.SNAPSHOT, ids, now, snapshot or {"runId": run_id, "status": record.status})
                if first is None:
                    finished = record.status != "running"
                    if finished or watcher is None:
                        return
                else:
                    last = first - 1
            while True:
                batch = await self._log.read_after(run_id, last, REPLAY_BATCH)
                for event in batch:
                    last = event.seq
                    yield event
                    if event.is_terminal:
                        finished = True
                        return
                if len(batch) < REPLAY_BATCH:
                    break
            if watcher is not None:
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
                        finished = True
                        return
            async for item in self._follow_remote(record, last, heartbeat_seconds):
                yield item
                if isinstance(item, Event) and item.is_terminal:
                    finished = True
                    return
        finally:
            if watcher is not None and handle is not None:
                self._runs.release(handle, watcher, disconnected=not finished)

    async def _follow_remote(self, record: RunRecord, last: int, heartbeat_seconds: float) -> AsyncIterator[ResumeItem]:
        """Follow a run owned by another instance; when its lease lapses without an `end`, the
        run is lost: log `error` run_lost and `end` so every follower learns the same."""
        idle_since = self._clock.now()
        async for event in self._follower.follow(record.run_id, last):
            if event is not None:
                idle_since = self._clock.now()
                last = event.seq
                yield event
                if event.is_terminal:
                    return
                continue
            if self._clock.now() - idle_since >= heartbeat_seconds:
                idle_since = self._clock.now()
                yield None
            if await self._directory.lease_holder(record.run_id) is None:
                await self._declare_lost(record, last)

    async def _declare_lost(self, record: RunRecord, last: int) -> None:
        ids = RunIds(record.run_id, record.session_id, record.thread_id, record.trace_id)
        now = self._clock.timestamp()
        message = "The instance running this run stopped; the run is lost. Please start it again."
        error = Event(EventType.ERROR, last + 1, ids, now, {"errorType": "run_lost", "message": message,
                                                            "retryable": True})
        end = Event(EventType.END, last + 2, ids, now, {"status": "failed", "reason": "run_lost", "message": message})
        if await self._follower.append_if_absent(error):
            await self._follower.append_if_absent(end)
            await self._directory.finish(record.run_id, "failed", 3600)
            log.warning("run %s lost: its owner %s stopped renewing the lease", record.run_id, record.instance_id)
