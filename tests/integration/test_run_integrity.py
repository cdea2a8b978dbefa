"""A run's log and record stay true whoever writes: a finished run's log takes nothing more, an
owner without its lease writes nothing, a different event at a logged seq is refused, and a lost
run is closed in one atomic step (error and end logged, record final, slots freed, approval
cancelled). Exact keys and values, on fakeredis and a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from adapters.redis.approvals import RedisApprovalStore
from adapters.redis.approvals import encode_json as json_bytes
from adapters.redis.events import RedisEventLog
from adapters.redis.runs import RedisRunDirectory
from domain.model.approval import ApprovalRequest, ApprovalStatus, Decider, Signal
from domain.model.errors import RunFenced
from domain.model.events import Event, EventType, RunIds
from domain.model.runs import RunRecord
from domain.services.access import RunAccess
from tests.defaults import DEFAULTS, EVENT_LOG, run_directory
from tests.unit.fakes import FakeClock, LogPollingFollower, MemoryEventLog, RecordingControl

IDS = RunIds("run_a", "ses_a", "thr_a", "t" * 32)
RECORD = RunRecord(run_id="run_a", session_id="ses_a", thread_id="thr_a", trace_id="t" * 32, tenant_id="acme",
                   user_id="alice", instance_id="aura-a", created_at=1767000000)


def event(seq: int, type_: EventType = EventType.CONTENT, text: str = "") -> Event:
    data: dict[str, Any] = {"content": text or f"c{seq}", "chunk": True}
    if type_ is EventType.END:
        data = {"status": "completed", "reason": "completed", "message": "The run completed."}
    return Event(type_, seq, IDS, 1767000000 + seq, data)


@pytest.fixture
async def owner_log(redis_client: Redis) -> AsyncIterator[RedisEventLog]:
    log = RedisEventLog(redis_client, max_length=DEFAULTS.events.max_length, retention_seconds=60,
                        active_ttl_seconds=600, owner="aura-a")
    try:
        yield log
    finally:
        await log.aclose()


async def admit(directory: RedisRunDirectory, lease_seconds: float = 15) -> None:
    assert await directory.admit(RECORD, user_limit=5, tenant_limit=5, slot_seconds=900,
                                 lease_seconds=lease_seconds) is None


async def seqs(redis_client: Redis) -> list[bytes]:
    return [entry_id for entry_id, _ in await redis_client.xrange("aura:run:{run_a}:events")]


async def test_a_finished_runs_log_refuses_every_later_append(redis_client: Redis, owner_log: RedisEventLog) -> None:
    await admit(run_directory(redis_client))
    await owner_log.append(event(1))
    await owner_log.append(event(2, EventType.END))
    ended = await redis_client.xrange("aura:run:{run_a}:events")
    assert ended[-1][1] == {b"e": ended[-1][1][b"e"], b"t": b"1"}  # the terminal entry is marked
    with pytest.raises(RunFenced, match="already ended"):
        await owner_log.append(event(3))
    # another instance (no lease check) cannot append either
    other = RedisEventLog(redis_client, **EVENT_LOG)
    with pytest.raises(RunFenced, match="already ended"):
        await other.append(event(3, EventType.ERROR))
    await other.aclose()
    assert await seqs(redis_client) == [b"1-1", b"2-1"]
    assert await owner_log.last_event("run_a") == event(2, EventType.END)


async def test_an_owner_whose_lease_is_gone_or_someone_elses_writes_nothing(
        redis_client: Redis, owner_log: RedisEventLog) -> None:
    await admit(run_directory(redis_client))
    await owner_log.append(event(1))
    await redis_client.set("aura:run:{run_a}:lease", "aura-b")
    with pytest.raises(RunFenced, match="no longer holds"):
        await owner_log.append(event(2), {"lastSeq": 2})
    await redis_client.delete("aura:run:{run_a}:lease")
    with pytest.raises(RunFenced):  # fenced for good: nothing more is even sent
        await owner_log.append(event(3))
    assert await seqs(redis_client) == [b"1-1"]
    assert await redis_client.get("aura:run:{run_a}:snapshot") is None


async def test_a_different_event_at_a_logged_seq_fails_loudly_and_the_same_one_is_already_logged(
        redis_client: Redis, owner_log: RedisEventLog) -> None:
    await admit(run_directory(redis_client))
    await owner_log.append(event(1))
    await owner_log.append(event(1))  # a retried append of the same bytes: already logged
    with pytest.raises(RunFenced, match="Another event"):
        await owner_log.append(event(1, text="something else"))
    assert [orjson.loads(fields[b"e"])["data"]["content"]
            for _, fields in await redis_client.xrange("aura:run:{run_a}:events")] == ["c1"]


async def submit_all(log: RedisEventLog, events: list[Event]) -> list[str | None]:
    """`events` appended in one batch (all queued before the log writes); each one's outcome."""
    reports: list[str | None] = []
    for item in events[:-1]:
        log.submit(item, None, lambda error: reports.append(None if error is None else str(error)))
    try:
        await log.append(events[-1])
        reports.append(None)
    except RunFenced as refused:
        reports.append(str(refused))
    return reports


