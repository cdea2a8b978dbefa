"""Stopping a task that reads from Redis."""

from __future__ import annotations

import asyncio


async def stop_reader(reader: asyncio.Task[None] | None) -> None:
    """Cancel `reader` and wait until it has ended. On Python 3.11 asyncio.wait_for swallows a
    cancel that lands in the loop turn its awaited reply arrives in (CPython issue 86296;
    fakeredis, the in-process Redis, reads through it), so the cancel is repeated until the task
    is done: one cancel could leave the reader running and whoever waits for it waiting forever."""
    while reader is not None and not reader.done():
        reader.cancel()
        await asyncio.wait([reader], timeout=0.05)
    if reader is not None and not reader.cancelled():
        reader.exception()  # retrieved: an error the reader ended with is not reported again
