"""Readiness is whether the store takes a write: a reachable server, a healthy cluster, and what
must fail `/ready` — a cluster whose state is not ok (a master gone, no replica to take over), a
single-server URL pointed at a cluster node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import ResponseError

from adapters.redis.health import PROBE_KEY, SCRIPT_PROBE_KEYS, store_problem
from tests.defaults import client_of, health_probe
from tests.redis_server import RedisCluster, start_redis_cluster, stop_redis_cluster, stop_redis_server

pytestmark = pytest.mark.redis_server


@pytest.fixture
def cluster_without_replicas(tmp_path: Path) -> Iterator[RedisCluster]:
    """A cluster of its own (3 masters, no replica): this test takes it down."""
    cluster = start_redis_cluster(tmp_path, replicas=0)
    try:
        yield cluster
    finally:
        stop_redis_cluster(cluster)


async def test_a_healthy_cluster_is_ready_and_takes_the_probe_write(redis_cluster: RedisCluster) -> None:
    client = client_of(redis_cluster.url)
    try:
        assert await health_probe(client).check() is None
        for key in (PROBE_KEY, *SCRIPT_PROBE_KEYS):
            assert await client.get(key) == b"1"
            assert 0 < await client.pttl(key) <= 10_000
    finally:
        await client.aclose()


async def test_a_cluster_that_lost_a_master_is_not_ready(cluster_without_replicas: RedisCluster) -> None:
    client = client_of(cluster_without_replicas.url, socket_timeout_seconds=0.5, connect_timeout_seconds=0.5)
    try:
        assert await health_probe(client).check() is None
        stop_redis_server(cluster_without_replicas.nodes[0])  # its slots have no primary now
        reason = await health_probe(client, timeout_seconds=5.0).check()
        # the primary is gone (unreachable), or the others already say the cluster failed
        assert reason == "redis unreachable" or (reason or "").startswith("redis cluster state is fail"), reason
    finally:
        await client.aclose()


async def test_a_single_server_url_at_a_cluster_node_is_not_ready(redis_cluster: RedisCluster) -> None:
    client = client_of(f"redis://127.0.0.1:{redis_cluster.ports[0]}")
    try:
        assert await health_probe(client).check() == "redis is a cluster node: use a redis+cluster:// URL"
    finally:
        await client.aclose()


async def test_a_set_up_that_refuses_a_runs_script_is_not_ready(redis_cluster: RedisCluster) -> None:
    """What a proxy without scripts, or one that spreads a hash tag over slots, answers."""
    client = client_of(redis_cluster.url)

    async def refused(*_: object, **__: object) -> object:
        raise ResponseError("CROSSSLOT Keys in request don't hash to the same slot")

    try:
        client.evalsha = refused  # type: ignore[method-assign]
        assert await store_problem(client) == "redis refuses writes: CROSSSLOT"
    finally:
        await client.aclose()


async def test_a_cluster_of_one_master_serves_every_slot_and_is_ready(tmp_path: Path) -> None:
    """The smallest cluster bench/cluster_scaling.py measures (redis-cli --cluster create refuses
    fewer than 3 masters: tests/redis_nodes.py assigns the slots by hand), with a replica."""
    cluster = start_redis_cluster(tmp_path, masters=1, replicas=1)
    client = client_of(cluster.url)
    try:
        master, replica = cluster.nodes
        with redis.Redis(port=master.port) as node:  # every slot on the master, in one range
            assert [(start, end, int(owner[1])) for start, end, owner, *_ in
                    node.execute_command("CLUSTER", "SLOTS")] == [(0, 16383, master.port)]
        with redis.Redis(port=replica.port) as node:
            replication = node.info("replication")
            assert (replication["role"], replication["master_port"]) == ("slave", master.port)
        assert await health_probe(client).check() is None
        for key in (PROBE_KEY, *SCRIPT_PROBE_KEYS):
            assert await client.get(key) == b"1"
    finally:
        await client.aclose()
        stop_redis_cluster(cluster)
