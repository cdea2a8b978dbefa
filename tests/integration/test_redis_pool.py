"""Under a burst larger than the pool, commands wait for a connection instead of failing."""

from __future__ import annotations

import asyncio

from tests.defaults import client_of
from tests.redis_server import RedisServer


async def test_a_burst_larger_than_the_pool_waits_instead_of_failing(redis_server: RedisServer) -> None:
    client = client_of(redis_server.url, max_connections=2, pool_timeout_seconds=5)
    try:
        # each BLPOP holds its connection for 50 ms: 20 of them need the 2 connections 10 times over
        results = await asyncio.gather(*(client.blpop([f"aura:test:empty:{i}"], timeout=0.05) for i in range(20)))
        assert results == [None] * 20
        pool = client.connection_pool
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 2  # type: ignore[attr-defined]
    finally:
        await client.aclose()
