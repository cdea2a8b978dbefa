"""A resume ends as a stream must, whatever fails under it: `end` then [DONE] (the `end` a notice
with a retryable `error` before it when the store failed), never a [DONE] alone unless the client
has the run's `end`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import orjson

from adapters.http.streams import resumed_frames
from domain.model.errors import StoreUnavailable
from domain.model.events import Event, EventType
from domain.model.runs import RunFollower, RunRecord
from domain.services.access import Notice, ResumeItem, RunAccess
from tests.defaults import stream_config
from tests.unit.fakes import (
    LogPollingFollower,
    MemoryEventLog,
    MemoryRunDirectory,
    RecordingControl,
    ScriptedModel,
    text,
)
from tests.unit.harness import ALICE, Harness, collect


class FailingReads:
    """Wraps the harness's log: replays fail once `fail` is set."""

    def __init__(self, harness: Harness) -> None:
        self.fail = False
        self._log = harness.log

    def __getattr__(self, name: str) -> object:
        return getattr(self._log, name)

    async def read_after(self, run_id: str, after_seq: int, limit: int = 500) -> Sequence[Event]:
        if self.fail:
            raise StoreUnavailable("The event log is unavailable.")
        return await self._log.read_after(run_id, after_seq, limit)


async def test_a_store_failure_during_a_resume_ends_the_stream_with_error_end_and_done() -> None:
    h = Harness(ScriptedModel(text('{"steps": []}'), text("ok"), text("answer")))
    handle, watcher = await h.start()
    await collect(watcher)
    reads = FailingReads(h)
    access = RunAccess(h.service, h.directory, reads, LogPollingFollower(h.log),  # type: ignore[arg-type]
                       RecordingControl(), h.clock, retention_seconds=h.run_limits.retention_seconds)
    reads.fail = True
    items = [item async for item in access.resume(ALICE, handle.run_id, 1, 15.0)]
    assert [(type(i).__name__, i.type, i.data.get("errorType") or i.data.get("reason")) for i in items
            if i is not None] == [("Notice", EventType.ERROR, "store_unavailable"),
                                  ("Notice", EventType.END, "store_unavailable")]
    assert all(isinstance(i, Notice) for i in items)
    reads.fail = True
    body = b"".join([frame async for frame in resumed_frames(access.resume(ALICE, handle.run_id, 1, 15.0),
                                                              stream_config())])
    assert body.count(b"event: error\n") == 1 and body.count(b"event: end\n") == 1
    assert body.endswith(b"data: [DONE]\n\n") and b"id:" not in body


def access_of(h: Harness, follower: RunFollower | None = None) -> RunAccess:
    return RunAccess(h.service, h.directory, h.log, follower or LogPollingFollower(h.log), RecordingControl(),
                     h.clock, retention_seconds=h.run_limits.retention_seconds)


def outline(items: list[ResumeItem]) -> list[tuple[str, EventType, int, object]]:
    return [(type(i).__name__, i.type, i.seq if isinstance(i, Event) else 0,
             i.data.get("errorType") or i.data.get("reason")) for i in items if i is not None]


async def test_a_resume_from_beyond_a_finished_runs_log_ends_with_the_runs_end() -> None:
    """An id the log does not hold (events a dying Redis master took with it, or a client's
    bookkeeping error): the client cannot have the run's `end`, so it gets it, not a bare [DONE]."""
    h = Harness(ScriptedModel(text('{"steps": []}'), text("ok"), text("answer")))
    handle, watcher = await h.start()
    end = (await collect(watcher))[-1]
    assert end.type is EventType.END
    access = access_of(h)
    items = [item async for item in access.resume(ALICE, handle.run_id, end.seq + 3, 15.0)]
    assert outline(items) == [("Event", EventType.END, end.seq, "completed")]
    body = b"".join([frame async for frame in resumed_frames(access.resume(ALICE, handle.run_id, end.seq + 3, 15.0),
                                                              stream_config())])
    assert body.endswith(b"event: end\ndata: " + orjson.dumps(end.envelope()) + b"\n\ndata: [DONE]\n\n")
    # from the id of its `end` itself: just [DONE] (the client has it)
    assert [item async for item in access.resume(ALICE, handle.run_id, end.seq, 15.0)] == []


class EndsEarly(RunFollower):
    """A follow that ends before the run's `end` (its close was announced on a connection to a
    demoted Redis master, say) while the record, read elsewhere, still says running."""

    async def follow(self, run_id: str, after_seq: int) -> AsyncIterator[Event | None]:
        yield None


async def test_a_follow_that_ends_before_the_runs_end_ends_the_stream_with_a_retryable_error() -> None:
    h = Harness(ScriptedModel(text('{"steps": []}'), text("ok"), text("answer")))
    record = RunRecord(run_id="run_elsewhere", session_id="ses_1", thread_id="thr_1", trace_id="t" * 32,
                       tenant_id=ALICE.tenant_id, user_id=ALICE.user_id, instance_id="aura-other", created_at=1)
    await h.directory.admit(record, user_limit=5, tenant_limit=5, slot_seconds=60, lease_seconds=15)
    access = access_of(h, EndsEarly())
    items = [item async for item in access.resume(ALICE, "run_elsewhere", 0, 15.0)]
    assert outline(items) == [("Notice", EventType.ERROR, 0, "store_unavailable"),
                              ("Notice", EventType.END, 0, "store_unavailable")]
    assert items[-1].data["status"] == "failed"  # type: ignore[union-attr]


class BreaksAfter(MemoryEventLog):
    """Takes the run's first `seq` events, then refuses every one (the store went away, or a
    failover's replicas did not confirm them): the run's closing `error` and `end` never reach it."""

    def __init__(self, seq: int) -> None:
        super().__init__()
        self._seq = seq

    def submit(self, event: Event, snapshot: Mapping[str, Any] | None,
               logged: Callable[[Exception | None], None]) -> None:
        if event.seq > self._seq:
            logged(StoreUnavailable("The event log is unavailable."))
        else:
            super().submit(event, snapshot, logged)


async def test_a_run_whose_end_never_reached_the_log_is_said_to_have_ended_as_its_record_says() -> None:
    """Its final record keeps how it ended (status, reason, message): a resume's closing `end`
    notice says that, not reason `unknown`."""
    h = Harness(ScriptedModel(text('{"steps": []}'), text("ok"), text("answer")))
    h.log = BreaksAfter(2)
    h.directory = MemoryRunDirectory(h.log)
    h.rebuild()
    handle, _watcher = await h.start()
    assert handle.task is not None
    await asyncio.wait([handle.task])  # it ends (cancelled by its store failure, or not)
    assert [e.seq for e in h.log.events[handle.run_id]] == [1, 2]
    record = h.directory.records[handle.run_id]
    assert record.status == "failed"
    items = [item async for item in access_of(h).resume(ALICE, handle.run_id, 2, 15.0)]
    assert [(type(i).__name__, i.type, i.data) for i in items if i is not None] == [
        ("Notice", EventType.END, {"status": "failed", "reason": "store_unavailable",
                                   "message": "The event log is unavailable."})]
