"""Fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from tests.redis_server import (
    RedisCluster,
    RedisServer,
    flush_redis_cluster,
    start_redis_cluster,
    start_redis_server,
    stop_redis_cluster,
    stop_redis_server,
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; tests that need isolation use their own db or keys."""
    server = start_redis_server(tmp_path_factory.mktemp("redis-server"))
    try:
        yield server
    finally:
        stop_redis_server(server)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One real Redis Cluster (3 masters, 3 replicas) for the session, started on first use."""
    cluster = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        stop_redis_cluster(cluster)


@pytest.fixture
def clean_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the session's redis-server, emptied first."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@dataclass
class Store:
    """A real Redis for a test, emptied first: its URL (as Aura takes it) and a client to look."""

    kind: str
    url: str
    client: Any  # redis.Redis or redis.RedisCluster: the commands the tests use are the same

    def keys(self, pattern: str) -> list[bytes]:
        """Every key matching `pattern`, on every master (redis-py sends a cluster's KEYS to one node)."""
        if isinstance(self.client, redis.RedisCluster):
            return sorted(self.client.keys(pattern, target_nodes=redis.RedisCluster.PRIMARIES))
        return sorted(self.client.keys(pattern))


@pytest.fixture(params=["redis-server", "redis-cluster"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """Each test once on one redis-server and once on a 3-master Redis Cluster."""
    if request.param == "redis-server":
        server: RedisServer = request.getfixturevalue("redis_server")
        client: Any = redis.Redis.from_url(server.url)
        client.flushall()
        client.script_flush()
        yield Store("redis-server", server.url, client)
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        flush_redis_cluster(cluster)
        client = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
        yield Store("redis-cluster", cluster.url, client)
    client.close()
