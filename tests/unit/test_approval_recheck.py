"""The process-wide approval re-check: one read per chunk of waits per interval, waking only the
waits whose request was decided, vanished or expired; a failed read ends no wait."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import replace

import pytest

from domain.model.approval import ApprovalRequest, ApprovalStatus
from domain.model.errors import StoreUnavailable
from domain.model.events import Event
from domain.model.ports import Clock
from domain.services.gate import GateSettings
from domain.services.recheck import ApprovalRecheck
from tests.unit.fakes import FakeClock, MemoryApprovalStore
from tests.unit.harness import summary
from tests.unit.test_approval_gate import approval_harness, finish, until

NOW = 1_767_000_000


def pending(number: int, *, expires_at: int = NOW + 300) -> ApprovalRequest:
    return ApprovalRequest(
        request_id=f"req_{number:032x}", session_id=f"ses_{number:032x}", run_id=f"run_{number:032x}",
        action_type="commit", tool_name="commit", message="Commit?", context={},
        user_id="alice", tenant_id="acme", created_at=NOW, expires_at=expires_at,
    )


class FlakyStore(MemoryApprovalStore):
    """Fails the next `failures` reads of many requests."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    async def get_many(self, request_ids: Sequence[str]) -> list[ApprovalRequest | None]:
        if self.failures:
            self.failures -= 1
            self.get_many_calls.append(list(request_ids))
            raise StoreUnavailable("the approval store is unavailable")
        return await super().get_many(request_ids)


def callbacks(future: asyncio.Future[object]) -> int:
    return len(future._callbacks or ())  # type: ignore[attr-defined]  # what a parked wait keeps


async def test_a_watch_also_wakes_when_its_other_way_out_is_done_and_leaves_no_callback_behind() -> None:
    """A parked wait waits on one future: the re-check's, which its signal also completes (with the
    request as it was, so the wait looks at the signal), rather than on a third made for both."""
    loop = asyncio.get_running_loop()
    store = MemoryApprovalStore()
    recheck = ApprovalRecheck(store, FakeClock(NOW), interval_seconds=3600)
    request = pending(1)
    await store.create(request)
    signal: asyncio.Future[bytes] = loop.create_future()
    woken = recheck.watch(request, also=signal)
    assert callbacks(signal) == 1 and not woken.done()
    signal.set_result(b"a signal")
    assert await woken is request and recheck.watching() == 1
    # watched again with the next read: a watch replaced, or ended, takes its callback off
    following: asyncio.Future[bytes] = loop.create_future()
    again = recheck.watch(request, also=following)
    replaced: asyncio.Future[bytes] = loop.create_future()
    last = recheck.watch(request, also=replaced)
    assert callbacks(following) == 0 and callbacks(replaced) == 1 and not again.done()
    recheck.unwatch(request.request_id, last)
    assert callbacks(replaced) == 0 and last.cancelled() and recheck.watching() == 0
    replaced.set_result(b"late")  # wakes nothing, raises nothing
    await asyncio.sleep(0)
    # a way out that is done already wakes the watch at once
    done: asyncio.Future[bytes] = loop.create_future()
    done.set_result(b"early")
    assert recheck.watch(request, also=done).result() is request


async def test_one_read_per_chunk_wakes_only_the_decided_and_the_vanished() -> None:
    store = MemoryApprovalStore()
    recheck = ApprovalRecheck(store, FakeClock(NOW), interval_seconds=3600, chunk_size=500)
    requests = [pending(i) for i in range(1200)]
    for request in requests:
        await store.create(request)
    woken = [recheck.watch(request) for request in requests]
    store.requests[requests[7].request_id] = requests[7].decide(ApprovalStatus.APPROVED, by="u", at=NOW, reason=None)
    store.requests[requests[700].request_id] = replace(requests[700], status=ApprovalStatus.REJECTED)
    del store.requests[requests[1100].request_id]

    await recheck.check()

    assert [len(ids) for ids in store.get_many_calls] == [500, 500, 200]
    assert sorted(i for i, future in enumerate(woken) if future.done()) == [7, 700, 1100]
    assert woken[7].result() == store.requests[requests[7].request_id]
    assert woken[700].result() is not None and woken[700].result().status is ApprovalStatus.REJECTED  # type: ignore[union-attr]
    assert woken[1100].result() is None
    for request, future in zip(requests, woken, strict=True):
        recheck.unwatch(request.request_id, future)
    assert recheck.watching() == 0


async def test_a_failed_read_ends_no_wait_and_the_next_interval_tries_again(caplog: pytest.LogCaptureFixture) -> None:
    store = FlakyStore()
    recheck = ApprovalRecheck(store, FakeClock(NOW), interval_seconds=3600, chunk_size=2)
    requests = [pending(i) for i in range(3)]
    for request in requests:
        await store.create(request)
    woken = [recheck.watch(request) for request in requests]
    for request in requests:
        store.requests[request.request_id] = replace(request, status=ApprovalStatus.APPROVED)
    store.failures = 1  # the first chunk fails, the second is read

    with caplog.at_level(logging.WARNING, logger="aura.hitl"):
        await recheck.check()

    assert [f.done() for f in woken] == [False, False, True]
    assert "could not re-check 2 of 3 pending approval(s)" in caplog.text
    await recheck.check()
    assert [f.done() for f in woken] == [True, True, True]


