"""A resume whose store fails mid-way still ends as a stream must: `error`, `end`, [DONE]."""

from __future__ import annotations

from collections.abc import Sequence

from adapters.http.streams import resumed_frames
from domain.model.errors import StoreUnavailable
from domain.model.events import Event, EventType
from domain.services.access import Notice, RunAccess
from tests.defaults import stream_config
from tests.unit.fakes import LogPollingFollower, RecordingControl, ScriptedModel, text
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
