"""A finished run leaves no reference cycles: reference counting frees it as soon as the last
reference goes, instead of a garbage collection freeing every finished run at once, in pauses of
tens of milliseconds under load (docs/performance.md, "Parked runs")."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator

import pytest

from domain.model.approval import Signal
from domain.model.errors import ToolFailure
from domain.model.events import Event
from domain.model.run import Run
from domain.runtime.feed import RunFeed
from domain.services.run_handle import RunHandle
from tests.unit.fakes import RecordingTool
from tests.unit.test_approval_gate import approval_harness, finish, until

WATCHED = (Run, RunFeed, RunHandle, ToolFailure)


@pytest.fixture
def garbage() -> Iterator[list[object]]:
    """What a garbage collection would find unreachable, kept for inspection (not freed)."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        gc.collect()


def cyclic(garbage: list[object]) -> Counter[str]:
    gc.collect()
    return Counter(type(o).__name__ for o in garbage if isinstance(o, WATCHED))


async def approved_run(tool: RecordingTool) -> list[Event]:
    harness, _ = approval_harness(tool)
    handle, watcher = await harness.start()
    seen: list[Event] = []
    hitl = await until(watcher, "hitl", seen)
    await harness.bus.publish(handle.run.ids.session_id, Signal.approval(hitl.data["requestId"], "bob", 1_767_000_010))
    events = await finish(watcher, seen)
    assert handle.task is not None
    await handle.task
    harness.service.release(handle, watcher, disconnected=False)
    return events


async def test_a_finished_run_is_freed_without_a_garbage_collection(garbage: list[object]) -> None:
    tool = RecordingTool("commit", requires_approval=True, result={"summary": "committed abc123"})
    events = await approved_run(tool)
    assert [e.data["status"] for e in events if e.type.value == "tool_execution"] == ["pending", "running", "success"]
    assert events[-1].data["status"] == "completed"
    del events
    assert cyclic(garbage) == Counter()


async def test_a_failed_tool_call_leaves_no_cycle_through_its_traceback(garbage: list[object]) -> None:
    tool = RecordingTool("commit", requires_approval=True, failure="the repository is locked")
    events = await approved_run(tool)
    failed = [e.data for e in events if e.type.value == "tool_execution" and e.data["status"] == "failed"]
    assert [d["error"] for d in failed] == ["the repository is locked"]
    del events, failed
    assert cyclic(garbage) == Counter()
