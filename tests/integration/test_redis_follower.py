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
from dataclasses import replace
from typing import Any

import pytest
import redis as sync_redis

from adapters.redis import runs
from adapters.redis.client import RedisClient
from adapters.redis.events import RedisEventLog, lease_key
from domain.model.errors import StoreUnavailable
from domain.model.events import Event, EventType, RunIds
from domain.model.runs import RunRecord
from domain.services.leases import LeaseRenewal
from tests.defaults import EVENT_LOG, RUN_LIMITS, client_of, run_directory, run_follower
from tests.integration.commands import CommandLog
from tests.redis_server import RedisCluster, RedisServer, flush_redis_cluster
from tests.unit.fakes import text
from tests.unit.harness import Harness
from tests.unit.test_agent_loop import gated

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
    follower = run_follower(follower_client, block_ms=100, reader_ttl_seconds=30)
    directory = run_directory(owner)
    for seq in (1, 2):
        await log.append(event(seq))
    for script in (runs._BE_PRESENT, runs._NOTE_READER):  # known to the server, as after a first follow
        await follower_client.script_load(script)
    commands = CommandLog(follower_client)
    follow = follower.follow(IDS.run_id, 1)
    try:
        assert (await anext(follow)).seq == 2  # read from the log once, after joining the readers
        # the process's presence (once for all its follows), the follow's reader entry, the run's
        # record (whether it closed before the entry was noted), the log read
        assert commands.take() == ["EVALSHA", "EVALSHA", "GET", "XRANGE"]
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
    follower = run_follower(follower_client, block_ms=100)
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


def periodic_commands(commands: list[list[str]], owner: RedisClient, renewal: str, renewal_kind: str,
                      run_ids: set[str]) -> Counter[str]:
    """The commands by kind: the runs' lease renewals (the script `renewal`, on a run of `run_ids`),
    the active index, the follower's presence, the Pub/Sub health check; anything else by itself."""
    renew_sha = owner.register_script(renewal).sha
    presence_sha = owner.register_script(runs._BE_PRESENT).sha
    kinds: Counter[str] = Counter()
    for parts in commands:
        if parts[:2] == ["EVALSHA", renew_sha] and parts[3] in {lease_key(r) for r in run_ids}:
            kinds[renewal_kind] += 1
        elif parts[:2] == ["ZADD", runs.ACTIVE_RUNS_KEY] and parts[2] == "XX":
            kinds["the active index"] += 1
        elif parts[:4] == ["EVALSHA", presence_sha, "1", runs.FOLLOWERS_KEY]:
            kinds["the follower's presence"] += 1
        elif parts[:2] == ["PING", "redis-py-health-check"]:
            kinds["the Pub/Sub connection's health check"] += 1
        else:
            kinds[" ".join(parts)] += 1
    return kinds


