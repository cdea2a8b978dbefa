"""Scripts on a Redis Cluster through a failover: a batch's calls of one slot run in the order
given, and the scripts are loaded on every node, replicas too, so the replica a failover promotes
knows them already (a promoted master that lacked them answered NOSCRIPT to the first appends of
a run and, once another client loaded them, ran the later ones: a run's log with a hole)."""

from __future__ import annotations

import redis as sync_redis

from adapters.redis.client import run_batch
from adapters.redis.events import RedisEventLog, _PendingAppend, event_log_key
from domain.model.events import Event, EventType, RunIds
from tests.defaults import EVENT_LOG, client_of
from tests.redis_server import RedisCluster, flush_redis_cluster


def event(run_id: str, seq: int) -> Event:
    return Event(EventType.CONTENT, seq, RunIds(run_id, "ses", "thr", "t" * 32), 1767000000000 + seq,
                 {"content": f"c{seq}", "chunk": True})


async def test_a_script_a_batch_loads_is_known_to_every_node_replicas_too(redis_cluster: RedisCluster) -> None:
    flush_redis_cluster(redis_cluster)
    client = client_of(redis_cluster.url)
    log = RedisEventLog(client, **EVENT_LOG)
    for port in redis_cluster.ports:  # no node knows it (a replica keeps what was loaded on it)
        with sync_redis.Redis(host="127.0.0.1", port=port) as node:
            node.script_flush()
            assert node.script_exists(log._append.sha) == [False]
    try:
        await log.append(event("run_a", 1))  # NOSCRIPT: loaded, then sent again
        for port in redis_cluster.ports:
            with sync_redis.Redis(host="127.0.0.1", port=port) as node:
                assert node.script_exists(log._append.sha) == [True], f"node {port} lacks the append script"
    finally:
        await log.aclose()
        await client.aclose()


async def test_calls_of_one_slot_that_meet_an_unknown_script_run_again_in_order(redis_cluster: RedisCluster) -> None:
    """Every call of the batch meets NOSCRIPT (a promoted master without the script): each is sent
    again once the script is loaded, in the order given, and the run's log has no hole."""
    flush_redis_cluster(redis_cluster)
    client = client_of(redis_cluster.url)
    log = RedisEventLog(client, **EVENT_LOG)
    try:
        calls = [log._append_arguments([_PendingAppend(event("run_b", seq), b"", None, lambda _: None)])
                 for seq in range(1, 21)]
        replies = await run_batch(client, [(log._append, keys, args) for keys, args in calls])
        assert replies == [[b"ok", 1, 0]] * 20
        entries = await client.xrange(event_log_key("run_b"))
        assert [entry_id for entry_id, _ in entries] == [b"%d-1" % seq for seq in range(1, 21)]
    finally:
        await log.aclose()
        await client.aclose()
