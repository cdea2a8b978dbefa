"""Hand-written fakes of the domain ports, for fast unit tests of the domain."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from domain.model.approval import ApprovalRequest, ApprovalStatus, Decider, DecisionResult, Signal, StoredApproval
from domain.model.chat import ChatRequest, ContentDelta, Finish, ModelChunk, ToolCallDelta
from domain.model.errors import RunStartsTooFrequent, StoreUnavailable, ToolFailure
from domain.model.events import Event
from domain.model.ports import (
    ApprovalStore,
    ChatModel,
    Clock,
    EventLog,
    IdFactory,
    SignalBus,
    SignalSubscription,
    StartRateLimiter,
)
from domain.model.runs import (
    IdempotencyClaim,
    LeaseRenewals,
    LostRun,
    RunControl,
    RunDirectory,
    RunEnd,
    RunFollower,
    RunRecord,
)
from domain.model.tools import Tool, ToolContext, ToolSpec


class FakeClock(Clock):
    def __init__(self, start: float = 1_767_000_000.0) -> None:
        self.value = start

    def now(self) -> float:
        return self.value


class SequentialIds(IdFactory):
    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._counter):032x}" if prefix else f"{next(self._counter):032x}"


class MemoryApprovalStore(ApprovalStore):
    """Requests in a dict. A decision with a signal publishes it on `bus` (when given), as the
    Redis store does in the same step; a failing publish leaves the decision standing. With
    `settles_sessions`, a decision given a `settled_signal` writes the session's record too and
    publishes that signal, as the Redis store does on one server; without, it leaves the session
    to the waiting run, as on a cluster."""

    def __init__(self, bus: MemorySignalBus | None = None, *, settles_sessions: bool = False) -> None:
        self.settles_sessions = settles_sessions
        self.requests: dict[str, ApprovalRequest] = {}
        self.decisions: list[tuple[str, ApprovalStatus, bool]] = []
        self.get_many_calls: list[list[str]] = []
        # Each session's record as the store holds it: the pending request's, then its decision.
        self.sessions: dict[str, ApprovalRequest] = {}
        self.bus = bus

    @staticmethod
    def _stored(request: ApprovalRequest) -> StoredApproval:
        return StoredApproval(request, json.dumps(request.to_record()).encode())

    async def create(self, request: ApprovalRequest) -> StoredApproval:
        self.requests[request.request_id] = request
        self.sessions[request.session_id] = request
        return self._stored(request)

    async def get(self, request_id: str) -> ApprovalRequest | None:
        return self.requests.get(request_id)

    async def read(self, request_id: str) -> StoredApproval | None:
        request = self.requests.get(request_id)
        return None if request is None else self._stored(request)

    async def get_many(self, request_ids: Sequence[str]) -> list[ApprovalRequest | None]:
        self.get_many_calls.append(list(request_ids))
        return [self.requests.get(request_id) for request_id in request_ids]

    async def decide(self, request_id: str, status: ApprovalStatus, *, decided_by: str | None,
                     decided_at: int, reason: str | None, expected: StoredApproval | None = None,
                     signal: Signal | None = None, decider: Decider | None = None,
                     settled_signal: Signal | None = None) -> DecisionResult | None:
        # Like the Redis store: a stale `expected` only costs a retry there, so the outcome
        # depends on the current state alone.
        assert expected is None or expected.request.request_id == request_id
        current = self.requests.get(request_id)
        if current is None:
            return None
        if current.status.is_decided or (decider is not None and not decider.may_decide(current, decided_at)):
            self.decisions.append((request_id, status, False))
            if current.status.is_decided:  # like the Redis store: the follow-ups of a decision run again
                self._follow_session(current)
            return DecisionResult(False, current)
        decided = current.decide(status, by=decided_by, at=decided_at, reason=reason)
        self.requests[request_id] = decided
        # Like the Redis store: a decision with a signal writes the session's record too when it
        # settles sessions and is given the signal sealed as such (a plain SET XX), and publishes
        # that one, else leaves the session to the waiting run; one without updates it while it is
        # still this request's pending record.
        if signal is None:
            self._follow_session(decided)
        elif settled_signal is not None and self.settles_sessions:
            signal = settled_signal
            if decided.session_id in self.sessions:
                self.sessions[decided.session_id] = decided
        self.decisions.append((request_id, status, True))
        signalled = False
        if signal is not None and self.bus is not None:
            try:
                await self.bus.publish(decided.session_id, signal)
                signalled = True
            except StoreUnavailable:
                pass
        return DecisionResult(True, decided, signalled)

    def _follow_session(self, decided: ApprovalRequest) -> None:
        """The session record becomes the decision only while it is this request's pending one."""
        session = self.sessions.get(decided.session_id)
        if session is not None and session.request_id == decided.request_id \
                and session.status is ApprovalStatus.PENDING:
            self.sessions[decided.session_id] = decided

    async def settle_session(self, decided: ApprovalRequest) -> None:
        self._follow_session(decided)

    async def pending_for_user(self, tenant_id: str, user_id: str) -> list[ApprovalRequest]:
        return [r for r in self.requests.values()
                if r.tenant_id == tenant_id and r.user_id == user_id and r.status is ApprovalStatus.PENDING]