async def test_a_refused_event_ends_its_runs_batch_and_nothing_after_it_is_logged(
        redis_client: Redis, owner_log: RedisEventLog) -> None:
    """One script call appends a run's events of a batch: a retried one is recognised, a colliding
    one refused, and none after the refused one is logged (the log would hold an event after a
    hole)."""
    await admit(run_directory(redis_client))
    await owner_log.append(event(1))
    await owner_log.append(event(2))
    collision = "Another event is logged at this seq."
    assert await submit_all(owner_log, [event(1), event(2, text="other"), event(3)]) == [None, collision, collision]
    assert await seqs(redis_client) == [b"1-1", b"2-1"]
    with pytest.raises(RunFenced):  # the run is fenced: nothing more is sent for it
        await owner_log.append(event(4))
    assert await seqs(redis_client) == [b"1-1", b"2-1"]


async def test_a_retried_batch_is_recognised_and_completed(redis_client: Redis, owner_log: RedisEventLog) -> None:
    await admit(run_directory(redis_client))
    await owner_log.append(event(1))
    await owner_log.append(event(2))
    reports = []
    for seq in (1, 2, 3):
        owner_log.submit(event(seq), {"lastSeq": seq},
                         lambda error: reports.append(None if error is None else str(error)))
    await owner_log.append(event(4), {"lastSeq": 4})
    assert reports == [None, None, None]
    assert await seqs(redis_client) == [b"1-1", b"2-1", b"3-1", b"4-1"]
    assert orjson.loads(await redis_client.get("aura:run:{run_a}:snapshot")) == {"lastSeq": 4}


async def test_an_end_in_a_batch_closes_the_log_to_the_events_after_it(
        redis_client: Redis, owner_log: RedisEventLog) -> None:
    await admit(run_directory(redis_client))
    assert await submit_all(owner_log, [event(1), event(2, EventType.END), event(3)]) == [
        None, None, "The run already ended; nothing more is logged for it."]
    assert await seqs(redis_client) == [b"1-1", b"2-1"]
    assert 50 < await redis_client.ttl("aura:run:{run_a}:events") <= 60  # the end's retention


async def test_a_fenced_owners_batch_logs_nothing_and_writes_no_snapshot(
        redis_client: Redis, owner_log: RedisEventLog) -> None:
    await admit(run_directory(redis_client))
    await owner_log.append(event(1))
    await redis_client.set("aura:run:{run_a}:lease", "aura-b")
    fenced = "This instance no longer holds the run's lease."
    owner_log.submit(event(2), {"lastSeq": 2}, lambda _: None)
    assert await submit_all(owner_log, [event(3)]) == [fenced]
    assert await seqs(redis_client) == [b"1-1"]
    assert await redis_client.get("aura:run:{run_a}:snapshot") is None


async def test_lease_renewal_is_compare_and_set(redis_client: Redis) -> None:
    directory = run_directory(redis_client)
    await admit(directory, lease_seconds=1)
    assert (await directory.renew_leases(["run_a"], "aura-a", 20)).lost == []
    assert 19_000 < await redis_client.pttl("aura:run:{run_a}:lease") <= 20_000
    await redis_client.delete("aura:run:{run_a}:lease")  # lapsed (or declared lost)
    assert (await directory.renew_leases(["run_a"], "aura-a", 20)).lost == ["run_a"]
    assert await redis_client.exists("aura:run:{run_a}:lease") == 0  # never re-created
    await redis_client.set("aura:run:{run_a}:lease", "aura-b")
    assert (await directory.renew_leases(["run_a"], "aura-a", 20)).lost == ["run_a"]
    assert await redis_client.get("aura:run:{run_a}:lease") == b"aura-b"


