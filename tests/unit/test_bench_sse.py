"""The bench's SSE reader counts what each server sends: events, and comment lines wherever they
stand (Aura's heartbeat is a comment line with no blank line after it, docs/contract.md; the
peer's and the floor's are comment frames)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from bench.sse import SSEStream


class Blocks:
    """A response whose body arrives in the given blocks."""

    def __init__(self, *blocks: bytes) -> None:
        self.blocks = blocks

    async def body_blocks(self) -> AsyncIterator[bytes]:
        for block in self.blocks:
            yield block


EVENT = b"id: r:1\nevent: content\ndata: {}\n\n"
AURA_PARKED = (EVENT, b": ping\n", b": ping\n", b": pi", b"ng\n")
AURA_BUSY = (EVENT + b": ping\n" + EVENT, b": ping\nid: r:3\nevent: end\ndata: {}\n\n", b"data: [DONE]\n\n")
FLOOR = (EVENT, b":\n\n", b": ping\n\n" + EVENT + b"data: [DONE]\n\n")


@pytest.mark.parametrize(("blocks", "events", "comments"), [
    (AURA_PARKED, 1, 3), (AURA_BUSY, 3, 2), (FLOOR, 2, 2)])
async def test_frames_read_one_by_one_count_every_event_and_comment(
        blocks: tuple[bytes, ...], events: int, comments: int) -> None:
    stream = SSEStream(Blocks(*blocks))  # type: ignore[arg-type]
    frames = []
    while (frame := await stream.next_frame()) is not None:
        frames.append(frame)
    assert (stream.events, stream.comments) == (events, comments)
    named = (b"event:", b"data: [DONE]")
    assert [line for frame in frames if not frame.startswith(b":") for line in frame.split(b"\n")
            if line.startswith(named)] == [line for line in b"".join(blocks).split(b"\n") if line.startswith(named)]
    assert not any(frame.startswith(b":") and frame != b":" for frame in frames)


@pytest.mark.parametrize(("blocks", "events", "comments"), [
    (AURA_PARKED, 1, 3), (AURA_BUSY, 3, 2), (FLOOR, 2, 2)])
async def test_a_drained_stream_counts_the_same(blocks: tuple[bytes, ...], events: int, comments: int) -> None:
    stream = SSEStream(Blocks(*blocks))  # type: ignore[arg-type]
    await stream.drain()
    assert (stream.events, stream.comments) == (events, comments)
    assert stream.done == blocks[-1].endswith(b"data: [DONE]\n\n")
