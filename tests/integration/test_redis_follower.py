"""Following a run another instance owns: the events arrive in order as the owner logs them, with
no Redis command per event and none while the run is idle on the follower's side; the follow is
the run's reader while it lasts; a run declared lost reaches its followers as its `error` and `end`."""

from __future__ import annotations

import asyncio
import shlex
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis as sync_redis

from adapters.redis import runs
from adapters.redis.client import RedisClient, is_cluster
from adapters.redis.events import RedisEventLog, lease_key
from adapters.redis.runs import RedisRunFollower
from domain.model.events import Event, EventType, RunIds
from domain.model.runs import RunRecord
from domain.services.leases import LeaseRenewal
from tests.defaults import EVENT_LOG, client_of, run_directory
from tests.integration.commands import CommandLog
from tests.redis_server import RedisCluster, RedisServer, flush_redis_cluster

pytestmark = pytest.mark.redis_server

IDS = RunIds("run_f", "ses_f", "thr_f", "t" * 32)
RECORD = RunRecord(run_id=IDS.run_id, session_id=IDS.session_id, thread_id=IDS.thread_id, trace_id=IDS.trace_id,
                   tenant_id="acme", user_id="alice", instance_id="aura-a", created_at=1767000000000)


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
        # the process's presence (once for all its follows), the follow's reader entry, the run's
        # record (whether it closed before the entry was noted), the log read
        assert commands.take() == ["SET", "EVALSHA", "GET", "XRANGE"]
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


# --- what an idle follow costs, with the event loop's clock driven ----------------------------


class LoopClock:
    """The running loop's clock moved forward at will: every timer of the loop (asyncio.sleep,
    asyncio.timeout, call_later: all the follower's and the lease renewal's waits) fires as if that
    much time had passed, while Redis answers in real time."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._real = self.loop.time
        self.offset = 0.0
        self.loop.time = lambda: self._real() + self.offset  # type: ignore[method-assign]

    async def advance(self, seconds: float, step: float = 0.5) -> None:
        """`seconds` of loop time in `step`s, each followed by a moment of real time for the
        timers that fired to send their commands and read the replies."""
        moved = 0.0
        while moved < seconds:
            self.offset += step
            moved += step
            await asyncio.sleep(0.03)

    def restore(self) -> None:
        del self.loop.time


class Monitor:
    """Every command the server runs, from `MONITOR` on a connection of its own (a thread: it is
    no part of the loop whose clock the test drives)."""

    def __init__(self, url: str) -> None:
        self.commands: list[list[str]] = []
        self._marker = sync_redis.Redis.from_url(url)
        self._marker.ping()  # connected before MONITOR starts: its handshake is not seen
        self._client = sync_redis.Redis.from_url(url)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    def _listen(self) -> None:
        with self._client.monitor() as monitor:
            self._ready.set()
            for command in monitor.listen():
                if command.get("client_type") == "lua":
                    continue  # run by a script, seen as its EVALSHA
                parts = shlex.split(command["command"])
                if parts[:2] == ["ECHO", "monitor-stop"]:
                    return
                self.commands.append(parts)

    def take(self) -> list[list[str]]:
        """The commands seen up to now (a marker command is sent and waited for, so none is in flight)."""
        marker = f"monitor-mark-{len(self.commands)}-{time.monotonic()}"
        self._marker.echo(marker)
        deadline = time.monotonic() + 5
        while not any(parts[:2] == ["ECHO", marker] for parts in self.commands):
            assert time.monotonic() < deadline, "MONITOR did not see the marker"
            time.sleep(0.01)
        index = next(i for i, parts in enumerate(self.commands) if parts[:2] == ["ECHO", marker])
        taken, self.commands = self.commands[:index], self.commands[index + 1:]
        return taken

    def stop(self) -> None:
        self._marker.echo("monitor-stop")
        self._thread.join(5)
        self._client.close()
        self._marker.close()


async def test_idle_followed_runs_cost_no_periodic_command_but_the_leases(redis_server: RedisServer) -> None:
    """Three idle runs of one owner, followed from another instance for 62.5 s of loop time: the
    only commands are the owner's lease renewals (one script per run and the active index, every
    third of the lease) and the follower process's presence (one SET every 10 s, however many
    runs it follows), plus the Pub/Sub connection's health check. No follow sends anything."""
    owner = client_of(redis_server.url)
    await owner.flushall()
    follower_client = client_of(redis_server.url)
    log = RedisEventLog(owner, **EVENT_LOG)
    directory = run_directory(owner)
    run_ids = [f"run_idle_{n}" for n in range(3)]
    for run_id in run_ids:
        await owner.set(lease_key(run_id), "aura-owner", px=15_000)
        await owner.zadd(runs.ACTIVE_RUNS_KEY, {run_id: 0})
        await log.append(Event(EventType.CONTENT, 1, RunIds(run_id, "ses", "thr", "t" * 32), 1767000000000,
                               {"content": "c1", "chunk": True}))
    await owner.script_load(runs._RENEW)  # known to the server, as after the owner's first renewal
    follower = RedisRunFollower(follower_client, block_ms=1000)
    clock = LoopClock()
    renewal = LeaseRenewal(directory, "aura-owner", 15.0, dict.fromkeys(run_ids, None))  # type: ignore[arg-type]
    seen: dict[str, list[Event | None]] = {run_id: [] for run_id in run_ids}
    started = asyncio.Event()

    async def read(run_id: str) -> None:  # as the SSE writer does: the follow's items, as they come
        async for item in follower.follow(run_id, 0):
            seen[run_id].append(item)
            if all(seen.values()):
                started.set()

    readers = [asyncio.create_task(read(run_id)) for run_id in run_ids]
    monitor = Monitor(redis_server.url)
    try:
        await asyncio.wait_for(started.wait(), 5)
        assert all(items[0] is not None and items[0].seq == 1 for items in seen.values())
        monitor.take()  # the follows' start: SUBSCRIBE, presence, reader entries, log reads
        renewal.ensure()
        await clock.advance(62.5)
        commands = monitor.take()
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        clock.restore()
        monitor.stop()
        await renewal.stop()
        await follower.aclose()
        await log.aclose()
        await owner.aclose()
        await follower_client.aclose()

    assert all(item is None for items in seen.values() for item in items[1:])  # heartbeats, nothing logged
    renew_sha = owner.register_script(runs._RENEW).sha
    kinds = Counter()
    for parts in commands:
        if parts[0] == "EVALSHA" and parts[1] == renew_sha and parts[3] in {lease_key(r) for r in run_ids}:
            kinds["renew a run's lease"] += 1
        elif parts[:2] == ["ZADD", runs.ACTIVE_RUNS_KEY] and parts[2] == "XX":
            kinds["the active index"] += 1
        elif parts[0] == "SET" and parts[1].startswith("aura:follower:") and parts[-2:] == ["PX", "30000"]:
            kinds["the follower's presence"] += 1
        elif parts[:2] == ["PING", "redis-py-health-check"]:
            kinds["the Pub/Sub connection's health check"] += 1
        else:
            kinds[" ".join(parts)] += 1
    # 12 renewals (every 5 s) of 3 runs; the presence every 10 s, whatever the number of follows
    assert kinds == {"renew a run's lease": 36, "the active index": 12, "the follower's presence": 6,
                     "the Pub/Sub connection's health check": 2}, kinds


