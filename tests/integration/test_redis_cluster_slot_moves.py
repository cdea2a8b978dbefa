"""A followed run whose slot moves to another primary (a Redis Cluster failover) while its reader
set is lost with the old master: the follow must not stall. The owner, whose next command meets
the move (redis-py refreshes its slot map), tells the run's followers to note their entries again
(`NOTE_AGAIN`); they do, read the log after their position, and the owner publishes to them again.

A master killed before its replica had the reader entry is what loses it; here a coordinated
`CLUSTER FAILOVER` moves the slot and the entry is deleted first (what the kill would have lost),
so the test is exact and takes no node timeout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import redis as sync_redis

from adapters.redis.client import RedisClient, close_redis
from adapters.redis.events import RedisEventLog
from adapters.redis.runs import reader_key
from domain.model.events import Event
from tests.defaults import EVENT_LOG, client_of, run_directory, run_follower
from tests.e2e.test_cluster_failover import cluster_failover
from tests.integration.test_redis_follower import IDS, RECORD, event
from tests.redis_server import RedisCluster, start_redis_cluster, stop_redis_cluster

pytestmark = pytest.mark.redis_server


@pytest.fixture
def moving_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A cluster of each test's own: the test swaps a master and its replica (a second manual
    failover of the same slot right after the first one is not always taken)."""
    cluster = start_redis_cluster(tmp_path_factory.mktemp("slot-moves"))
    try:
        yield cluster
    finally:
        stop_redis_cluster(cluster)


@pytest.fixture
async def owner_and_follower(moving_cluster: RedisCluster) -> AsyncIterator[tuple[RedisClient, RedisClient]]:
    owner, follower = client_of(moving_cluster.url), client_of(moving_cluster.url)
    try:
        yield owner, follower
    finally:
        await close_redis(owner)
        await close_redis(follower)


async def next_event(follow: AsyncIterator[Event | None]) -> Event:
    async with asyncio.timeout(10):  # a stalled follow fails here
        while (item := await anext(follow)) is None:
            pass
        return item


async def test_a_follow_goes_on_when_its_runs_slot_moves_and_the_reader_set_was_lost(
        moving_cluster: RedisCluster, owner_and_follower: tuple[RedisClient, RedisClient]) -> None:
    owner, follower_client = owner_and_follower
    log = RedisEventLog(owner, **EVENT_LOG)
    # the run's record, running (a follow told to look again also looks whether the run closed)
    assert await run_directory(owner).admit(RECORD, user_limit=5, tenant_limit=5, slot_seconds=60,
                                            lease_seconds=60) is None
    follower = run_follower(follower_client, block_ms=100)
    follow = follower.follow(IDS.run_id, 0)
    try:
        await log.append(event(1))
        assert (await next_event(follow)).seq == 1
        with sync_redis.RedisCluster(host="127.0.0.1", port=moving_cluster.ports[0]) as admin:
            primary = admin.get_node_from_key(reader_key(IDS.run_id)).port
            assert admin.delete(reader_key(IDS.run_id)) == 1  # what a killed master takes along
        new_primary = await asyncio.to_thread(cluster_failover, moving_cluster, primary)

        await log.append(event(2))  # meets the move (MOVED): the owner's slot map changes
        await log.append(event(3))
        assert [(await next_event(follow)).seq for _ in range(2)] == [2, 3]
        with sync_redis.Redis(host="127.0.0.1", port=new_primary) as moved:
            assert moved.zcard(reader_key(IDS.run_id)) == 1  # the follow's entry, noted again
        await log.append(event(4))  # published to it
        assert (await next_event(follow)).seq == 4
    finally:
        await follow.aclose()
        await follower.aclose()
        await log.aclose()


async def test_a_follower_whose_own_command_meets_the_move_notes_its_entries_again(
        moving_cluster: RedisCluster, owner_and_follower: tuple[RedisClient, RedisClient]) -> None:
    """The follower's process learns of the move by itself (any command of its own on the slot):
    its follows of runs there note their entries again, whether or not the owner said so (this
    owner's client is new after the move: it saw no move to announce)."""
    owner, follower_client = owner_and_follower
    first_log = RedisEventLog(owner, **EVENT_LOG)
    assert await run_directory(owner).admit(RECORD, user_limit=5, tenant_limit=5, slot_seconds=60,
                                            lease_seconds=60) is None
    await first_log.append(event(1))
    await first_log.aclose()
    follower = run_follower(follower_client, block_ms=100)
    follow = follower.follow(IDS.run_id, 0)
    later_owner = None
    try:
        assert (await next_event(follow)).seq == 1
        with sync_redis.RedisCluster(host="127.0.0.1", port=moving_cluster.ports[0]) as admin:
            primary = admin.get_node_from_key(reader_key(IDS.run_id)).port
            assert admin.delete(reader_key(IDS.run_id)) == 1
        await asyncio.to_thread(cluster_failover, moving_cluster, primary)

        reading = asyncio.create_task(next_event(follow))  # the stream's reader, waiting as it does
        await follower_client.exists(reader_key(IDS.run_id))  # meets the move: MOVED, a new slot map
        later_owner = client_of(moving_cluster.url)
        log = RedisEventLog(later_owner, **EVENT_LOG)
        try:
            async with asyncio.timeout(10):
                while not await later_owner.exists(reader_key(IDS.run_id)):  # noqa: ASYNC110 - the follow's task notes
                    await asyncio.sleep(0.01)
            await log.append(event(2))
            assert (await reading).seq == 2
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            await log.aclose()
    finally:
        await follow.aclose()
        await follower.aclose()
        if later_owner is not None:
            await close_redis(later_owner)