async def test_close_by_an_owner_without_its_lease_changes_nothing(redis_client: Redis) -> None:
    directory = run_directory(redis_client)
    await admit(directory)
    await redis_client.delete("aura:run:{run_a}:lease")
    assert await directory.close(RECORD, "completed", 60) is False
    assert orjson.loads(await redis_client.get("aura:run:{run_a}:meta"))["status"] == "running"
    assert await redis_client.zrange("aura:slots:{acme}:user:alice", 0, -1) == [b"run_a"]


def pending_request() -> ApprovalRequest:
    return ApprovalRequest(request_id="req_1", session_id="ses_a", run_id="run_a", action_type="git_commit",
                           tool_name="git_commit", message="Commit?", context={}, user_id="alice", tenant_id="acme",
                           created_at=1767000000, expires_at=1767001800)


async def access_over(redis_client: Redis) -> tuple[RunAccess, RedisRunDirectory, RedisApprovalStore]:
    directory = run_directory(redis_client)
    approvals = RedisApprovalStore(redis_client)
    log = RedisEventLog(redis_client, max_length=DEFAULTS.events.max_length, retention_seconds=60,
                        active_ttl_seconds=DEFAULTS.events.active_ttl_seconds)
    access = RunAccess(runs=None, directory=directory, event_log=log,  # type: ignore[arg-type]
                       follower=LogPollingFollower(MemoryEventLog()), control=RecordingControl(),
                       clock=FakeClock(1767000100.0), approvals=approvals, retention_seconds=60)
    return access, directory, approvals


async def test_declaring_a_lost_run_closes_everything_at_once_and_only_when_the_owner_stopped(
        redis_client: Redis, owner_log: RedisEventLog) -> None:
    access, directory, approvals = await access_over(redis_client)
    await admit(directory)
    await approvals.create(pending_request())
    await owner_log.append(event(1))
    await owner_log.append(event(2, EventType.HITL), {"status": "waiting_approval", "lastSeq": 2,
                                                       "pendingApproval": {"requestId": "req_1"}, "end": None})
    assert await directory.stale_runs(10) == []
    assert await access.declare_lost(RECORD) is False  # the lease is there: the owner is alive
    assert await seqs(redis_client) == [b"1-1", b"2-1"]

    await redis_client.delete("aura:run:{run_a}:lease")
    await redis_client.zadd("aura:runs:active", {"run_a": 0})  # its lease deadline passed
    assert await directory.stale_runs(10) == ["run_a"]
    assert await access.sweep_lost_runs() == 1
    entries = await redis_client.xrange("aura:run:{run_a}:events")
    assert [entry_id for entry_id, _ in entries] == [b"1-1", b"2-1", b"3-1", b"4-1"]
    error, end = (orjson.loads(fields[b"e"]) for _, fields in entries[2:])
    message = "The instance running this run stopped; the run is lost. Please start it again."
    assert (error["type"], error["seq"], error["data"]) == (
        "error", 3, {"errorType": "run_lost", "message": message, "retryable": True})
    assert (end["type"], end["seq"], end["data"]) == (
        "end", 4, {"status": "failed", "reason": "run_lost", "message": message})
    assert entries[3][1][b"t"] == b"1"
    assert orjson.loads(await redis_client.get("aura:run:{run_a}:meta")) == {
        **RECORD.to_record(), "status": "failed",
        "end": {"status": "failed", "reason": "run_lost", "message": message}}
    assert 50 < await redis_client.ttl("aura:run:{run_a}:meta") <= 60
    assert orjson.loads(await redis_client.get("aura:run:{run_a}:snapshot")) == {
        "status": "failed", "lastSeq": 4, "pendingApproval": None,
        "end": {"status": "failed", "reason": "run_lost", "message": message}}
    assert await redis_client.zcard("aura:slots:{acme}:user:alice") == 0
    assert await redis_client.zcard("aura:slots:{acme}:tenant") == 0
    assert await redis_client.zcard("aura:runs:active") == 0
    cancelled = await approvals.get("req_1")
    assert cancelled is not None
    assert (cancelled.status, cancelled.reason, cancelled.decided_at) == (ApprovalStatus.CANCELLED, "run_lost",
                                                                           1767000100)
    assert await approvals.pending_for_user("acme", "alice") == []
    assert orjson.loads(await redis_client.get("hitl:session:ses_a"))["status"] == "cancelled"

    # once declared, nobody writes after the end: a second declaration, the old owner
    assert await access.declare_lost(RECORD) is False
    await redis_client.set("aura:run:{run_a}:lease", "aura-a")  # even if it somehow had its lease again
    with pytest.raises(RunFenced):
        await owner_log.append(event(3))
    assert await seqs(redis_client) == [b"1-1", b"2-1", b"3-1", b"4-1"]