async def test_an_absent_followers_entries_are_dropped_and_the_owner_stops_publishing(
        clients: tuple[RedisClient, RedisClient]) -> None:
    """The owner asks (its disconnect grace) whether anyone reads the run elsewhere: a follow of a
    present process counts; once that process is absent (it died: its presence lapsed), its entry
    is dropped, the reader set is gone and the owner's appends publish nothing more."""
    owner, follower_client = clients
    log = RedisEventLog(owner, **EVENT_LOG)
    directory = run_directory(owner)
    follower = RedisRunFollower(follower_client, block_ms=100)
    await log.append(event(1))
    follow = follower.follow(IDS.run_id, 0)
    try:
        assert (await anext(follow)).seq == 1
        assert await directory.has_reader(IDS.run_id)
        everywhere = {"target_nodes": owner.PRIMARIES} if is_cluster(owner) else {}
        (presence,) = await owner.keys("aura:follower:*", **everywhere)
        await owner.delete(presence)  # the follower's process is gone
        assert not await directory.has_reader(IDS.run_id)
        assert await owner.exists(runs.reader_key(IDS.run_id)) == 0
    finally:
        await follow.aclose()
        await follower.aclose()
        await log.aclose()


async def test_a_follower_whose_presence_lapsed_notes_itself_again_and_reads_what_went_unpublished(
        redis_server: RedisServer) -> None:
    """A follower process that stalled past its presence TTL may have had its entries dropped by
    the owner (events then go unpublished): at its next presence refresh it finds the presence
    lapsed, and each follow notes its entry again and reads the log. Driven by the loop's clock."""
    owner = client_of(redis_server.url)
    await owner.flushall()
    follower_client = client_of(redis_server.url)
    log = RedisEventLog(owner, **EVENT_LOG)
    directory = run_directory(owner)
    follower = RedisRunFollower(follower_client, block_ms=1000)
    assert await directory.admit(RECORD, user_limit=5, tenant_limit=5, slot_seconds=60, lease_seconds=60) is None
    await log.append(event(1))
    clock = LoopClock()
    follow = follower.follow(IDS.run_id, 0)
    try:
        assert (await anext(follow)).seq == 1
        for key in await owner.keys("aura:follower:*"):
            await owner.delete(key)  # lapsed while the process stalled
        assert not await directory.has_reader(IDS.run_id)  # the owner dropped the entry
        await log.append(event(2))  # no reader set: not published
        reader = asyncio.create_task(anext(follow))
        await clock.advance(9)
        assert not reader.done() or reader.result() is None
        items = [reader.result()] if reader.done() else []
        await clock.advance(2)  # the presence refresh is due 10 s after the follow started
        while not items or items[-1] is None:
            items.append(await asyncio.wait_for(anext(follow), 5))
        assert items[-1].seq == 2
        assert await directory.has_reader(IDS.run_id)
        await log.append(event(3))  # published again
        item = None
        while item is None:
            item = await asyncio.wait_for(anext(follow), 5)
        assert item.seq == 3
    finally:
        clock.restore()
        await follow.aclose()
        await follower.aclose()
        await log.aclose()
        await owner.aclose()
        await follower_client.aclose()


