"""A command cancelled at any point either ends cancelled or had already completed: the
cancellation is never lost. redis-py writes every command under `asyncio.wait_for`, which before
Python 3.12 returned normally when the cancellation came just after the write had finished; a run
cancelled while it stored its approval request then waited for that approval with nobody
watching (the leak `tests/adversarial/test_churn.py` found)."""

from __future__ import annotations

import asyncio

from tests.defaults import client_of
from tests.redis_server import RedisServer

MAX_LOOP_STEPS = 500  # a SET on a local server completes long before that


async def loop_steps(count: int) -> None:
    """Let the event loop run `count` rounds (no time passes)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_a_command_cancelled_at_any_loop_step_ends_cancelled_or_completed(redis_server: RedisServer) -> None:
    client = client_of(redis_server.url, max_connections=1)
    try:
        await client.ping()  # connected: the first step of a command is its write
        lost: list[int] = []
        step = 0
        while True:  # cancel after 0, 1, 2, ... loop steps, until the command completes first
            assert step < MAX_LOOP_STEPS
            key = f"aura:test:cancel:{step}"
            command = asyncio.create_task(client.set(key, b"v"))
            await loop_steps(step)
            if not command.cancel():  # it had already completed: every later step would too
                assert command.result() is True
                break
            try:
                await command
                lost.append(step)
            except asyncio.CancelledError:
                pass
            step += 1
        assert lost == []
        assert step > 1  # cancels came while the command was under way, not only before it began
        # the one pooled connection is still in step with the server: each reply answers its command
        assert await client.set("aura:test:cancel:after", b"w") is True
        assert await client.get("aura:test:cancel:after") == b"w"
        assert await client.get(f"aura:test:cancel:{step}") == b"v"
    finally:
        await client.aclose()