async def test_a_lost_run_settles_the_session_of_an_api_decision_it_never_heard(
        redis_client: Redis, owner_log: RedisEventLog) -> None:
    # The run's instance stopped while it waited; Aura's API (another instance) decided the request
    # and left the session record to that run, which will never write it: the sweep does.
    access, directory, approvals = await access_over(redis_client)
    await admit(directory)
    request = pending_request()
    await approvals.create(request)
    await owner_log.append(event(1))
    await owner_log.append(event(2, EventType.HITL), {"status": "waiting_approval", "lastSeq": 2,
                                                       "pendingApproval": {"requestId": "req_1"}, "end": None})
    result = await approvals.decide("req_1", ApprovalStatus.APPROVED, decided_by="alice", decided_at=1767000050,
                                    reason="ok", signal=Signal.approval("req_1", "alice", 1767000050),
                                    decider=Decider("acme", "alice", approver=False))
    assert result is not None and result.applied
    assert orjson.loads(await redis_client.get("hitl:session:ses_a"))["status"] == "pending"  # left to the run
    session_ttl = await redis_client.ttl("hitl:session:ses_a")

    await redis_client.delete("aura:run:{run_a}:lease")
    await redis_client.zadd("aura:runs:active", {"run_a": 0})
    assert await access.sweep_lost_runs() == 1
    assert await redis_client.get("hitl:session:ses_a") == json_bytes(result.request.session_record())
    assert orjson.loads(await redis_client.get("hitl:session:ses_a"))["status"] == "approved"
    assert session_ttl - 2 <= await redis_client.ttl("hitl:session:ses_a") <= session_ttl  # its TTL kept
    decided = await approvals.get("req_1")
    assert decided is not None and (decided.status, decided.decided_by, decided.reason) == (
        ApprovalStatus.APPROVED, "alice", "ok")  # the decision stands, untouched


async def test_a_lost_run_leaves_alone_a_session_that_moved_on(redis_client: Redis, owner_log: RedisEventLog) -> None:
    access, directory, approvals = await access_over(redis_client)
    await admit(directory)
    await approvals.create(pending_request())
    await owner_log.append(event(1, EventType.HITL), {"status": "waiting_approval", "lastSeq": 1,
                                                       "pendingApproval": {"requestId": "req_1"}, "end": None})
    await approvals.decide("req_1", ApprovalStatus.REJECTED, decided_by="alice", decided_at=1767000050,
                           reason=None, signal=Signal.rejection("req_1", "alice", 1767000050, None),
                           decider=Decider("acme", "alice", approver=False))
    later = {"sessionId": "ses_a", "requestId": "req_2", "status": "pending"}
    await redis_client.set("hitl:session:ses_a", orjson.dumps(later))  # another request of the session since
    await redis_client.delete("aura:run:{run_a}:lease")
    await redis_client.zadd("aura:runs:active", {"run_a": 0})
    assert await access.sweep_lost_runs() == 1
    assert orjson.loads(await redis_client.get("hitl:session:ses_a")) == later


async def test_a_run_that_ended_normally_is_never_declared_lost(redis_client: Redis,
                                                                owner_log: RedisEventLog) -> None:
    access, directory, _ = await access_over(redis_client)
    await admit(directory)
    await owner_log.append(event(1))
    await owner_log.append(event(2, EventType.END))
    assert await directory.close(RECORD, "completed", 60) is True  # drops the lease, as a normal end does
    assert await access.declare_lost(RECORD) is False
    assert await access.sweep_lost_runs() == 0
    assert await seqs(redis_client) == [b"1-1", b"2-1"]
    assert orjson.loads(await redis_client.get("aura:run:{run_a}:meta"))["status"] == "completed"


async def test_a_declaration_prepared_before_the_log_grew_is_refused(redis_client: Redis,
                                                                      owner_log: RedisEventLog) -> None:
    from domain.model.runs import LostRun

    directory = run_directory(redis_client)
    await admit(directory)
    await owner_log.append(event(1))
    await owner_log.append(event(2))
    await redis_client.delete("aura:run:{run_a}:lease")
    stale = LostRun(record=RECORD, after_seq=1, error=event(2, EventType.ERROR), end=event(3, EventType.END),
                    snapshot=None, approval=None, retention_seconds=60)
    assert await directory.declare_lost(stale) == "moved"
    assert await seqs(redis_client) == [b"1-1", b"2-1"]
