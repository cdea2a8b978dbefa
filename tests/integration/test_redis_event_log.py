"""The Redis Stream event log: exact keys, ids, fields and TTLs; callbacks in submission order only
after the write; one snapshot per run per batch; a run with a failed append gets nothing but its
closing events written after it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from adapters.redis import events
from adapters.redis.events import RedisEventLog
from adapters.redis.packed import PackedConnection
from domain.model.errors import RunFenced, StoreUnavailable
from domain.model.events import Event, EventType, RunIds
from tests.defaults import DEFAULTS, EVENT_LOG, client_of
from tests.integration.commands import CommandLog

IDS = RunIds("run_a", "ses_a", "thr_a", "t" * 32)
OTHER = RunIds("run_b", "ses_b", "thr_b", "u" * 32)


def event(seq: int, type_: EventType = EventType.CONTENT, ids: RunIds = IDS) -> Event:
    data: dict[str, Any] = {"content": f"c{seq}", "chunk": True}
    if type_ is EventType.END:
        data = {"status": "failed", "reason": "store_unavailable", "message": "m"}
    elif type_ is EventType.ERROR:
        data = {"errorType": "store_unavailable", "message": "m", "retryable": True}
    return Event(type_, seq, ids, 1767000000000 + seq, data)


def count_packed_writes(event_log: RedisEventLog) -> tuple[PackedConnection | None, list[int]]:
    """The log's packed connection (one server: it writes its own packed batches; None on a
    cluster) and the list each of its writes appends its number of commands to."""
    writes: list[int] = []
    packed = event_log._packed
    if packed is not None:
        execute = packed.execute

        async def counted(data: bytes, replies: int) -> list[Any]:
            writes.append(replies)
            return await execute(data, replies)

        packed.execute = counted  # type: ignore[method-assign]
    return packed, writes


@pytest.fixture
async def event_log(redis_client: Redis) -> AsyncIterator[RedisEventLog]:
    log = RedisEventLog(redis_client, max_length=DEFAULTS.events.max_length, retention_seconds=60,
                        active_ttl_seconds=600)
    try:
        yield log
    finally:
        await log.aclose()


async def test_appends_land_as_seq_ids_with_the_exact_envelope_and_the_latest_snapshot(
        event_log: RedisEventLog, redis_client: Redis) -> None:
    reports: list[tuple[str, int, Exception | None]] = []
    for seq, ids in [(1, IDS), (1, OTHER), (2, IDS), (3, IDS), (2, OTHER)]:
        event_log.submit(event(seq, ids=ids), {"lastSeq": seq, "run": ids.run_id},
                         lambda error, s=seq, r=ids.run_id: reports.append((r, s, error)))
    assert reports == []  # nothing is reported before it is written
    await event_log.append(event(4), {"lastSeq": 4, "run": "run_a"})  # waits for everything before it too
    assert reports == [("run_a", 1, None), ("run_b", 1, None), ("run_a", 2, None), ("run_a", 3, None),
                       ("run_b", 2, None)]
    entries = await redis_client.xrange("aura:run:{run_a}:events")
    assert [entry_id for entry_id, _ in entries] == [b"1-1", b"2-1", b"3-1", b"4-1"]
    assert entries[0][1] == {b"e": orjson.dumps(event(1).envelope())}
    assert orjson.loads(await redis_client.get("aura:run:{run_a}:snapshot")) == {"lastSeq": 4, "run": "run_a"}
    assert orjson.loads(await redis_client.get("aura:run:{run_b}:snapshot")) == {"lastSeq": 2, "run": "run_b"}
    assert 590 < await redis_client.ttl("aura:run:{run_a}:events") <= 600
    assert 590 < await redis_client.ttl("aura:run:{run_a}:snapshot") <= 600
    assert [e.seq for e in await event_log.read_after("run_a", 2)] == [3, 4]
    assert await event_log.read_after("run_a", 1) == [event(2), event(3), event(4)]
    assert await event_log.first_seq("run_a") == 1

    await event_log.close_run("run_a")
    assert 50 < await redis_client.ttl("aura:run:{run_a}:events") <= 60
    assert 50 < await redis_client.ttl("aura:run:{run_a}:snapshot") <= 60


async def test_a_repeated_append_is_not_an_error(event_log: RedisEventLog, redis_client: Redis) -> None:
    await event_log.append(event(1))
    await event_log.append(event(1))  # a retry after an unclear outcome: already logged, nothing lost
    assert await redis_client.xlen("aura:run:{run_a}:events") == 1


async def test_after_a_failed_append_only_the_runs_error_and_end_are_written(unused_port: int) -> None:
    down = client_of(f"redis://127.0.0.1:{unused_port}")
    log = RedisEventLog(down, **EVENT_LOG)
    reports: list[tuple[int, str | None]] = []

    def report(seq: int) -> Any:
        return lambda error: reports.append((seq, None if error is None else type(error).__name__))

    log.submit(event(1), None, report(1))
    with pytest.raises(StoreUnavailable):
        await log.append(event(2))
    assert reports == [(1, "StoreUnavailable")]
    await down.aclose()

    # The same log object once Redis answers again (the client is swapped for one that works).
    import fakeredis

    log._redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    log._append = log._redis.register_script(events._APPEND)
    log._packed = PackedConnection(log._redis)
    log.submit(event(3), None, report(3))  # would leave a hole after the lost 1 and 2: refused
    log.submit(event(4, EventType.ERROR), None, report(4))
    await log.append(event(5, EventType.END))
    assert reports[1:] == [(3, "StoreUnavailable"), (4, None)]
    assert [e.seq for e in await log.read_after("run_a", 0)] == [4, 5]
    await log.close_run("run_a")
    with pytest.raises(RunFenced, match="already ended"):  # a finished run's log takes nothing more
        await log.append(event(6))
    assert [e.seq for e in await log.read_after("run_a", 0)] == [4, 5]
    await log.aclose()


async def test_closing_the_log_reports_every_queued_append(redis_client: Redis) -> None:
    log = RedisEventLog(redis_client, **EVENT_LOG)
    reports: list[str | None] = []
    for seq in (1, 2):
        log.submit(event(seq), None, lambda error: reports.append(None if error is None else str(error)))
    await log.aclose()  # before the flusher ran: nobody may wait forever
    assert reports == ["The event log is closed.", "The event log is closed."]


async def test_a_logged_end_starts_the_retention_so_closing_costs_no_round_trip(
        event_log: RedisEventLog, redis_client: Redis) -> None:
    commands = CommandLog(redis_client)
    event_log.submit(event(1), {"lastSeq": 1}, lambda _: None)
    await event_log.append(event(2, EventType.END), {"lastSeq": 2, "end": True})
    assert 50 < await redis_client.ttl("aura:run:{run_a}:events") <= 60
    assert 50 < await redis_client.ttl("aura:run:{run_a}:snapshot") <= 60
    assert orjson.loads(await redis_client.get("aura:run:{run_a}:snapshot")) == {"lastSeq": 2, "end": True}
    commands.take()
    await event_log.close_run("run_a")
    assert commands.take() == []
    await event_log.close_run("run_a")  # a second close (or one after an unlogged end) does expire
    assert commands.take() == ["PIPELINE"]


async def test_a_batch_of_events_of_several_runs_is_one_round_trip(event_log: RedisEventLog,
                                                                    redis_client: Redis) -> None:
    await redis_client.script_load(events._APPEND)  # known to the server, as after the first batch
    commands = CommandLog(redis_client)
    packed, writes = count_packed_writes(event_log)
    for seq in range(1, 51):
        event_log.submit(event(seq), {"lastSeq": seq} if seq % 10 == 0 else None, lambda _: None)
        event_log.submit(event(seq, ids=OTHER), None, lambda _: None)
    await event_log.append(event(51))
    # all 101 were queued before the flusher ran: one round trip, one script call per run
    assert (commands.take(), writes) == (([], [2]) if packed is not None else (["PIPELINE"], []))
    assert await redis_client.xlen("aura:run:{run_a}:events") == 51
    assert await redis_client.xlen("aura:run:{run_b}:events") == 50
    assert orjson.loads(await redis_client.get("aura:run:{run_a}:snapshot")) == {"lastSeq": 50}


async def test_runs_that_add_an_event_per_loop_pass_share_one_round_trip(event_log: RedisEventLog,
                                                                         redis_client: Redis) -> None:
    """The batch waits while the runs keep adding to it (a run streaming an answer adds an event
    per loop pass): sixteen events of each of three runs go out in one write (one script call per
    run), not a few per write."""
    await redis_client.script_load(events._APPEND)
    commands = CommandLog(redis_client)
    packed, writes = count_packed_writes(event_log)
    logged: list[asyncio.Future[None]] = []

    async def run(ids: RunIds) -> None:
        for seq in range(1, 17):
            done = asyncio.get_running_loop().create_future()
            logged.append(done)
            event_log.submit(event(seq, ids=ids), None, lambda _error, done=done: done.set_result(None))
            await asyncio.sleep(0)  # the next chunk comes a loop pass later

    await asyncio.gather(*(run(RunIds(f"run_{n}", "s", "t", "t" * 32)) for n in range(3)))
    await asyncio.gather(*logged)
    assert (commands.take(), writes) == (([], [3]) if packed is not None else (["PIPELINE"], []))
    assert [await redis_client.xlen(f"aura:run:{{run_{n}}}:events") for n in range(3)] == [16, 16, 16]


async def test_an_event_the_store_refuses_fails_its_run_and_no_other(event_log: RedisEventLog,
                                                                      redis_client: Redis) -> None:
    await redis_client.set("aura:run:{run_b}:events", b"not a stream")  # WRONGTYPE for run_b
    reports: list[tuple[str, str | None]] = []
    for ids in (IDS, OTHER):
        event_log.submit(event(1, ids=ids), None,
                         lambda error, r=ids.run_id: reports.append((r, None if error is None else str(error))))
    await event_log.append(event(2))
    assert reports == [("run_a", None), ("run_b", "The event log refused an event.")]
    with pytest.raises(StoreUnavailable):
        await event_log.append(event(2, ids=OTHER))  # nothing more of run_b is written
    assert await redis_client.get("aura:run:{run_b}:events") == b"not a stream"
    assert await redis_client.xlen("aura:run:{run_a}:events") == 2


async def commandstats(client: Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): stats["calls"]
            for name, stats in (await client.info("commandstats")).items()}


@pytest.mark.redis_server
async def test_a_runs_events_in_one_batch_cost_one_script_call_and_one_check_of_each_kind(
        real_redis: Redis) -> None:
    """As the real server counts them (INFO commandstats counts a script's own calls): one batch of
    100 events of one run and 1 of another is 2 script calls, each reading the log's last entry
    once and the reader key once, and 101 XADDs; the logged entry at a seq is read only for a retry
    (a seq not beyond the log's last id)."""
    log = RedisEventLog(real_redis, max_length=DEFAULTS.events.max_length, retention_seconds=60,
                        active_ttl_seconds=600, owner="aura-a")
    for run_id in ("run_a", "run_b"):
        await real_redis.set(f"aura:run:{{{run_id}}}:lease", "aura-a")
    await real_redis.script_load(events._APPEND)
    try:
        await real_redis.config_resetstat()
        for seq in range(1, 100):
            log.submit(event(seq), None, lambda _: None)
        log.submit(event(1, ids=OTHER), None, lambda _: None)
        await log.append(event(100), {"lastSeq": 100})
        calls = await commandstats(real_redis)
        assert {name: calls.get(name, 0) for name in ("evalsha", "xrevrange", "xrange", "get", "xadd", "exists",
                                                      "set", "expire", "publish")} == {
            "evalsha": 2, "xrevrange": 2, "xrange": 0, "get": 2, "xadd": 101, "exists": 2, "set": 1,
            "expire": 2, "publish": 0}
        assert await real_redis.xlen("aura:run:{run_a}:events") == 100

        # a retry of the last three (an unclear outcome) and two new ones: the three are read back
        await real_redis.config_resetstat()
        for seq in range(98, 102):
            log.submit(event(seq), None, lambda _: None)
        await log.append(event(102))
        calls = await commandstats(real_redis)
        assert (calls["evalsha"], calls["xrange"], calls["xadd"]) == (1, 3, 2)
        assert await real_redis.xlen("aura:run:{run_a}:events") == 102
    finally:
        await log.aclose()
