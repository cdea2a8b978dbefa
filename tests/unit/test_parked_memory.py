"""What a run waiting for approval keeps in memory (docs/performance.md, parked runs): each cut here
must keep the behaviour it replaced."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections import deque

import orjson
import pytest

from adapters.http.routes.streaming import StreamConfig, live_frames
from adapters.wire import envelope_bytes, exact_bytes
from domain.events import Event, EventType, RunIds
from domain.service import Subscription, SubscriptionOverflow

IDS = RunIds("run_1", "ses_1", "thr_1", "t" * 32)


def event(seq: int, type_: EventType = EventType.THOUGHT) -> Event:
    return Event(type_, seq, IDS, 0, {"content": "x" * 200})


# -- the encoded envelope kept with an event -------------------------------------------------------

def test_an_events_envelope_bytes_take_their_own_size_not_orjsons_buffer() -> None:
    sample = event(1)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        encoded = envelope_bytes(sample)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert orjson.loads(encoded) == sample.envelope()
    assert envelope_bytes(sample) is encoded  # encoded once, shared
    assert grown < 2 * len(encoded) + 512, f"{grown} bytes kept for {len(encoded)} bytes of envelope"


def test_exact_bytes_keeps_the_content() -> None:
    raw = orjson.dumps({"a": "é" * 100})
    assert exact_bytes(raw) == raw


# -- a watcher's buffer --------------------------------------------------------------------------------

def _holds_a_deque(watcher: Subscription) -> bool:
    return any(isinstance(ref, deque) for ref in gc.get_referents(watcher))


async def test_a_watcher_waiting_on_an_empty_buffer_holds_no_deque_and_still_gets_every_event() -> None:
    watcher = Subscription(max_buffered=8)
    for seq in (1, 2):
        watcher.push(event(seq))
    assert [(await watcher.next(1.0)).seq, (await watcher.next(1.0)).seq] == [1, 2]  # type: ignore[union-attr]
    waiting = asyncio.ensure_future(watcher.next(5.0))
    await asyncio.sleep(0)
    assert not waiting.done() and not _holds_a_deque(watcher)
    watcher.push(event(3))
    watcher.push(event(4))
    assert (await waiting).seq == 3  # type: ignore[union-attr]
    assert [e.seq for e in watcher.take_buffered(10)] == [4]
    watcher.close()


async def test_a_quiet_watcher_still_gets_its_heartbeat_and_an_overflow_still_raises() -> None:
    watcher = Subscription(max_buffered=2)
    assert await watcher.next(0.01) is None
    for seq in range(1, 4):
        watcher.push(event(seq))
    with pytest.raises(SubscriptionOverflow):
        await watcher.next(1.0)
    assert not _holds_a_deque(watcher)  # the overflowed buffer was freed at once
    watcher.close()


# -- the SSE writer of a live stream ------------------------------------------------------------------

class _Release:
    finished = False
    calls = 0

    def __call__(self) -> None:
        self.calls += 1


async def test_a_stream_waiting_for_its_next_event_holds_none_of_the_events_it_wrote() -> None:
    watcher = Subscription(max_buffered=64)
    release = _Release()
    frames = live_frames(release, watcher, StreamConfig(heartbeat_seconds=60))  # type: ignore[arg-type]
    watcher.push(event(1, EventType.HITL))
    watcher.push(event(2, EventType.PLAN_STEP_UPDATE))
    first = await frames.__anext__()
    assert first.startswith(b"id: 1\nevent: hitl\n") and b"id: 2\nevent: plan_step_update\n" in first
    waiting = asyncio.ensure_future(frames.__anext__())
    await asyncio.sleep(0)
    assert not waiting.done()
    frame = frames.ag_frame  # type: ignore[attr-defined]
    assert frame is not None
    held = [value for value in frame.f_locals.values() if isinstance(value, Event)]
    assert held == [], f"the waiting stream holds {held}"
    watcher.push(Event(EventType.END, 3, IDS, 0, {"status": "completed", "reason": "completed", "message": "m"}))
    last = await waiting
    assert last.startswith(b"id: 3\nevent: end\n") and last.endswith(b"data: [DONE]\n\n")
    with pytest.raises(StopAsyncIteration):
        await frames.__anext__()
    assert release.finished is True and release.calls == 1
