"""Property: no interleaving of signals (published, malformed, for other requests), API decisions
(by the owner, an approver, a stranger, another tenant), expiries, store-only decisions (a lost
publish) and cancels decides a request twice or runs a tool that was not approved.

The scenario runs the real ApprovalGate, ApprovalDesk, Agent and RunService over two stores: the
in-memory fake and the real RedisApprovalStore (Lua compare-and-set) on fakeredis, with the gate
trusting the desk's sealed signals (as when instances share the seal key) and without (it then
records every signal)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.redis.approvals import RedisApprovalStore
from domain.model.approval import ApprovalStatus, DecisionResult, DecisionSeal, Signal, StoredApproval
from domain.model.errors import AuraError
from domain.model.identity import Principal
from domain.model.ports import ApprovalStore
from domain.services.desk import ApprovalDesk
from domain.services.gate import GateSettings
from tests.unit.fakes import MemorySignalBus, RecordingTool, ScriptedModel, text, tool_call
from tests.unit.harness import Harness

PLAN = json.dumps({"steps": [{"description": "Commit the work", "tool": "commit"}]})
OWNER = Principal("alice", "acme", "alice", "user")
PEOPLE = {
    "owner": OWNER,
    "approver": Principal("mgr", "acme", "mgr", "manager"),
    "stranger": Principal("carol", "acme", "carol", "user"),
    "other_tenant": Principal("alice", "globex", "alice", "admin"),
}
ALLOWED = {"owner", "approver"}
SEAL = DecisionSeal(b"s" * 32)


class CountingStore(ApprovalStore):
    """Wraps a store and records every applied decision. `relay` gets the signal of an applied
    decision that the inner store published where this scenario's bus does not listen (the Redis
    store publishes on fakeredis), so the run hears it as it would in production."""

    def __init__(self, inner: ApprovalStore, relay: MemorySignalBus | None = None) -> None:
        self.inner = inner
        self.relay = relay
        self.applied: list[tuple[str, ApprovalStatus]] = []

    async def create(self, request: Any) -> StoredApproval:
        return await self.inner.create(request)

    async def get(self, request_id: str) -> Any:
        return await self.inner.get(request_id)

    async def read(self, request_id: str) -> StoredApproval | None:
        return await self.inner.read(request_id)

    async def get_many(self, request_ids: Sequence[str]) -> Any:
        return await self.inner.get_many(request_ids)

    async def pending_for_user(self, tenant_id: str, user_id: str) -> Any:
        return await self.inner.pending_for_user(tenant_id, user_id)

    async def settle_session(self, decided: Any) -> None:
        await self.inner.settle_session(decided)

    async def decide(self, request_id: str, status: ApprovalStatus, **kw: Any) -> DecisionResult | None:
        result = await self.inner.decide(request_id, status, **kw)
        if result is not None and result.applied:
            self.applied.append((request_id, status))
            signal = kw.get("signal")
            if self.relay is not None and signal is not None and result.signalled:
                await self.relay.publish(result.request.session_id, signal)
        return result


ACTION = st.one_of(
    st.tuples(st.just("signal"), st.sampled_from(["approval", "rejection"]),
              st.sampled_from(["right", "other_request", "malformed", "contradicting", "forged_seal"])),
    st.tuples(st.just("api"), st.booleans(), st.sampled_from(sorted(PEOPLE))),
    st.tuples(st.just("store_only"), st.sampled_from([ApprovalStatus.APPROVED, ApprovalStatus.REJECTED])),
    st.tuples(st.just("expire")),
    st.tuples(st.just("cancel")),
    st.tuples(st.just("yield"), st.integers(1, 20)),
)


async def scenario(backend: str, sealed: bool, actions: list[tuple[Any, ...]]) -> None:
    commit = RecordingTool("commit", requires_approval=True, result={"summary": "committed"})
    model = ScriptedModel(text(PLAN), tool_call("commit", '{"value": "v"}'), text("note"), text("Done."))
    h = Harness(model, tools=[commit], gate_settings=GateSettings(timeout_seconds=300), recheck_seconds=0.005)
    inner: ApprovalStore = h.store
    relay = None
    if backend == "redis":
        inner = RedisApprovalStore(fakeredis.FakeAsyncRedis())
        relay = h.bus
    store = CountingStore(inner, relay)
    h.rebuild(store=store, seal=SEAL if sealed else None)
    desk = ApprovalDesk(store, h.bus, h.clock, ["manager"], SEAL)

    handle, watcher = await h.start()
    while True:
        event = await watcher.next(5)
        assert event is not None
        if event.type.value == "hitl":
            break
    request_id, session = event.data["requestId"], event.data["sessionId"]
    api_wins: list[tuple[str, bool]] = []
    for action in actions:
        match action:
            case ("signal", kind, variant):
                record: dict[str, Any] = {"type": kind, "requestId": request_id, "userId": "ext", "timestamp": 1}
                if variant == "other_request":
                    record["requestId"] = "req_someone_else"
                elif variant == "contradicting":
                    record["status"] = "rejected" if kind == "approval" else "approved"
                elif variant == "forged_seal":  # must be recorded like any signal, never taken as stored
                    record["seal"] = SEAL.seal(Signal.approval("req_someone_else", "ext", 1)).seal
                raw = "{not json" if variant == "malformed" else json.dumps(record)
                await h.bus.publish_raw(session, raw)
            case ("api", approve, who):
                try:
                    await desk.decide(PEOPLE[who], request_id, approve=approve, reason="r")
                    assert who in ALLOWED, f"{who} decided a request"
                    api_wins.append((who, approve))
                except AuraError as refused:
                    assert refused.code in {"approval_not_found", "not_an_approver", "already_decided",
                                            "approval_expired"}, refused.code
            case ("store_only", status):  # another instance decided, but its PUBLISH was lost
                await store.decide(request_id, status, decided_by="ext", decided_at=h.clock.timestamp(), reason=None)
            case ("expire",):
                h.clock.value += 301
            case ("cancel",):
                handle.cancel("test")
            case ("yield", n):
                for _ in range(n):
                    await asyncio.sleep(0)
    h.clock.value += 10_000  # whatever is still pending expires now
    events = []
    while True:
        event = await watcher.next(5)
        assert event is not None, "the run did not end"
        events.append(event)
        if event.is_terminal:
            break
    await asyncio.sleep(0)

    # A cancel lands its decision in a shielded task that may finish just after `end` (found here:
    # with fakeredis the store briefly still said pending after `end`); wait for it, bounded.
    deadline = asyncio.get_running_loop().time() + 2
    while (final := await store.get(request_id)) is not None and not final.status.is_decided:
        assert asyncio.get_running_loop().time() < deadline, "the request was never decided"
        await asyncio.sleep(0.001)
    assert final is not None and final.status.is_decided
    assert store.applied == [(request_id, final.status)], store.applied  # decided exactly once
    assert len(api_wins) <= 1
    if api_wins:
        assert final.status is (ApprovalStatus.APPROVED if api_wins[0][1] else ApprovalStatus.REJECTED)
    statuses = [e.data["status"] for e in events if e.type.value == "tool_execution"]
    if final.status is ApprovalStatus.APPROVED:
        # an approved tool runs once — unless the run was cancelled between the decision and the call
        cancelled = ("cancel",) in actions
        assert commit.calls == [{"value": "v"}] or (cancelled and commit.calls == [])
        assert ("success" in statuses) == bool(commit.calls)
    else:
        assert commit.calls == []
        assert "running" not in statuses and "success" not in statuses
    assert h.bus.subscribers == {}  # the subscription was released on every path


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "unsealed"])
@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_no_interleaving_decides_twice_or_runs_an_unapproved_tool(backend: str, sealed: bool) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(actions=st.lists(ACTION, max_size=12))
    def check(actions: list[tuple[Any, ...]]) -> None:
        asyncio.run(scenario(backend, sealed, actions))

    check()


def test_a_signal_contradicting_its_type_is_never_read_as_a_decision() -> None:
    assert Signal.parse(json.dumps({"type": "rejection", "requestId": "r", "status": "approved"})) is None
    assert Signal.parse(json.dumps({"type": "approval", "requestId": "r", "status": "rejected"})) is None


async def test_an_api_decision_stands_when_its_publish_fails() -> None:
    """Under load the PUBLISH after a stored decision can fail; answering 503 then would be wrong,
    as the decision is made (a retry would get 409). The publish is part of the store's decision
    step; when only that part fails, the decision still stands and the run sees it by its recheck."""
    from domain.model.errors import StoreUnavailable

    class DeadPublish(MemorySignalBus):
        async def publish(self, session_id: str, signal: Signal) -> int:
            raise StoreUnavailable("the signal store is unavailable")

    commit = RecordingTool("commit", requires_approval=True, result={"summary": "committed"})
    model = ScriptedModel(text(PLAN), tool_call("commit", '{"value": "v"}'), text("note"), text("Done."))
    h = Harness(model, tools=[commit], gate_settings=GateSettings(timeout_seconds=300), recheck_seconds=0.01)
    h.bus = DeadPublish()
    h.store.bus = h.bus
    h.rebuild()
    _, watcher = await h.start()
    while (event := await watcher.next(5)) is not None and event.type.value != "hitl":
        pass
    assert event is not None
    decided = await ApprovalDesk(h.store, h.bus, h.clock, ["manager"], SEAL).decide(
        OWNER, event.data["requestId"], approve=True)
    assert decided.status is ApprovalStatus.APPROVED
    while (event := await watcher.next(5)) is not None and not event.is_terminal:
        pass
    assert event is not None and event.data["status"] == "completed"
    assert commit.calls == [{"value": "v"}]
