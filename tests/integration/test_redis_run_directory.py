"""The run directory's admission and close, each one round trip: exact keys, values and TTLs."""

from __future__ import annotations

import time
from dataclasses import replace

import orjson
import pytest
from redis.asyncio import Redis

from adapters.redis.client import is_cluster
from adapters.redis.limits import RedisStartRateLimiter
from adapters.redis.runs import ACTIVE_RUNS_KEY, RedisRunDirectory
from domain.model.errors import RunStartsTooFrequent, StoreUnavailable
from domain.model.runs import RunEnd, RunRecord
from tests.defaults import client_of, run_directory
from tests.integration.commands import CommandLog
from tests.redis_server import RedisCluster, flush_redis_cluster


def record(run_id: str, user: str = "alice", tenant: str = "acme") -> RunRecord:
    return RunRecord(run_id=run_id, session_id=f"ses_{run_id}", thread_id=f"thr_{run_id}", trace_id="t" * 32,
                     tenant_id=tenant, user_id=user, instance_id="aura-a", created_at=1767000000000)


async def admit(directory: RedisRunDirectory, run: RunRecord) -> str | None:
    return await directory.admit(run, user_limit=2, tenant_limit=3, slot_seconds=900, lease_seconds=15)


async def test_admission_takes_both_slots_and_registers_the_run_with_its_lease(redis_client: Redis) -> None:
    directory = run_directory(redis_client)
    before = time.time()
    assert await admit(directory, record("run_1")) is None
    assert orjson.loads(await redis_client.get("aura:run:{run_1}:meta")) == record("run_1").to_record()
    assert 86_390 < await redis_client.ttl("aura:run:{run_1}:meta") <= 86_400
    assert await redis_client.get("aura:run:{run_1}:lease") == b"aura-a"
    assert 14_000 < await redis_client.pttl("aura:run:{run_1}:lease") <= 15_000
    for key in ("aura:slots:{acme}:user:alice", "aura:slots:{acme}:tenant"):
        ((member, score),) = await redis_client.zrange(key, 0, -1, withscores=True)
        assert member == b"run_1" and before + 900 <= score <= time.time() + 900
        assert 950 < await redis_client.ttl(key) <= 960
    assert await directory.get("run_1") == record("run_1")


async def test_a_full_user_or_tenant_is_refused_and_nothing_is_written(redis_client: Redis) -> None:
    directory = run_directory(redis_client)
    assert [await admit(directory, record(r)) for r in ("run_1", "run_2")] == [None, None]
    assert await admit(directory, record("run_3")) == "user"
    assert await admit(directory, record("run_4", user="bob")) is None
    assert await admit(directory, record("run_5", user="carol")) == "tenant"
    for refused in ("run_3", "run_5"):
        assert await redis_client.exists(f"aura:run:{{{refused}}}:meta", f"aura:run:{{{refused}}}:lease") == 0
    assert await redis_client.zcard("aura:slots:{acme}:tenant") == 3


async def test_close_keeps_the_record_for_the_retention_time_and_frees_lease_and_slots(redis_client: Redis) -> None:
    directory = run_directory(redis_client)
    run = record("run_1")
    assert await admit(directory, run) is None
    await directory.close(run, "completed", 60, RunEnd("completed", "completed", "Done."))
    end = {"status": "completed", "reason": "completed", "message": "Done."}
    assert orjson.loads(await redis_client.get("aura:run:{run_1}:meta")) == {
        **run.to_record(), "status": "completed", "end": end}
    assert await directory.get("run_1") == replace(run, status="completed", end=RunEnd(**end))
    assert 50 < await redis_client.ttl("aura:run:{run_1}:meta") <= 60
    assert await redis_client.exists("aura:run:{run_1}:lease") == 0
    assert await redis_client.zcard("aura:slots:{acme}:user:alice") == 0
    assert await redis_client.zcard("aura:slots:{acme}:tenant") == 0
    assert [await admit(directory, record(r)) for r in ("run_2", "run_3")] == [None, None]  # the slot is free


async def test_on_a_cluster_a_run_is_recorded_only_once_the_active_index_holds_it(
        redis_cluster: RedisCluster) -> None:
    """A cluster runs a pipeline's parts on their nodes side by side: when the node of the active
    index refuses the run's entry (here a key of the wrong type stands in for a node lost in a
    failover), the run's record and lease must not be written, or the run stays `running` where
    the lost-run sweep never looks."""
    flush_redis_cluster(redis_cluster)
    client = client_of(redis_cluster.url)
    try:
        await client.set(ACTIVE_RUNS_KEY, b"not a sorted set")
        with pytest.raises(StoreUnavailable):
            await admit(run_directory(client), record("run_1"))
        assert await client.exists("aura:run:{run_1}:meta", "aura:run:{run_1}:lease") == 0
        await client.delete(ACTIVE_RUNS_KEY)
        assert await admit(run_directory(client), record("run_1")) is None
        assert await client.zscore(ACTIVE_RUNS_KEY, "run_1") is not None
    finally:
        await client.aclose()


async def test_on_one_server_a_run_is_closed_and_forgotten_in_one_round_trip(redis_client: Redis) -> None:
    """The close writes the final record, drops the lease and frees the slots and the index entry:
    one script on one server (a cluster keeps two steps, its keys being in different slots)."""
    directory = run_directory(redis_client)
    for run in (record("run_0"), record("run_1")):
        assert await admit(directory, run) is None
    assert await directory.close(record("run_0"), "completed", 60)  # its scripts are loaded now
    log = CommandLog(redis_client)
    assert await directory.close(run, "completed", 60)
    assert log.take() == (["EVALSHA", "PIPELINE"] if is_cluster(redis_client) else ["PACKED EVALSHA"])
    assert await redis_client.zscore(ACTIVE_RUNS_KEY, "run_1") is None
    assert await redis_client.zcard("aura:slots:{acme}:user:alice") == 0
    assert await redis_client.zcard("aura:slots:{acme}:tenant") == 0


