"""Redis backends for the integration tests: an in-process fakeredis and a real `redis-server`.

`redis_client` runs each test against both. The real server is started once per session on a
free port, without persistence, in a temporary directory, and killed at the end. A missing
binary fails the run: these tests exist to prove the adapters against the real thing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from adapters.redis.client import create_redis
from tests.redis_server import RedisServer, free_port


@pytest.fixture
def unused_port() -> int:
    """A local port nothing listens on (for a client of a stopped server)."""
    return free_port()


BACKENDS = ["fakeredis", pytest.param("redis-server", marks=pytest.mark.redis_server)]


@pytest.fixture(params=BACKENDS)
async def redis_client(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    """A client of a fresh, empty keyspace, once per backend."""
    if request.param == "fakeredis":
        client = create_redis(None)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        client = create_redis(server.url)
        await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def real_redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A client of the real server's fresh, empty keyspace, for what only a real server shows."""
    client = create_redis(redis_server.url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def redis_server_port(redis_server: RedisServer) -> int:
    return redis_server.port
