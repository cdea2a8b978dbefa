"""Fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.redis_server import RedisServer, start_redis_server, stop_redis_server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; tests that need isolation use their own db or keys."""
    server = start_redis_server(tmp_path_factory.mktemp("redis-server"))
    try:
        yield server
    finally:
        stop_redis_server(server)


@pytest.fixture
def clean_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the session's redis-server, emptied first."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()
