"""What the cluster knows about a run: its record, owner lease, idempotency keys and slots.

A run lives in one process (its owner); every other instance learns about it from the run
directory and follows it through the event log."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from domain.model.approval import ApprovalRequest, StoredApproval
from domain.model.events import Event
from domain.model.ports import StartRateLimiter


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: str
    session_id: str
    thread_id: str
    trace_id: str
    tenant_id: str
    user_id: str
    instance_id: str
    created_at: int
    status: str = "running"
    fingerprint: str = ""  # a hash of the request that started the run ("" when not known)
    # How the run ended (its `end` event's data: status, reason, message), kept with the final
    # record: the one place that says it when the `end` itself never reached the log.
    end: RunEnd | None = None

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "runId": self.run_id, "sessionId": self.session_id, "threadId": self.thread_id,
            "traceId": self.trace_id, "tenantId": self.tenant_id, "userId": self.user_id,
            "instanceId": self.instance_id, "createdAt": self.created_at, "status": self.status}
        if self.fingerprint:
            record["fingerprint"] = self.fingerprint
        if self.end is not None:
            record["end"] = self.end.data()
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RunRecord:
        return cls(run_id=str(record["runId"]), session_id=str(record["sessionId"]),
                   thread_id=str(record["threadId"]), trace_id=str(record["traceId"]),
                   tenant_id=str(record["tenantId"]), user_id=str(record["userId"]),
                   instance_id=str(record["instanceId"]), created_at=int(record["createdAt"]),
                   status=str(record.get("status", "running")), fingerprint=str(record.get("fingerprint", "")),
                   end=RunEnd.from_data(record.get("end")))


@dataclass(frozen=True, slots=True)
class RunEnd:
    """A run's `end`: its final status, the reason code (`completed`, an error code such as
    `store_unavailable`, `run_lost`, `user_cancelled`, ...) and the message its client is shown."""

    status: str
    reason: str
    message: str

    def data(self) -> dict[str, str]:
        return {"status": self.status, "reason": self.reason, "message": self.message}

    @classmethod
    def from_data(cls, data: object) -> RunEnd | None:
        """None for anything but the three strings (a record written before they were kept)."""
        if not isinstance(data, Mapping):
            return None
        fields = (data.get("status"), data.get("reason"), data.get("message"))
        if not all(isinstance(value, str) for value in fields):
            return None
        return cls(*fields)  # type: ignore[arg-type]  # three strings, checked above


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """The run already bound to an idempotency key, and the fingerprint of the body that made it."""

    run_id: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class LostRun:
    """What declaring a run lost writes, all in one atomic step: its closing `error` and `end` right
    after `after_seq` (the log's last seq when the declaration was prepared), its final record and
    snapshot, and its pending approval cancelled (the stored form it must still have, and the
    cancelled request)."""

    record: RunRecord
    after_seq: int
    error: Event
    end: Event
    snapshot: Mapping[str, Any] | None
    approval: tuple[StoredApproval, ApprovalRequest] | None
    retention_seconds: int


@dataclass(frozen=True, slots=True)
class LeaseRenewals:
    """What one renewal of an owner's leases found."""

    # the runs whose lease is no longer this instance's: it must stop them
    lost: list[str] = field(default_factory=list)
    # of the runs asked about (`read_elsewhere`), those nobody reads on another instance any more,
    # each with the seconds since a reader was last known there (0 when a follow just ended; for a
    # follower process that died, the time since its last sign of life)
    unread: dict[str, float] = field(default_factory=dict)


class RunDirectory(ABC):
    @abstractmethod
    async def get(self, run_id: str) -> RunRecord | None: ...

    @abstractmethod
    async def renew_leases(self, run_ids: list[str], instance_id: str, lease_seconds: float,
                           read_elsewhere: Collection[str] = ()) -> LeaseRenewals:
        """Extend the leases that still name `instance_id` (compare and set, never a blind write);
        report the runs whose lease is no longer this instance's, and which of the runs in
        `read_elsewhere` (runs kept for a reader on another instance) no longer have one. The
        report rides on the renewal: no command of its own per run."""

    @abstractmethod
    async def lease_holder(self, run_id: str) -> str | None: ...

    @abstractmethod
    async def claim_idempotency(self, tenant_id: str, user_id: str, key: str, run_id: str, fingerprint: str,
                                ttl_seconds: int) -> IdempotencyClaim | None:
        """Bind the key to `run_id` unless it is bound already; then return the existing binding."""

    @abstractmethod
    async def release_idempotency(self, tenant_id: str, user_id: str, key: str) -> None:
        """Unbind a key whose run could not start, so a retry may start it."""

    @abstractmethod
    async def admit(self, record: RunRecord, *, user_limit: int, tenant_limit: int, slot_seconds: float,
                    lease_seconds: float, starts: StartRateLimiter | None = None) -> str | None:
        """Count the run against its user's and tenant's concurrent runs and, when admitted,
        record it with its owner lease, in one atomic step. None when admitted, else which limit
        ("user" or "tenant") is full. With `starts`, the start is counted against the user's
        start rate first (in the same round trip where the store can) and refused with
        RunStartsTooFrequent when over it; a refused start takes no slot."""

    @abstractmethod
    async def close(self, record: RunRecord, status: str, retention_seconds: int, end: RunEnd | None = None) -> bool:
        """The owner's run ended: record its final status (and `end`, how it ended) for the
        retention time, drop its lease and release its slots, in one step, only while the lease is
        still the owner's (False when it is not: the run was, or will be, declared lost, and that
        declaration closes it)."""

    @abstractmethod
    async def declare_lost(self, lost: LostRun) -> str:
        """Close a run whose owner stopped, in one atomic step, only while its lease is absent, its
        log has no `end` and its last seq is still `lost.after_seq`. Returns "declared", "alive"
        (the lease exists), "finished" (the log has its `end`, or the record is final or gone) or
        "moved" (the log grew since: prepare again)."""

    @abstractmethod
    async def stale_runs(self, limit: int) -> list[str]:
        """Runs recorded as running whose lease should have been renewed by now: candidates for
        `declare_lost`, found whether or not anybody follows them."""

    @abstractmethod
    async def note_reader(self, run_id: str, ttl_seconds: float) -> None:
        """Someone reads the run through this instance (not its owner): for `ttl_seconds`, its
        owner must not cancel it for want of a reader."""

    @abstractmethod
    async def has_reader(self, run_id: str) -> bool:
        """Whether another instance noted a reader of the run within its time to live."""

    @abstractmethod
    async def save_snapshot(self, run_id: str, snapshot: Mapping[str, Any], ttl_seconds: int) -> None: ...

    @abstractmethod
    async def get_snapshot(self, run_id: str) -> dict[str, Any] | None: ...


class RunFollower(ABC):
    """Follows another instance's run through the event log."""

    @abstractmethod
    def follow(self, run_id: str, after_seq: int) -> AsyncIterator[Event | None]:
        """Events after `after_seq` as they are logged; yields None now and then while nothing
        comes (so the caller can send a heartbeat). While it is open the run has a reader here
        (`RunDirectory.has_reader`): its owner does not cancel it for want of one."""


class RunControl(ABC):
    """Tells the instance that owns a run to cancel it."""

    @abstractmethod
    async def request_cancel(self, instance_id: str, run_id: str, reason: str) -> None: ...