async def test_a_wait_whose_expiry_the_clock_passed_is_woken_with_its_pending_request() -> None:
    store = MemoryApprovalStore()
    clock = FakeClock(NOW)
    recheck = ApprovalRecheck(store, clock, interval_seconds=3600)
    soon, later = pending(1, expires_at=NOW + 10), pending(2, expires_at=NOW + 20)
    for request in (soon, later):
        await store.create(request)
    woken = [recheck.watch(soon), recheck.watch(later)]
    clock.value += 10

    await recheck.check()

    assert woken[0].result() == soon and not woken[1].done()
    assert store.get_many_calls == [[later.request_id]]  # an expired wait needs no read


async def test_the_loop_runs_only_while_someone_waits_and_reads_every_interval() -> None:
    store = MemoryApprovalStore()
    recheck = ApprovalRecheck(store, FakeClock(NOW), interval_seconds=0.01)
    request = pending(1)
    await store.create(request)
    assert recheck._task is None
    woken = recheck.watch(request)
    task = recheck._task
    assert task is not None
    for _ in range(500):
        if len(store.get_many_calls) >= 3:
            break
        await asyncio.sleep(0.005)
    assert store.get_many_calls[:3] == [[request.request_id]] * 3
    recheck.unwatch(request.request_id, woken)
    await asyncio.wait_for(task, 1)  # ends at once, without waiting for the next interval
    assert recheck._task is None and woken.cancelled()
    again = recheck.watch(request)
    assert recheck._task is not None and recheck._task is not task
    recheck.unwatch(request.request_id, again)


async def test_unwatch_of_an_earlier_registration_leaves_the_current_one() -> None:
    store = MemoryApprovalStore()
    recheck = ApprovalRecheck(store, FakeClock(NOW), interval_seconds=3600)
    request = pending(1)
    first = recheck.watch(request)
    second = recheck.watch(request)
    recheck.unwatch(request.request_id, first)
    assert recheck.watching() == 1
    recheck.unwatch(request.request_id, second)
    assert recheck.watching() == 0


# -- the gate with the re-check -------------------------------------------------------------------


async def test_a_vanished_request_ends_the_wait_as_expired_at_the_next_recheck() -> None:
    h, commit = approval_harness(gate_settings=GateSettings(timeout_seconds=300), recheck_seconds=0.01)
    _, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    del h.store.requests[hitl.data["requestId"]]  # flushed
    events = await finish(watcher, seen)
    assert summary(events)[-3:] == [("timeline", "approval_1_1", "failed"), ("error", "hitl_timeout"),
                                    ("end", "timeout", "hitl_timeout")]
    assert commit.calls == []


async def test_a_failing_recheck_keeps_the_run_waiting_until_a_later_one_sees_the_decision() -> None:
    h, commit = approval_harness(gate_settings=GateSettings(timeout_seconds=300), recheck_seconds=0.01)
    failures = 3
    get_many = h.store.get_many

    async def flaky(request_ids: Sequence[str]) -> list[ApprovalRequest | None]:
        nonlocal failures
        if failures:
            failures -= 1
            raise StoreUnavailable("down")
        return await get_many(request_ids)

    h.store.get_many = flaky  # type: ignore[method-assign]
    _, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    await h.store.decide(hitl.data["requestId"], ApprovalStatus.APPROVED, decided_by="api-user",
                         decided_at=5, reason=None)  # stored, never signalled
    events = await finish(watcher, seen)
    assert failures == 0
    assert commit.calls == [{"value": "v"}] and events[-1].data["status"] == "completed"


class WallClock(Clock):
    def now(self) -> float:
        return time.time()


async def test_the_wait_expires_on_its_own_timer_not_at_the_next_recheck() -> None:
    h, commit = approval_harness(gate_settings=GateSettings(timeout_seconds=1), recheck_seconds=3600)
    h.clock = WallClock()  # type: ignore[assignment]
    h.gate._clock = h.clock
    h.gate._recheck = ApprovalRecheck(h.store, h.clock, 3600)
    _, watcher = await h.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    expires_at = hitl.data["expiresAt"]
    events = await finish(watcher, seen)
    ended = time.time()
    assert expires_at <= ended < expires_at + 0.5
    assert summary(events)[-1] == ("end", "timeout", "hitl_timeout")
    assert h.store.requests[hitl.data["requestId"]].status is ApprovalStatus.EXPIRED
    assert h.store.get_many_calls == [] and commit.calls == []
