"""The approval gate with fake ports: approve, reject, expire, cancel, and signals that must be ignored."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from domain.model.approval import ApprovalRequest, ApprovalStatus, DecisionResult, DecisionSeal, Signal, StoredApproval
from domain.model.errors import StoreUnavailable
from domain.model.events import Event
from domain.model.identity import Principal
from domain.runtime.feed import Subscription
from domain.services.desk import ApprovalDesk
from domain.services.gate import GateSettings
from tests.unit.fakes import MemoryApprovalStore, RecordingTool, ScriptedModel, text, tool_call
from tests.unit.harness import Harness, summary

PLAN = json.dumps({"steps": [{"description": "Commit the work", "tool": "commit"}]})


def approval_harness(commit: RecordingTool | None = None, **kwargs: object) -> tuple[Harness, RecordingTool]:
    commit = commit or RecordingTool("commit", requires_approval=True, result={"summary": "committed abc123"})
    model = ScriptedModel(text(PLAN), tool_call("commit", '{"value": "v"}'), text("step note"), text("All done."))
    return Harness(model, tools=[commit], **kwargs), commit  # type: ignore[arg-type]


async def until(watcher: Subscription, kind: str, seen: list[Event]) -> Event:
    while True:
        event = await watcher.next(5)
        assert event is not None, f"no {kind} event; saw {[e.type.value for e in seen]}"
        seen.append(event)
        if event.type.value == kind:
            return event


async def finish(watcher: Subscription, seen: list[Event]) -> list[Event]:
    await until(watcher, "end", seen)
    return seen


async def test_approval_runs_the_tool_and_records_the_decider() -> None:
    h, commit = approval_harness()
    handle, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    request_id = hitl.data["requestId"]
    assert hitl.data == {
        "requestId": request_id, "sessionId": handle.run.ids.session_id, "actionType": "commit",
        "message": 'Aura wants to run commit with {"value": "v"}.', "context": {"value": "v"},
        "requiresApproval": True, "expiresAt": 1_767_000_300,
    }
    assert commit.calls == []
    assert h.store.requests[request_id].status is ApprovalStatus.PENDING
    await h.bus.publish(handle.run.ids.session_id, Signal.approval(request_id, "alice", 1_767_000_010))
    events = await finish(watcher, seen)
    digest = summary(events)
    i = digest.index(("tool", "commit", "pending"))
    assert digest[i:i + 8] == [
        ("tool", "commit", "pending"),
        ("hitl",),
        ("step", "step_1", "waiting_approval", 0.0),
        ("timeline", "approval_1_1", "waiting_approval"),
        ("timeline", "approval_1_1", "completed"),
        ("step", "step_1", "in_progress", 0.0),
        ("thought", "decision"),
        ("tool", "commit", "running"),
    ]
    assert ("tool", "commit", "success") in digest and digest[-1] == ("end", "completed", "completed")
    assert commit.calls == [{"value": "v"}]
    stored = h.store.requests[request_id]
    assert (stored.status, stored.decided_by, stored.decided_at) == (ApprovalStatus.APPROVED, "alice", 1_767_000_000)
    assert h.bus.subscribers == {}  # subscription released


async def test_a_signal_is_one_store_decision_on_whatever_is_stored_if_still_pending() -> None:
    # No `expected` copy of the stored record: a parked run would hold it for the whole wait.
    h, _ = approval_harness()
    decisions: list[dict[str, Any]] = []
    decide = h.store.decide

    async def recording_decide(request_id: str, status: ApprovalStatus, **kw: Any) -> DecisionResult | None:
        decisions.append({"status": status, **kw})
        return await decide(request_id, status, **kw)

    h.store.decide = recording_decide  # type: ignore[method-assign]
    handle, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    await h.bus.publish(handle.run.ids.session_id, Signal.approval(hitl.data["requestId"], "alice", 1))
    await finish(watcher, seen)
    assert decisions == [{"status": ApprovalStatus.APPROVED, "decided_by": "alice", "decided_at": 1_767_000_000,
                          "reason": None}]


async def test_rejection_skips_the_tool_tells_the_model_and_ends_normally() -> None:
    h, commit = approval_harness()
    handle, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    await h.bus.publish(handle.run.ids.session_id,
                        Signal.rejection(hitl.data["requestId"], "alice", 1_767_000_010, "not now"))
    events = await finish(watcher, seen)
    rejected = [e.data for e in events if e.type.value == "tool_execution" and e.data["status"] == "rejected"]
    assert rejected == [{"toolCallId": "call_1", "toolName": "commit", "toolArgs": {"value": "v"},
                         "requiresApproval": True, "status": "rejected", "result": None,
                         "error": "Rejected: not now"}]
    assert commit.calls == []
    assert ("step", "step_1", "skipped", 1.0) in summary(events)
    assert h.model.requests[2].messages[-1].content == \
        "The user rejected this action; it was not run. Reason: not now"
    assert events[-1].data["status"] == "completed"
    assert h.store.requests[hitl.data["requestId"]].reason == "not now"


@pytest.mark.parametrize("raw", [
    "not json",
    '{"type": "approval"}',
    '{"type": "approve", "requestId": "%s", "status": "approved"}',
    '{"type": "approval", "requestId": "req_other", "status": "approved"}',
    '{"type": "approval", "requestId": "%s", "status": "rejected"}',
    '["approval"]',
    # Repeated keys: Python reads the last value, another DWP component may read the first.
    '{"type": "rejection", "requestId": "%s", "type": "approval"}',
    '{"type": "approval", "requestId": "req_other", "requestId": "%s"}',
    '{"type": "approval", "requestId": "%s", "status": "rejected", "status": "approved"}',
    '{"type": "approval", "requestId": "%s", "x": {"a": 1, "a": 2}}',
    '{"type": "approval", "requestId": "%s", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
])
async def test_signals_that_are_not_a_valid_decision_of_this_request_are_ignored(raw: str) -> None:
    h, commit = approval_harness()
    handle, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    request_id = hitl.data["requestId"]
    session = handle.run.ids.session_id
    await h.bus.publish_raw(session, raw.replace("%s", request_id))
    # the bad signal is ignored; only the real approval afterwards makes the tool run
    await asyncio.sleep(0)
    assert commit.calls == [] and h.store.requests[request_id].status is ApprovalStatus.PENDING
    await h.bus.publish(session, Signal.approval(request_id, "alice", 1))
    events = await finish(watcher, seen)
    assert commit.calls == [{"value": "v"}] and events[-1].data["status"] == "completed"
    assert h.store.requests[request_id].decided_by == "alice"  # the bad signal decided nothing
    assert h.store.decisions == [(request_id, ApprovalStatus.APPROVED, True)]


async def test_a_signal_sent_the_moment_the_request_is_stored_is_honoured() -> None:
    h, commit = approval_harness()
    original_create = h.store.create

    async def create_and_presign(request: ApprovalRequest) -> StoredApproval:
        created = await original_create(request)
        # the DWP backend decides (SET + PUBLISH) before Aura has even announced the request
        assert request.session_id in h.bus.subscribers  # subscribed before the request exists
        await h.bus.publish_raw(request.session_id, Signal.approval(request.request_id, "alice", 1).to_json())
        return created

    h.store.create = create_and_presign  # type: ignore[method-assign]
    _, watcher = await h.start()
    events = await finish(watcher, [])
    assert commit.calls == [{"value": "v"}] and events[-1].data["status"] == "completed"


async def test_a_decision_made_through_the_store_is_seen_without_any_signal() -> None:
    h, commit = approval_harness(gate_settings=GateSettings(timeout_seconds=300), recheck_seconds=0.01)
    _, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    await h.store.decide(hitl.data["requestId"], ApprovalStatus.APPROVED, decided_by="api-user",
                         decided_at=5, reason=None)
    events = await finish(watcher, seen)
    assert commit.calls == [{"value": "v"}] and events[-1].data["status"] == "completed"


async def test_the_second_decision_changes_nothing() -> None:
    h, commit = approval_harness()
    handle, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    request_id, session = hitl.data["requestId"], handle.run.ids.session_id
    await h.bus.publish(session, Signal.rejection(request_id, "alice", 1, "no"))
    await h.bus.publish(session, Signal.approval(request_id, "mallory", 2))
    events = await finish(watcher, seen)
    assert commit.calls == []
    assert h.store.requests[request_id].status is ApprovalStatus.REJECTED
    assert h.store.requests[request_id].decided_by == "alice"
    assert events[-1].data["status"] == "completed"


async def test_expiry_ends_with_hitl_timeout_and_never_runs_the_tool() -> None:
    h, commit = approval_harness(gate_settings=GateSettings(timeout_seconds=300), recheck_seconds=0.01)
    _, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    h.clock.value += 301
    events = await finish(watcher, seen)
    assert summary(events)[-3:] == [("timeline", "approval_1_1", "failed"), ("error", "hitl_timeout"),
                                    ("end", "timeout", "hitl_timeout")]
    assert commit.calls == []
    assert h.store.requests[hitl.data["requestId"]].status is ApprovalStatus.EXPIRED
    # an approval arriving after expiry changes nothing
    result = await h.store.decide(hitl.data["requestId"], ApprovalStatus.APPROVED, decided_by="late",
                                  decided_at=9, reason=None)
    assert result is not None and result.applied is False


async def test_cancel_while_waiting_cancels_the_request_and_releases_the_subscription() -> None:
    h, commit = approval_harness()
    handle, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    h.service.cancel(handle.run_id, "user_cancelled")
    events = await finish(watcher, seen)
    assert summary(events)[-1] == ("end", "cancelled", "user_cancelled")
    assert h.store.requests[hitl.data["requestId"]].status is ApprovalStatus.CANCELLED
    assert h.bus.subscribers == {} and commit.calls == []


class StoreAwaitingItsReply(MemoryApprovalStore):
    """Writes the request at once and then waits for a reply that never comes, as a store whose
    write reached the server does while its reply is on the way."""

    def __init__(self) -> None:
        super().__init__()
        self.written = asyncio.Event()

    async def create(self, request: ApprovalRequest) -> StoredApproval:
        await super().create(request)
        self.written.set()
        reply: asyncio.Future[StoredApproval] = asyncio.get_running_loop().create_future()
        return await reply  # never set: only a cancellation ends this


async def test_cancel_while_the_request_is_being_stored_leaves_it_cancelled_not_pending() -> None:
    h, commit = approval_harness()
    store = StoreAwaitingItsReply()
    h.rebuild(store=store)
    handle, watcher = await h.start()
    async with asyncio.timeout(5):
        await store.written.wait()
    h.service.cancel(handle.run_id, "client_disconnected")
    events = await finish(watcher, [])
    assert summary(events)[-1] == ("end", "cancelled", "client_disconnected")
    assert "hitl" not in [event.type.value for event in events]
    [request] = store.requests.values()
    assert request.status is ApprovalStatus.CANCELLED  # not left pending with nobody waiting for it
    assert h.bus.subscribers == {} and commit.calls == []


async def test_approval_override_from_settings_removes_the_gate() -> None:
    h, commit = approval_harness(approval_overrides={"commit": False})
    _, watcher = await h.start()
    events = await finish(watcher, [])
    assert not any(e.type.value == "hitl" for e in events)
    assert commit.calls == [{"value": "v"}]


@pytest.mark.parametrize(("claimed", "recorded", "audited"), [
    ("alice", "alice", None),        # the request's own user: the one name Aura can check
    ("mgr", None, "mgr"),            # anyone else: not recorded as the decider, kept as a claim
    ("someone-forged", None, "someone-forged"),
    (None, None, None),
])
async def test_a_signals_user_is_recorded_as_decider_only_when_checked(
        caplog: pytest.LogCaptureFixture, claimed: str | None, recorded: str | None, audited: str | None) -> None:
    caplog.set_level("INFO", logger="aura.audit")
    h, commit = approval_harness()
    handle, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    signal = json.dumps({"type": "approval", "requestId": hitl.data["requestId"], "timestamp": 1,
                         **({"userId": claimed} if claimed is not None else {})})

    await h.bus.publish_raw(handle.run.ids.session_id, signal)
    await finish(watcher, seen)

    assert commit.calls == [{"value": "v"}]  # the decision itself counts either way
    assert h.store.requests[hitl.data["requestId"]].decided_by == recorded
    [audit] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("event") == "decided"]  # type: ignore[attr-defined]
    assert audit["decidedBy"] == recorded and audit["via"] == "signal"
    assert audit.get("claimedBy") == audited


class HeldSettleStore(MemoryApprovalStore):
    """`settle_session` suspends until the test releases it; the first `failures` calls fail."""

    def __init__(self, bus: Any, *, failures: int = 0, settles_sessions: bool = False) -> None:
        super().__init__(bus, settles_sessions=settles_sessions)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.failures = failures
        self.settle_calls = 0

    async def settle_session(self, decided: ApprovalRequest) -> None:
        self.settle_calls += 1
        self.entered.set()
        await self.release.wait()
        if self.settle_calls <= self.failures:
            raise StoreUnavailable("the approval store is unavailable")
        await super().settle_session(decided)


async def events_so_far(watcher: Subscription, seen: list[Event]) -> list[str]:
    """Let the run go as far as it can without the store, then the events it logged meanwhile."""
    for _ in range(200):
        await asyncio.sleep(0)  # loop passes, not time: every fake here answers without waiting
    while (event := await watcher.next(0)) is not None:
        seen.append(event)
    return [f"{e.type.value}:{e.data.get('status', '')}" for e in seen]


async def sealed_decision_harness(store_failures: int = 0, settles_sessions: bool = False
                                  ) -> tuple[Harness, RecordingTool, HeldSettleStore, ApprovalDesk]:
    seal = DecisionSeal(b"shared-by-every-instance-0123456")
    h, commit = approval_harness()
    store = HeldSettleStore(h.bus, failures=store_failures, settles_sessions=settles_sessions)
    h.store = store
    h.rebuild(seal=seal)
    return h, commit, store, ApprovalDesk(h.store, h.bus, h.clock, ["manager"], seal)


async def test_a_sealed_api_decision_leaves_the_session_record_to_the_run_that_waited() -> None:
    # The desk stores the decision and publishes its sealed signal; the session record is the
    # waiting run's to write (its instance is its one writer while it waits), once it heard it,
    # and before the run goes on.
    h, commit, store, desk = await sealed_decision_harness()
    store.release.clear()
    handle, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    session_id = handle.run.ids.session_id
    assert h.store.sessions[session_id].status is ApprovalStatus.PENDING

    decided = await desk.decide(Principal("mgr", "acme", "mgr", "manager"), hitl.data["requestId"], approve=True)
    assert h.store.sessions[session_id].status is ApprovalStatus.PENDING  # the desk left it alone

    await store.entered.wait()
    so_far = await events_so_far(watcher, seen)
    assert "tool_execution:running" not in so_far and commit.calls == []  # held while the session is written
    assert h.store.sessions[session_id].status is ApprovalStatus.PENDING
    store.release.set()

    running = await until(watcher, "tool_execution", seen)
    assert running.data["status"] == "running"
    assert h.store.sessions[session_id] == decided  # written before the run went on
    assert h.store.decisions == [(hitl.data["requestId"], ApprovalStatus.APPROVED, True)]  # no second decision
    await finish(watcher, seen)
    assert commit.calls == [{"value": "v"}]


async def test_a_decision_whose_step_wrote_the_session_record_too_leaves_the_run_nothing_to_write() -> None:
    # A store that writes the session's decided record in the decision's own step publishes the
    # signal sealed as such: the run that waited takes the decision as it is and writes nothing.
    h, commit, store, desk = await sealed_decision_harness(settles_sessions=True)
    handle, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    session_id = handle.run.ids.session_id

    decided = await desk.decide(Principal("mgr", "acme", "mgr", "manager"), hitl.data["requestId"], approve=True)
    assert h.store.sessions[session_id] == decided  # the desk's step wrote it

    await finish(watcher, seen)
    assert store.settle_calls == 0
    assert h.store.decisions == [(hitl.data["requestId"], ApprovalStatus.APPROVED, True)]  # no second decision
    assert commit.calls == [{"value": "v"}]


@pytest.mark.parametrize(("failures", "settled"), [(3, True), (4, False)])
async def test_the_run_retries_writing_its_session_record_a_few_times(
        failures: int, settled: bool, caplog: pytest.LogCaptureFixture) -> None:
    # A blip of the store while the session record is written: the write is retried (4 attempts
    # in all) before the run goes on; after that the decision still stands and the run goes on.
    h, commit, store, desk = await sealed_decision_harness(store_failures=failures)
    handle, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    decided = await desk.decide(Principal("mgr", "acme", "mgr", "manager"), hitl.data["requestId"], approve=True)
    await finish(watcher, seen)
    assert store.settle_calls == 4
    session = h.store.sessions[handle.run.ids.session_id]
    assert session == decided if settled else session.status is ApprovalStatus.PENDING
    assert commit.calls == [{"value": "v"}]
    gave_up = [r.getMessage() for r in caplog.records if "could not record the decision" in r.getMessage()]
    assert gave_up == ([] if settled else [f"could not record the decision of {decided.request_id} in its session "
                                           "(4 attempts)"])
