"""Following a run another instance owns: the events arrive in order as the owner logs them, with
no Redis command per event and none while the run is idle on the follower's side; the follow is
the run's reader while it lasts; a run declared lost reaches its followers as its `error` and `end`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.redis import runs
from adapters.redis.client import RedisClient
from adapters.redis.events import RedisEventLog
from adapters.redis.runs import RedisRunFollower
from domain.model.events import Event, EventType, RunIds
from tests.defaults import EVENT_LOG, client_of, run_directory
from tests.integration.commands import CommandLog
from tests.redis_server import RedisCluster, RedisServer, flush_redis_cluster

pytestmark = pytest.mark.redis_server

IDS = RunIds("run_f", "ses_f", "thr_f", "t" * 32)


def event(seq: int, type_: EventType = EventType.CONTENT) -> Event:
    data: dict[str, Any] = {"content": f"c{seq}", "chunk": True}
    if type_ is EventType.END:
        data = {"status": "completed"}
    return Event(type_, seq, IDS, 1767000000000 + seq, data)


@pytest.fixture(params=["redis-server", "redis-cluster"])
async def clients(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisClient, RedisClient]]:
    """The owner's client and the follower's (two instances), on one Redis."""
    if request.param == "redis-server":
        server: RedisServer = request.getfixturevalue("redis_server")
        url = server.url
        owner = client_of(url)
        await owner.flushall()
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        flush_redis_cluster(cluster)
        url = cluster.url
        owner = client_of(url)
    follower = client_of(url)
    try:
        yield owner, follower
    finally:
        await owner.aclose()
        await follower.aclose()


async def test_a_followed_run_costs_the_follower_no_command_per_event_nor_while_idle(
        clients: tuple[RedisClient, RedisClient]) -> None:
    owner, follower_client = clients
    log = RedisEventLog(owner, **EVENT_LOG)
    follower = RedisRunFollower(follower_client, block_ms=100, reader_ttl_seconds=30)
    directory = run_directory(owner)
    for seq in (1, 2):
        await log.append(event(seq))
    await follower_client.script_load(runs._NOTE_READER)  # known to the server, as after a first follow
    commands = CommandLog(follower_client)
    follow = follower.follow(IDS.run_id, 1)
    try:
        assert (await anext(follow)).seq == 2  # read from the log once, after joining the readers
        assert commands.take() == ["EVALSHA", "XRANGE"]
        assert await directory.has_reader(IDS.run_id)
        idle = [await anext(follow) for _ in range(5)]  # half a second with nothing logged
        assert idle == [None] * 5
        for seq in range(3, 23):
            await log.append(event(seq))
        await log.append(event(23, EventType.END))
        seen = []
        while not seen or seen[-1].seq != 23:
            item = await anext(follow)
            if item is not None:
                seen.append(item)
        assert [e.seq for e in seen] == list(range(3, 24)) and seen[-1].type is EventType.END
        assert commands.take() == []  # 21 events and the idle ticks: nothing sent by the follower
    finally:
        await follow.aclose()
        await follower.aclose()
        await log.aclose()
    assert not await directory.has_reader(IDS.run_id)  # the follow ended: no reader left


async def test_events_logged_while_nobody_followed_come_from_the_log_and_later_ones_live(
        clients: tuple[RedisClient, RedisClient]) -> None:
    owner, follower_client = clients
    log = RedisEventLog(owner, **EVENT_LOG)
    follower = RedisRunFollower(follower_client, block_ms=100)
    for seq in range(1, 6):
        await log.append(event(seq))
    follow = follower.follow(IDS.run_id, 0)
    try:
        first = [await anext(follow) for _ in range(5)]
        assert [e.seq for e in first if e is not None] == [1, 2, 3, 4, 5]
        await log.append(event(6))
        item = None
        while item is None:
            item = await asyncio.wait_for(anext(follow), 5)
        assert item.seq == 6
    finally:
        await follow.aclose()
        await follower.aclose()
        await log.aclose()
