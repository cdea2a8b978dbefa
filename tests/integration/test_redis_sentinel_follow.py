"""Following runs under Sentinel (a real group: 1 master, 1 replica, 3 sentinels): an idle follow
asks the sentinels nothing (the follower learns of a failover from their `+switch-master`
message), and a failover moves the follower's Pub/Sub connection to the new master, where the
follow goes on receiving the run's events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
import redis as sync_redis

from adapters.redis.client import close_redis
from adapters.redis.events import RedisEventLog
from adapters.redis.sentinel import master_watch
from domain.model.events import Event, EventType, RunIds
from tests.defaults import EVENT_LOG, client_of, run_follower
from tests.integration.commands import CommandLog
from tests.integration.test_redis_follower import LoopClock
from tests.sentinel_group import SentinelGroup, start_sentinel_group

pytestmark = pytest.mark.redis_server

IDS = RunIds("run_s", "ses_s", "thr_s", "t" * 32)


def event(seq: int) -> Event:
    return Event(EventType.CONTENT, seq, IDS, 1767000000000 + seq, {"content": f"c{seq}", "chunk": True})


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - the follower's own tasks set what this waits for
            await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    sentinels = start_sentinel_group(tmp_path_factory.mktemp("sentinel-follow"))
    try:
        yield sentinels
    finally:
        sentinels.stop()


async def test_an_idle_follow_asks_the_sentinels_nothing_and_a_failover_moves_it(group: SentinelGroup) -> None:
    group.wait_until_healthy()
    with group.master() as master:
        master.flushall()
    owner = client_of(group.url)
    follower_client = client_of(group.url)
    log = RedisEventLog(owner, **EVENT_LOG)
    follower = run_follower(follower_client, block_ms=1000)
    await log.append(event(1))
    follow = follower.follow(IDS.run_id, 0)
    clock = LoopClock()
    try:
        assert (await anext(follow)).seq == 1
        watch = master_watch(follower_client)
        assert watch is not None
        await until(lambda: watch.address is not None)  # subscribed, and the master it names learnt
        # what the follower's client sends the sentinels (its Pub/Sub subscription to one of them aside)
        asked = [CommandLog(sentinel) for sentinel in follower_client.connection_pool.sentinel_manager.sentinels]
        reader = asyncio.create_task(anext(follow))
        await clock.advance(20)  # twenty seconds of an idle follow
        assert reader.done() and reader.result() is None
        assert [log.take() for log in asked] == [[], [], []]
    finally:
        clock.restore()

    try:
        new_master = await asyncio.to_thread(group.failover)
        # moved once the sentinels announced the switch
        await until(lambda: follower._pubsub is not None and follower._pubsub.connection is not None
                    and follower._pubsub.connection.port == new_master)
        assert watch.address == ("127.0.0.1", new_master)
        await log.append(event(2))  # on the new master (the owner's write met READONLY and moved)
        item = None
        while item is None:
            item = await asyncio.wait_for(anext(follow), 10)
        assert item.seq == 2
        with sync_redis.Redis(host="127.0.0.1", port=new_master) as master:
            assert master.execute_command("ROLE")[0] == b"master"
    finally:
        await follow.aclose()
        await follower.aclose()
        await log.aclose()
        await close_redis(owner)
        await close_redis(follower_client)
