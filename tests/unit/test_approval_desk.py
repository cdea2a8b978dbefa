"""The approval desk with fake ports: one store step that checks who may decide, decides and
publishes the sealed signal; 404/403/409/410 told from the request the store refused, and a
decision that stands without its signal."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from domain.model.approval import (
    ApprovalRequest,
    ApprovalStatus,
    Decider,
    DecisionResult,
    DecisionSeal,
    Signal,
    StoredApproval,
)
from domain.model.errors import AlreadyDecided, ApprovalExpired, NotFound, StoreUnavailable
from domain.model.identity import Principal
from domain.services.desk import ApprovalDesk
from tests.unit.fakes import FakeClock, MemoryApprovalStore, MemorySignalBus

OWNER = Principal("alice", "acme", "alice", "user")
MANAGER = Principal("mgr", "acme", "mgr", "manager")
NOW = 1_767_000_000
SEAL = DecisionSeal(b"k" * 32)


class RecordingStore(MemoryApprovalStore):
    """Records each store call the desk makes, with the arguments that matter here."""

    def __init__(self, bus: MemorySignalBus | None = None, *, settles_sessions: bool = False) -> None:
        super().__init__(bus, settles_sessions=settles_sessions)
        self.calls: list[tuple[Any, ...]] = []

    async def get(self, request_id: str) -> ApprovalRequest | None:
        self.calls.append(("get", request_id))
        return await super().get(request_id)

    async def read(self, request_id: str) -> StoredApproval | None:
        self.calls.append(("read", request_id))
        return await super().read(request_id)

    async def decide(self, request_id: str, status: ApprovalStatus, **kw: Any) -> DecisionResult | None:
        self.calls.append(("decide", request_id, status, kw.get("expected"), kw.get("signal"), kw.get("decider"),
                           kw.get("settled_signal")))
        return await super().decide(request_id, status, **kw)


def pending(number: int = 1, *, expires_at: int = NOW + 300) -> ApprovalRequest:
    return ApprovalRequest(
        request_id=f"req_{number:032x}", session_id=f"ses_{number:032x}", run_id=f"run_{number:032x}",
        action_type="commit", tool_name="commit", message="Commit?", context={"value": "v"},
        user_id="alice", tenant_id="acme", created_at=NOW - 10, expires_at=expires_at,
    )


@pytest.fixture
def bus() -> MemorySignalBus:
    return MemorySignalBus()


@pytest.fixture
def store(bus: MemorySignalBus) -> RecordingStore:
    return RecordingStore(bus)


@pytest.fixture
def desk(store: RecordingStore, bus: MemorySignalBus) -> ApprovalDesk:
    return ApprovalDesk(store, bus, FakeClock(float(NOW)), ["manager"], SEAL)


async def test_an_approval_is_one_guarded_decision_that_carries_its_sealed_signal(
    desk: ApprovalDesk, store: RecordingStore, bus: MemorySignalBus
) -> None:
    request = pending()
    await store.create(request)

    decided = await desk.decide(MANAGER, request.request_id, approve=True)

    signal = SEAL.seal(Signal.approval(request.request_id, "mgr", NOW))
    settled = SEAL.seal(Signal.approval(request.request_id, "mgr", NOW), settled=True)
    assert store.calls == [("decide", request.request_id, ApprovalStatus.APPROVED, None, signal,
                            Decider("acme", "mgr", approver=True), settled)]
    assert decided == request.decide(ApprovalStatus.APPROVED, by="mgr", at=NOW, reason=None)
    assert store.requests[request.request_id] == decided
    # this store leaves the session's record to the waiting run: it publishes the plain seal
    assert store.sessions[request.session_id] == request
    assert bus.stored == {request.session_id: signal.to_json()}
    published = Signal.parse(bus.stored[request.session_id])
    assert published is not None and SEAL.verifies(published) and not SEAL.settled(published)
    assert SEAL.decided(request, published) == decided  # what the waiting run takes without a store step


async def test_a_store_that_writes_the_session_record_in_the_decisions_step_publishes_the_settled_seal(
    bus: MemorySignalBus
) -> None:
    store = RecordingStore(bus, settles_sessions=True)
    desk = ApprovalDesk(store, bus, FakeClock(float(NOW)), ["manager"], SEAL)
    request = pending()
    await store.create(request)

    decided = await desk.decide(MANAGER, request.request_id, approve=True)

    assert store.sessions[request.session_id] == decided
    settled = SEAL.seal(Signal.approval(request.request_id, "mgr", NOW), settled=True)
    assert bus.stored == {request.session_id: settled.to_json()}
    published = Signal.parse(bus.stored[request.session_id])
    assert published is not None and SEAL.verifies(published) and SEAL.settled(published)
    assert SEAL.decided(request, published) == decided


async def test_a_rejection_keeps_its_reason_in_the_record_and_the_signal(
    desk: ApprovalDesk, store: RecordingStore, bus: MemorySignalBus
) -> None:
    request = pending()
    await store.create(request)

    decided = await desk.decide(OWNER, request.request_id, approve=False, reason="not now")

    assert (decided.status, decided.decided_by, decided.reason) == (ApprovalStatus.REJECTED, "alice", "not now")
    rejection = SEAL.seal(Signal.rejection(request.request_id, "alice", NOW, "not now"))
    assert bus.stored[request.session_id] == rejection.to_json()


async def test_a_decided_request_answers_409_with_the_winner_and_publishes_nothing(
    desk: ApprovalDesk, store: RecordingStore, bus: MemorySignalBus
) -> None:
    request = pending()
    await store.create(request)
    winner = await desk.decide(MANAGER, request.request_id, approve=False, reason="no")
    store.calls.clear()
    bus.stored.clear()

    with pytest.raises(AlreadyDecided) as refused:
        await desk.decide(OWNER, request.request_id, approve=True)

    assert refused.value.request == winner
    assert [call[0] for call in store.calls] == ["decide"]  # refused by the store's check: no write
    assert store.requests[request.request_id] == winner
    assert bus.stored == {}


async def test_a_decision_that_loses_the_race_answers_409_with_the_winner(
    desk: ApprovalDesk, store: RecordingStore, bus: MemorySignalBus
) -> None:
    request = pending()
    await store.create(request)
    original_decide = store.decide

    async def lose_then_decide(request_id: str, status: ApprovalStatus, **kw: Any) -> DecisionResult | None:
        # another instance decides just before this decision reaches the store
        await MemoryApprovalStore.decide(store, request_id, ApprovalStatus.REJECTED, decided_by="other",
                                         decided_at=NOW, reason="late")
        return await original_decide(request_id, status, **kw)

    store.decide = lose_then_decide  # type: ignore[method-assign]
    bus.stored.clear()

    with pytest.raises(AlreadyDecided) as refused:
        await desk.decide(OWNER, request.request_id, approve=True)

    assert (refused.value.request.status, refused.value.request.decided_by) == (ApprovalStatus.REJECTED, "other")
    assert bus.stored == {}


async def test_an_expired_request_is_recorded_as_expired_and_answers_410_without_a_signal(
    desk: ApprovalDesk, store: RecordingStore, bus: MemorySignalBus
) -> None:
    request = pending(expires_at=NOW)
    await store.create(request)

    with pytest.raises(ApprovalExpired):
        await desk.decide(OWNER, request.request_id, approve=True)

    signal = SEAL.seal(Signal.approval(request.request_id, "alice", NOW))
    assert store.calls == [
        ("decide", request.request_id, ApprovalStatus.APPROVED, None, signal, Decider("acme", "alice", approver=False),
         SEAL.seal(signal, settled=True)),
        ("decide", request.request_id, ApprovalStatus.EXPIRED, None, None, None, None),
    ]
    assert store.requests[request.request_id].status is ApprovalStatus.EXPIRED
    assert bus.stored == {}
    with pytest.raises(ApprovalExpired):  # and stays expired
        await desk.decide(MANAGER, request.request_id, approve=True)


async def test_unknown_other_tenant_and_strangers_are_refused_by_the_store_without_a_write(
    desk: ApprovalDesk, store: RecordingStore, bus: MemorySignalBus
) -> None:
    request = pending()
    await store.create(request)

    with pytest.raises(NotFound):
        await desk.decide(OWNER, "req_unknown", approve=True)
    with pytest.raises(NotFound):
        await desk.decide(Principal("alice", "globex", "alice", "admin"), request.request_id, approve=True)
    with pytest.raises(NotFound):  # a stranger of the same tenant: the same answer as an unknown id
        await desk.decide(Principal("carol", "acme", "carol", "user"), request.request_id, approve=True)
    assert [call[0] for call in store.calls] == ["decide", "decide", "decide"]
    assert store.requests[request.request_id] == request
    assert bus.stored == {}


async def test_the_decision_stands_when_its_signal_could_not_be_published(
    store: RecordingStore, caplog: pytest.LogCaptureFixture
) -> None:
    class DeadPublish(MemorySignalBus):
        async def publish(self, session_id: str, signal: Signal) -> int:
            raise StoreUnavailable("the signal store is unavailable")

    dead = DeadPublish()
    store.bus = dead
    request = pending()
    await store.create(request)
    desk = ApprovalDesk(store, dead, FakeClock(float(NOW)), ["manager"], SEAL)

    with caplog.at_level(logging.WARNING, logger="aura.hitl"):
        decided = await desk.decide(OWNER, request.request_id, approve=True)

    assert decided.status is ApprovalStatus.APPROVED
    assert store.requests[request.request_id] == decided
    assert "could not publish its signal" in caplog.text