async def test_a_follow_ends_when_its_run_closes_without_an_end_in_its_log(
        clients: tuple[RedisClient, RedisClient]) -> None:
    """The store refused the run's `end` (a failover) but took the close of its record: the owner
    announces the close on the tail channel and the follow ends, so its reader resumes and learns
    how the run ended, instead of waiting for an `end` that never comes."""
    owner, follower_client = clients
    log = RedisEventLog(owner, **EVENT_LOG)
    directory = run_directory(owner)
    record = RECORD
    assert await directory.admit(record, user_limit=5, tenant_limit=5, slot_seconds=60, lease_seconds=15) is None
    follower = RedisRunFollower(follower_client, block_ms=100)
    await log.append(event(1))
    follow = follower.follow(IDS.run_id, 0)
    try:
        assert (await anext(follow)).seq == 1
        await log.append(event(2))
        assert await directory.close(record, "failed", 60)  # its `end` never logged
        seen = []
        async with asyncio.timeout(5):
            async for item in follow:
                seen.append(item)
        assert [item.seq for item in seen if item is not None] == [2]
    finally:
        await follow.aclose()
        await follower.aclose()
        await log.aclose()


async def test_a_follow_that_starts_after_its_run_closed_without_an_end_ends_at_once(
        clients: tuple[RedisClient, RedisClient]) -> None:
    """The run's close came before the follow noted its entry, so it announced nothing to it (and
    its `end` never reached the log, as in a failover): the follow sees the closed record once,
    after its first read of the log, instead of waiting for an `end` that never comes (the resume
    read the record as running a moment before; seen as a stalled stream after a master kill)."""
    owner, follower_client = clients
    log = RedisEventLog(owner, **EVENT_LOG)
    directory = run_directory(owner)
    assert await directory.admit(RECORD, user_limit=5, tenant_limit=5, slot_seconds=60, lease_seconds=15) is None
    await log.append(event(1))
    await log.append(event(2))
    assert await directory.close(RECORD, "failed", 60)  # its `end` never logged
    follower = RedisRunFollower(follower_client, block_ms=100)
    follow = follower.follow(IDS.run_id, 1)
    try:
        async with asyncio.timeout(5):
            seen = [item async for item in follow]
        assert [item.seq for item in seen if item is not None] == [2]
    finally:
        await follow.aclose()
        await follower.aclose()
        await log.aclose()


async def test_the_owner_never_drops_an_entry_its_follower_noted_again_after_the_presence_was_read(
        clients: tuple[RedisClient, RedisClient], monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner reads a follower's presence as lapsed; before it drops that follower's entries, the
    follower refreshes its presence and notes its entry again (same name, a later expiry). The
    owner drops only entries it read unchanged, so the follow stays a reader and keeps getting
    events."""
    owner, _ = clients
    directory = run_directory(owner)
    entry = "aura-b.0000beef/1"
    noted_at = int(time.time() * 1000) + runs.READER_ENTRY_TTL_MS
    await owner.zadd(runs.reader_key(IDS.run_id), {entry: noted_at})
    read_presence = runs.get_values

    async def presence_then_the_follower_notes_again(client: RedisClient, keys: list[str]) -> list[Any]:
        values = await read_presence(client, keys)
        await owner.set(runs.presence_key("aura-b.0000beef"), b"1", px=30_000)
        await owner.zadd(runs.reader_key(IDS.run_id), {entry: noted_at + 1000})
        return values

    monkeypatch.setattr(runs, "get_values", presence_then_the_follower_notes_again)
    assert not await directory.has_reader(IDS.run_id)  # as read: no follower present
    monkeypatch.setattr(runs, "get_values", read_presence)
    assert await owner.zscore(runs.reader_key(IDS.run_id), entry) == noted_at + 1000
    assert await directory.has_reader(IDS.run_id)