class _QueueSubscription(SignalSubscription):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | bytes] = asyncio.Queue()

    async def next_message(self) -> str | bytes:
        return await self.queue.get()


class MemorySignalBus(SignalBus):
    """Delivers published signals to live subscribers; `on_subscribe` lets a test act at the
    moment a run starts waiting (e.g. approve it). A test that needs other subscriptions sets
    `subscription_class`."""

    subscription_class: type[_QueueSubscription] = _QueueSubscription

    def __init__(self) -> None:
        self.stored: dict[str, str] = {}
        self.subscribers: dict[str, list[_QueueSubscription]] = defaultdict(list)
        self.on_subscribe: Callable[[str], Any] | None = None
        self.subscribe_count = 0

    @asynccontextmanager
    async def subscribe(self, session_id: str) -> AsyncIterator[SignalSubscription]:
        subscription = self.subscription_class()
        self.subscribers[session_id].append(subscription)
        self.subscribe_count += 1
        try:
            yield subscription
        finally:
            self.subscribers[session_id].remove(subscription)
            if not self.subscribers[session_id]:
                del self.subscribers[session_id]

    async def publish(self, session_id: str, signal: Signal) -> int:
        return await self.publish_raw(session_id, signal.to_json())

    async def publish_raw(self, session_id: str, raw: str, *, store: bool = True) -> int:
        if store:
            self.stored[session_id] = raw
        receivers = list(self.subscribers.get(session_id, []))
        for subscription in receivers:
            subscription.queue.put_nowait(raw)
        return len(receivers)

    async def latest(self, session_id: str) -> str | bytes | None:
        return self.stored.get(session_id)


class MemoryEventLog(EventLog):
    def __init__(self) -> None:
        self.events: dict[str, list[Event]] = defaultdict(list)
        self.snapshots: dict[str, Mapping[str, Any]] = {}
        self.closed: set[str] = set()

    def submit(self, event: Event, snapshot: Mapping[str, Any] | None,
               logged: Callable[[Exception | None], None]) -> None:
        log = self.events[event.ids.run_id]
        if not log or event.seq > log[-1].seq:
            log.append(event)
            if snapshot is not None:
                self.snapshots[event.ids.run_id] = snapshot
        logged(None)

    async def read_after(self, run_id: str, after_seq: int, limit: int = 500) -> Sequence[Event]:
        return [e for e in self.events.get(run_id, []) if e.seq > after_seq][:limit]

    async def first_seq(self, run_id: str) -> int | None:
        log = self.events.get(run_id)
        return log[0].seq if log else None

    async def last_event(self, run_id: str) -> Event | None:
        log = self.events.get(run_id)
        return log[-1] if log else None

    def trim(self, run_id: str, keep_from_seq: int) -> None:
        self.events[run_id] = [e for e in self.events[run_id] if e.seq >= keep_from_seq]

    async def close_run(self, run_id: str) -> None:
        self.closed.add(run_id)