async def test_a_server_that_lost_its_scripts_still_admits_and_closes(redis_client: Redis) -> None:
    """A restart or SCRIPT FLUSH between calls: the admission and the close load their scripts
    again and do all their work."""
    directory = run_directory(redis_client)
    assert await admit(directory, record("run_0")) is None
    assert await directory.close(record("run_0"), "completed", 60)  # its scripts are loaded now
    await redis_client.script_flush()
    run = record("run_1")
    assert await admit(directory, run) is None
    assert await redis_client.zcard("aura:slots:{acme}:user:alice") == 1
    await redis_client.script_flush()
    assert await directory.close(run, "completed", 60)
    assert orjson.loads(await redis_client.get("aura:run:{run_1}:meta"))["status"] == "completed"
    assert await redis_client.exists("aura:run:{run_1}:lease") == 0
    assert await redis_client.zscore(ACTIVE_RUNS_KEY, "run_1") is None
    assert await redis_client.zcard("aura:slots:{acme}:user:alice") == 0
    assert await redis_client.zcard("aura:slots:{acme}:tenant") == 0


async def test_a_run_whose_lease_is_gone_keeps_its_slots_and_index_entry_for_the_sweep(redis_client: Redis) -> None:
    directory = run_directory(redis_client)
    run = record("run_1")
    assert await admit(directory, run) is None
    await redis_client.delete("aura:run:{run_1}:lease")
    assert not await directory.close(run, "completed", 60)
    assert orjson.loads(await redis_client.get("aura:run:{run_1}:meta"))["status"] == "running"
    assert await redis_client.zscore(ACTIVE_RUNS_KEY, "run_1") is not None
    assert await redis_client.zrange("aura:slots:{acme}:user:alice", 0, -1) == [b"run_1"]
    assert await redis_client.zrange("aura:slots:{acme}:tenant", 0, -1) == [b"run_1"]


def limiter_of(client: Redis, limit: int) -> RedisStartRateLimiter:
    return RedisStartRateLimiter(client, limit=limit, window_seconds=60, now=lambda: 6_000_030.0)


async def test_on_one_server_the_start_rate_is_counted_in_the_admissions_round_trip(redis_client: Redis) -> None:
    directory = run_directory(redis_client)
    starts = limiter_of(redis_client, 2)
    assert await directory.admit(record("run_0"), user_limit=9, tenant_limit=9, slot_seconds=900, lease_seconds=15,
                                 starts=starts) is None  # its scripts are loaded now
    log = CommandLog(redis_client)
    assert await directory.admit(record("run_1"), user_limit=9, tenant_limit=9, slot_seconds=900, lease_seconds=15,
                                 starts=starts) is None
    assert log.take() == (["PIPELINE", "ZADD", "PIPELINE", "EVALSHA"] if is_cluster(redis_client)
                          else ["PACKED ZADD SET SET EVALSHA"])
    key = "aura:starts:{acme:alice}:100000"  # the window of 6,000,030 s, 60 s long
    assert await redis_client.get(key) == b"2"
    assert 55 < await redis_client.ttl(key) <= 61
    assert await redis_client.zrange("aura:slots:{acme}:tenant", 0, -1) == [b"run_0", b"run_1"]


async def test_a_start_over_the_rate_is_refused_with_the_wait_and_takes_nothing(redis_client: Redis) -> None:
    directory = run_directory(redis_client)
    starts = limiter_of(redis_client, 1)
    assert await directory.admit(record("run_1"), user_limit=9, tenant_limit=9, slot_seconds=900, lease_seconds=15,
                                 starts=starts) is None
    with pytest.raises(RunStartsTooFrequent) as refused:
        await directory.admit(record("run_2"), user_limit=9, tenant_limit=9, slot_seconds=900, lease_seconds=15,
                              starts=starts)
    assert refused.value.retry_after_seconds == 30  # the window opened at 6,000,000 s ends at 6,000,060
    assert await redis_client.get("aura:starts:{acme:alice}:100000") == b"2"  # a refused start counts
    assert await redis_client.exists("aura:run:{run_2}:meta", "aura:run:{run_2}:lease") == 0
    assert await redis_client.zscore(ACTIVE_RUNS_KEY, "run_2") is None
    assert await redis_client.zrange("aura:slots:{acme}:user:alice", 0, -1) == [b"run_1"]
    assert await redis_client.zrange("aura:slots:{acme}:tenant", 0, -1) == [b"run_1"]
    # another user of the tenant has a window of their own
    assert await directory.admit(record("run_3", user="bob"), user_limit=9, tenant_limit=9, slot_seconds=900,
                                 lease_seconds=15, starts=starts) is None


async def test_admission_and_close_on_a_stopped_server_fail_typed(unused_port: int) -> None:
    client = client_of(f"redis://127.0.0.1:{unused_port}/0", connect_timeout_seconds=0.2)
    try:
        directory = run_directory(client)
        with pytest.raises(StoreUnavailable):
            await admit(directory, record("run_1"))
        with pytest.raises(StoreUnavailable):
            await directory.close(record("run_1"), "completed", 60)
    finally:
        await client.aclose()
