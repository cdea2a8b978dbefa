"""The connection pool: a burst larger than it waits for a connection instead of failing or opening
more; a pool that stays full fails a command as StoreUnavailable after the pool timeout, never
hangs; the default pool is small and per topology (docs/operators.md, `AURA_REDIS__MAX_CONNECTIONS`)."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.settings import RedisSettings
from domain.model.errors import StoreUnavailable
from tests.defaults import DEFAULTS, client_of, run_directory
from tests.redis_server import RedisServer


def _open_connections(client: object) -> int:
    pool = client.connection_pool  # type: ignore[attr-defined]
    return len(pool._available_connections) + len(pool._in_use_connections)


async def test_a_burst_larger_than_the_pool_waits_instead_of_failing(redis_server: RedisServer) -> None:
    client = client_of(redis_server.url, max_connections=2, pool_timeout_seconds=5)
    try:
        # each BLPOP holds its connection for 50 ms: 20 of them need the 2 connections 10 times over
        results = await asyncio.gather(*(client.blpop([f"aura:test:empty:{i}"], timeout=0.05) for i in range(20)))
        assert results == [None] * 20
        assert _open_connections(client) <= 2
    finally:
        await client.aclose()


async def test_a_burst_on_the_default_pool_opens_no_more_than_its_size(redis_server: RedisServer) -> None:
    """What parking streams 50 at a time does to the pool: with the default settings 200 commands in
    flight at once share the default pool's connections (redis-py opens one per command in flight up
    to the cap)."""
    client = client_of(redis_server.url)
    try:
        results = await asyncio.gather(*(client.blpop([f"aura:test:empty:{i}"], timeout=0.01) for i in range(200)))
        assert results == [None] * 200
        assert _open_connections(client) == DEFAULTS.redis.max_connections == 32
    finally:
        await client.aclose()


async def test_a_full_pool_fails_a_command_as_store_unavailable_after_the_pool_timeout(
        redis_server: RedisServer) -> None:
    client = client_of(redis_server.url, max_connections=4, pool_timeout_seconds=0.3)
    pool = client.connection_pool
    held = [await pool.get_connection() for _ in range(4)]  # type: ignore[no-untyped-call]
    directory = run_directory(client)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(directory.get("run_missing"), timeout=10)
        waited = time.monotonic() - started
        assert 0.3 <= waited < 5, f"failed after {waited:.2f} s"
        await pool.release(held.pop())
        assert await directory.get("run_missing") is None  # a connection freed: the next command runs
    finally:
        for connection in held:
            await pool.release(connection)
        await client.aclose()


def test_the_pool_size_follows_the_topology() -> None:
    assert RedisSettings(url="redis://127.0.0.1:6379/0").pool_size == 32
    assert RedisSettings(url="redis+sentinel://127.0.0.1:26379/aura").pool_size == 32
    # redis-py's cluster client fails a command past the cap instead of waiting: its cap stays high
    assert RedisSettings(url="redis+cluster://127.0.0.1:7000").pool_size == 256
    assert RedisSettings(url="redis://h:1", max_connections=8, cluster_max_connections=64).pool_size == 8
    assert RedisSettings(url="redis+cluster://h:1", max_connections=8, cluster_max_connections=64).pool_size == 64