class MemoryRunDirectory(RunDirectory):
    def __init__(self, log: MemoryEventLog) -> None:
        self.records: dict[str, RunRecord] = {}
        self.leases: dict[str, str] = {}
        self.idempotency: dict[tuple[str, str, str], IdempotencyClaim] = {}
        self.slots: dict[str, set[str]] = defaultdict(set)
        self._log = log
        self.approvals: MemoryApprovalStore | None = None
        self.readers: set[str] = set()
        self.reader_checks: list[str] = []  # the runs `has_reader` was asked about, in order
        self.renewals: list[list[str]] = []  # the runs each renewal was asked about (`read_elsewhere`)

    async def get(self, run_id: str) -> RunRecord | None:
        return self.records.get(run_id)

    async def finish(self, run_id: str, status: str, retention_seconds: int, end: RunEnd | None = None) -> None:
        if run_id in self.records:
            self.records[run_id] = replace(self.records[run_id], status=status, end=end)
        self.leases.pop(run_id, None)

    async def renew_leases(self, run_ids: list[str], instance_id: str, lease_seconds: float,
                           read_elsewhere: Collection[str] = ()) -> LeaseRenewals:
        lost = [run_id for run_id in run_ids if self.leases.get(run_id) != instance_id]
        self.renewals.append(list(read_elsewhere))
        return LeaseRenewals(lost=lost, unread={run_id: 0.0 for run_id in read_elsewhere
                                                if run_id not in lost and run_id not in self.readers})

    async def lease_holder(self, run_id: str) -> str | None:
        return self.leases.get(run_id)

    async def claim_idempotency(self, tenant_id: str, user_id: str, key: str, run_id: str, fingerprint: str,
                                ttl_seconds: int) -> IdempotencyClaim | None:
        existing = self.idempotency.get((tenant_id, user_id, key))
        if existing is None:
            self.idempotency[(tenant_id, user_id, key)] = IdempotencyClaim(run_id, fingerprint)
        return existing

    async def release_idempotency(self, tenant_id: str, user_id: str, key: str) -> None:
        self.idempotency.pop((tenant_id, user_id, key), None)

    async def admit(self, record: RunRecord, *, user_limit: int, tenant_limit: int, slot_seconds: float,
                    lease_seconds: float, starts: StartRateLimiter | None = None) -> str | None:
        if starts is not None and (wait := await starts.admit(record.tenant_id, record.user_id)) is not None:
            raise RunStartsTooFrequent(wait)
        user, tenant = f"user:{record.tenant_id}:{record.user_id}", f"tenant:{record.tenant_id}"
        if len(self.slots[user]) >= user_limit:
            return "user"
        if len(self.slots[tenant]) >= tenant_limit:
            return "tenant"
        self.slots[user].add(record.run_id)
        self.slots[tenant].add(record.run_id)
        self.records[record.run_id] = record
        self.leases[record.run_id] = record.instance_id
        return None

    async def close(self, record: RunRecord, status: str, retention_seconds: int, end: RunEnd | None = None) -> bool:
        if self.leases.get(record.run_id) != record.instance_id:
            return False
        await self.finish(record.run_id, status, retention_seconds, end)
        self._free(record)
        return True

    def _free(self, record: RunRecord) -> None:
        self.slots[f"user:{record.tenant_id}:{record.user_id}"].discard(record.run_id)
        self.slots[f"tenant:{record.tenant_id}"].discard(record.run_id)

    async def declare_lost(self, lost: LostRun) -> str:
        run_id = lost.record.run_id
        if run_id in self.leases:
            return "alive"
        current = self.records.get(run_id)
        log = self._log.events[run_id]
        if current is None or current.status != "running" or (log and log[-1].is_terminal):
            return "finished"
        if (log[-1].seq if log else 0) != lost.after_seq:
            return "moved"
        log += [lost.error, lost.end]
        self.records[run_id] = replace(current, status="failed", end=RunEnd.from_data(lost.end.data))
        if lost.snapshot is not None:
            self._log.snapshots[run_id] = lost.snapshot
        self._free(current)
        if lost.approval is not None and self.approvals is not None:
            stored, cancelled = lost.approval
            if self.approvals.requests.get(cancelled.request_id) == stored.request:
                self.approvals.requests[cancelled.request_id] = cancelled
        return "declared"

    async def stale_runs(self, limit: int) -> list[str]:
        return [run_id for run_id, record in self.records.items()
                if record.status == "running" and run_id not in self.leases][:limit]

    async def note_reader(self, run_id: str, ttl_seconds: float) -> None:
        self.readers.add(run_id)

    async def has_reader(self, run_id: str) -> bool:
        self.reader_checks.append(run_id)
        return run_id in self.readers

    async def save_snapshot(self, run_id: str, snapshot: Mapping[str, Any], ttl_seconds: int) -> None:
        self._log.snapshots[run_id] = snapshot

    async def get_snapshot(self, run_id: str) -> dict[str, Any] | None:
        snapshot = self._log.snapshots.get(run_id)
        return None if snapshot is None else dict(snapshot)


