"""Redis backends for the integration tests: an in-process fakeredis, a real `redis-server` and a
real Redis Cluster (3 masters, 3 replicas).

`redis_client` runs each test against all three. The real servers are started once per session on
free ports, without persistence, in a temporary directory, and killed at the end. A missing
binary fails the run: these tests exist to prove the adapters against the real thing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from adapters.redis.client import RedisClient
from app.embedded_redis import embedded_redis
from tests.defaults import client_of
from tests.redis_server import RedisCluster, RedisServer, flush_redis_cluster, free_port


@pytest.fixture
def unused_port() -> int:
    """A local port nothing listens on (for a client of a stopped server)."""
    return free_port()


BACKENDS = ["fakeredis", pytest.param("redis-server", marks=pytest.mark.redis_server),
            pytest.param("redis-cluster", marks=pytest.mark.redis_server)]


@pytest.fixture(params=BACKENDS)
async def redis_client(request: pytest.FixtureRequest) -> AsyncIterator[RedisClient]:
    """A client of a fresh, empty keyspace, once per backend."""
    client: RedisClient
    if request.param == "fakeredis":
        client = embedded_redis()
    elif request.param == "redis-server":
        server: RedisServer = request.getfixturevalue("redis_server")
        client = client_of(server.url)
        await client.flushall()
        await client.script_flush()
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        flush_redis_cluster(cluster)
        client = client_of(cluster.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def real_redis(redis_server: RedisServer) -> AsyncIterator[RedisClient]:
    """A client of the real server's fresh, empty keyspace, for what only a real server shows."""
    client = client_of(redis_server.url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def redis_server_port(redis_server: RedisServer) -> int:
    return redis_server.port