async def test_idle_followed_runs_cost_no_periodic_command_but_the_leases(redis_server: RedisServer) -> None:
    """Three idle runs of one owner, followed from another instance for 62.5 s of loop time: the
    only commands are the owner's lease renewals (one script per run and the active index, every
    third of the lease) and the follower process's presence (one script every 10 s, however many
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
    for script in (runs._RENEW, runs._BE_PRESENT):  # known to the server, as after a first renewal
        await owner.script_load(script)
    follower = run_follower(follower_client, block_ms=1000)
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
    kinds = periodic_commands(commands, owner, runs._RENEW, "renew a run's lease", set(run_ids))
    # 12 renewals (every 5 s) of 3 runs; the presence every 10 s, whatever the number of follows
    assert kinds == {"renew a run's lease": 36, "the active index": 12, "the follower's presence": 6,
                     "the Pub/Sub connection's health check": 2}, kinds


async def test_a_run_whose_client_left_and_that_is_followed_elsewhere_costs_no_command_beyond_its_lease(
        redis_server: RedisServer) -> None:
    """Three runs whose client left their owner (policy `cancel`, grace 10 s), each followed from
    another instance. Once the first grace period found them read elsewhere, 62.5 s of loop time
    (six grace periods) cost the owner its lease renewals alone: one script per run every 5 s
    (which also reads the run's reader set), the active index and one read of the followers'
    presence for all the runs per renewal; the follower its presence. No run is cancelled while
    followed. Then one follow ends: its run is cancelled a grace period after the renewal that
    found it gone (at most a renewal interval, 5 s, more than a grace period after it ended); the
    others run on."""
    owner = client_of(redis_server.url)
    await owner.flushall()
    follower_client = client_of(redis_server.url)
    for script in (runs._RENEW, runs._RENEW_AND_READ, runs._BE_PRESENT, runs._NOTE_READER,
                   runs._DROP_UNCHANGED_READERS):  # known to the server, as after the first calls
        await owner.script_load(script)
    gate_open = asyncio.Event()
    h = Harness(gated(gate_open)(*[text('{"steps": []}'), text("ok")] * 3),
                run_limits=replace(RUN_LIMITS, disconnect_grace_seconds=10.0, lease_seconds=15.0))
    h.log = RedisEventLog(owner, **EVENT_LOG, owner="instance-a")
    h.directory = run_directory(owner)
    h.rebuild()
    follower = run_follower(follower_client, block_ms=1000)
    clock = LoopClock()
    handles = []
    reading: list[asyncio.Task[None]] = []
    monitor = Monitor(redis_server.url)

    async def read(run_id: str, joined: asyncio.Event) -> None:  # as the SSE writer does on the other instance
        async for _ in follower.follow(run_id, 0):
            joined.set()  # its first item comes once its entry is in the run's reader set

    try:
        for _ in range(3):
            handle, watcher = await h.start()
            handles.append(handle)
            joined = asyncio.Event()
            reading.append(asyncio.create_task(read(handle.run_id, joined)))
            await asyncio.wait_for(joined.wait(), 5)
            h.service.release(handle, watcher, disconnected=True)  # the run's own client left
        await clock.advance(10.5)  # the grace period is over: read elsewhere, kept
        assert all(handle.read_elsewhere and handle.run.cancel_reason is None for handle in handles)
        monitor.take()
        await clock.advance(62.5)
        commands = monitor.take()
        assert all(handle.read_elsewhere and handle.run.cancel_reason is None for handle in handles)

        reading[0].cancel()  # the first run's follow ends (its client closed)
        await asyncio.gather(reading[0], return_exceptions=True)
        assert not await owner.exists(runs.reader_key(handles[0].run_id))
        ended_at = clock.loop.time()
        while handles[0].run.cancel_reason is None and clock.loop.time() - ended_at < 30:
            await clock.advance(0.5)
        cancelled_after = clock.loop.time() - ended_at
        assert handles[0].task is not None
        await asyncio.wait_for(asyncio.shield(handles[0].task), 5)
        assert [handle.run.cancel_reason for handle in handles] == ["client_disconnected", None, None]
    finally:
        for task in reading:
            task.cancel()
        await asyncio.gather(*reading, return_exceptions=True)
        clock.restore()
        monitor.stop()
        gate_open.set()
        await h.service.shutdown()
        await follower.aclose()
        await owner.aclose()
        await follower_client.aclose()

    assert 10.0 <= cancelled_after <= 10.0 + 5.0 + 0.5  # a grace period, plus at most a renewal interval
    run_ids = {handle.run_id for handle in handles}
    kinds = periodic_commands(commands, owner, runs._RENEW_AND_READ, "renew a run's lease and read its readers",
                              run_ids)
    kinds.update(kinds.pop(f"ZMSCORE {runs.FOLLOWERS_KEY} {follower._follower}", 0)
                 * ["the followers' presence, for all the runs"])
    # 12 or 13 renewals (every 5 s) of 3 runs; the presence every 10 s, whatever the number of follows
    renewals = kinds["the active index"]
    assert renewals in (12, 13), kinds
    assert kinds == {"renew a run's lease and read its readers": 3 * renewals, "the active index": renewals,
                     "the followers' presence, for all the runs": renewals, "the follower's presence": 6,
                     "the Pub/Sub connection's health check": kinds["the Pub/Sub connection's health check"]}, kinds


async def test_the_lease_renewal_reports_which_kept_runs_lost_their_reader_elsewhere_and_since_when(
        clients: tuple[RedisClient, RedisClient], monkeypatch: pytest.MonkeyPatch) -> None:
    """Four runs of one owner kept for readers elsewhere: one read by a present follower, one whose
    follow ended (no entry), one read only by a follower whose presence lapsed 0.5 s ago (last
    alive a presence time, 30 s, before that), one read only by a follower with no presence left.
    One renewal renews all four leases and reports the last three, each with when a reader was
    last known there; the dead followers' entries are dropped. A renewal whose presence read fails
    still renews and reports lost leases (the readers are reported at the next)."""
    owner, _ = clients
    directory = run_directory(owner)
    now_ms = int(time.time() * 1000)
    kept = ["run_read", "run_follow_ended", "run_follower_died", "run_follower_long_gone"]
    for run_id in kept:
        await owner.set(lease_key(run_id), "aura-a", px=5_000)
    await owner.zadd(runs.FOLLOWERS_KEY, {"aura-b.1": now_ms + 20_000, "aura-c.1": now_ms - 500})
    entry_score = now_ms + runs.READER_ENTRY_TTL_MS
    await owner.zadd(runs.reader_key("run_read"), {"aura-b.1/x": entry_score, "aura-c.1/y": entry_score})
    await owner.zadd(runs.reader_key("run_follower_died"), {"aura-c.1/z": entry_score})
    await owner.zadd(runs.reader_key("run_follower_long_gone"), {"aura-d.1/w": entry_score})
    await owner.set(lease_key("run_not_kept"), "aura-other", px=15_000)

    renewals = await directory.renew_leases([*kept, "run_not_kept"], "aura-a", 15, kept)
    assert renewals.lost == ["run_not_kept"]
    assert set(renewals.unread) == {"run_follow_ended", "run_follower_died", "run_follower_long_gone"}
    assert renewals.unread["run_follow_ended"] < 1 and renewals.unread["run_follower_long_gone"] < 1
    assert 30.4 <= renewals.unread["run_follower_died"] < 31.5
    assert all(14_000 < ttl <= 15_000 for ttl in [await owner.pttl(lease_key(run_id)) for run_id in kept])
    assert await owner.zrange(runs.reader_key("run_read"), 0, -1) == [b"aura-b.1/x"]  # the dead one's dropped
    for run_id in ("run_follower_died", "run_follower_long_gone"):
        assert not await owner.exists(runs.reader_key(run_id))

    async def unavailable(followers: list[str]) -> list[float | None]:
        raise StoreUnavailable("down")

    monkeypatch.setattr(directory, "_presence", unavailable)
    renewals = await directory.renew_leases([*kept, "run_not_kept"], "aura-a", 15, kept)
    assert renewals.lost == ["run_not_kept"] and renewals.unread == {}


async def test_an_absent_followers_entries_are_dropped_and_the_owner_stops_publishing(
        clients: tuple[RedisClient, RedisClient]) -> None:
    """The owner asks (its disconnect grace) whether anyone reads the run elsewhere: a follow of a
    present process counts; once that process is absent (it died: its presence lapsed), its entry
    is dropped, the reader set is gone and the owner's appends publish nothing more."""
    owner, follower_client = clients
    log = RedisEventLog(owner, **EVENT_LOG)
    directory = run_directory(owner)
    follower = run_follower(follower_client, block_ms=100)
    await log.append(event(1))
    follow = follower.follow(IDS.run_id, 0)
    try:
        assert (await anext(follow)).seq == 1
        assert await directory.has_reader(IDS.run_id)
        await owner.delete(runs.FOLLOWERS_KEY)  # the follower's process is gone, long ago
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
    follower = run_follower(follower_client, block_ms=1000)
    assert await directory.admit(RECORD, user_limit=5, tenant_limit=5, slot_seconds=60, lease_seconds=60) is None
    await log.append(event(1))
    clock = LoopClock()
    follow = follower.follow(IDS.run_id, 0)
    try:
        assert (await anext(follow)).seq == 1
        await owner.delete(runs.FOLLOWERS_KEY)  # lapsed while the process stalled
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
    follower = run_follower(follower_client, block_ms=100)
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
    follower = run_follower(follower_client, block_ms=100)
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
    read_presence = directory._presence

    async def presence_then_the_follower_notes_again(followers: list[str]) -> list[float | None]:
        lapse = await read_presence(followers)
        await owner.zadd(runs.FOLLOWERS_KEY, {"aura-b.0000beef": int(time.time() * 1000) + 30_000})
        await owner.zadd(runs.reader_key(IDS.run_id), {entry: noted_at + 1000})
        return lapse

    monkeypatch.setattr(directory, "_presence", presence_then_the_follower_notes_again)
    assert not await directory.has_reader(IDS.run_id)  # as read: no follower present
    monkeypatch.setattr(directory, "_presence", read_presence)
    assert await owner.zscore(runs.reader_key(IDS.run_id), entry) == noted_at + 1000
    assert await directory.has_reader(IDS.run_id)