class LogPollingFollower(RunFollower):
    """Follows the memory log by polling it; yields None when nothing new arrived."""

    def __init__(self, log: MemoryEventLog) -> None:
        self._log = log

    async def follow(self, run_id: str, after_seq: int) -> AsyncIterator[Event | None]:
        last = after_seq
        while True:
            batch = await self._log.read_after(run_id, last)
            if not batch:
                await asyncio.sleep(0.001)
                yield None
                continue
            for event in batch:
                last = event.seq
                yield event



class RecordingControl(RunControl):
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []

    async def request_cancel(self, instance_id: str, run_id: str, reason: str) -> None:
        self.requests.append((instance_id, run_id, reason))


Script = Callable[[ChatRequest], list[ModelChunk]]


class ScriptedModel(ChatModel):
    """Answers each request with the next scripted list of chunks, and records the requests."""

    def __init__(self, *turns: list[ModelChunk] | Script) -> None:
        self.turns = list(turns)
        self.requests: list[ChatRequest] = []

    async def stream(self, request: ChatRequest) -> AsyncIterator[ModelChunk]:
        self.requests.append(request)
        if not self.turns:
            raise AssertionError(f"unexpected model call #{len(self.requests)} ({request.purpose})")
        turn = self.turns.pop(0)
        chunks = turn(request) if callable(turn) else turn
        for chunk in chunks:
            if isinstance(chunk, Exception):
                raise chunk
            yield chunk


def text(*parts: str) -> list[ModelChunk]:
    return [*(ContentDelta(p) for p in parts), Finish("stop")]


def tool_call(name: str, arguments: str, call_id: str = "call_1", index: int = 0) -> list[ModelChunk]:
    return [ToolCallDelta(index=index, id=call_id, name=name, arguments=arguments), Finish("tool_calls")]


def tool_calls(*calls: tuple[str, str, str]) -> list[ModelChunk]:
    chunks: list[ModelChunk] = [ToolCallDelta(index=i, id=cid, name=name, arguments=args)
                                for i, (name, args, cid) in enumerate(calls)]
    return [*chunks, Finish("tool_calls")]


class RecordingTool(Tool):
    """A tool that records its calls and returns (or raises) what the test says."""

    def __init__(self, name: str, *, requires_approval: bool = False, result: Any = None,
                 failure: str | None = None) -> None:
        self.spec = ToolSpec(
            name=name, description=f"test tool {name}",
            parameters={"type": "object", "properties": {"value": {"type": "string", "default": "x"}},
                        "additionalProperties": False},
            requires_approval=requires_approval, action_type=name if requires_approval else "read",
        )
        self.calls: list[Mapping[str, Any]] = []
        self._result = result if result is not None else {"summary": f"{name} ok"}
        self._failure = failure

    async def run(self, args: Mapping[str, Any], context: ToolContext) -> Any:
        self.calls.append(dict(args))
        if self._failure:
            raise ToolFailure(self._failure, code="tool_failed")
        return self._result


def decided(request: ApprovalRequest, status: ApprovalStatus) -> ApprovalRequest:
    return replace(request, status=status)
