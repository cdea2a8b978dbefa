"""A real master and replica: writes are acknowledged only once the replica holds them (`WAIT`),
and readiness says when the store cannot take a write (a replica, too few replicas, refused
writes, no master named by the sentinels)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from adapters.redis.approvals import RedisApprovalStore, encode_json
from adapters.redis.client import close_redis
from adapters.redis.durability import ReplicaConfirmation
from adapters.redis.events import RedisEventLog
from domain.model.approval import ApprovalStatus
from domain.model.errors import StoreUnavailable
from tests.defaults import EVENT_LOG, client_of, health_probe, run_directory, run_follower
from tests.integration.commands import CommandLog
from tests.integration.test_redis_approvals import approval_request
from tests.integration.test_redis_event_log import event
from tests.integration.test_redis_run_directory import record
from tests.redis_server import RedisServer, start_redis_server, stop_redis_server
from tests.sentinel_group import start_replica, start_sentinel

pytestmark = pytest.mark.redis_server

CONFIRM = ReplicaConfirmation(replicas=1, timeout_ms=300)


@dataclass
class Pair:
    master: RedisServer
    replica: RedisServer

    @contextmanager
    def replica_frozen(self) -> Iterator[None]:
        """The replica stops (SIGSTOP): it acknowledges nothing until it continues."""
        os.kill(self.replica.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.replica.process.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    master = start_redis_server(tmp_path_factory.mktemp("master"))
    try:
        replica = start_replica(tmp_path_factory.mktemp("replica"), master)
    except BaseException:
        stop_redis_server(master)
        raise
    try:
        yield Pair(master, replica)
    finally:
        stop_redis_server(replica)
        stop_redis_server(master)


@pytest.fixture
async def master(pair: Pair) -> AsyncIterator[Redis]:
    client = client_of(pair.master.url)
    await client.flushall()
    try:
        yield client
    finally:
        await close_redis(client)


@pytest.fixture
async def replica(pair: Pair) -> AsyncIterator[Redis]:
    client = client_of(pair.replica.url)
    try:
        yield client
    finally:
        await close_redis(client)


async def test_an_event_is_acknowledged_once_the_replica_holds_it_and_never_before(
        pair: Pair, master: Redis, replica: Redis) -> None:
    log = RedisEventLog(master, **EVENT_LOG, confirmation=CONFIRM)
    try:
        await log.append(event(1))
        # acknowledged: the replica (the master's successor in a failover) holds it already
        assert [entry_id for entry_id, _ in await replica.xrange("aura:run:{run_a}:events")] == [b"1-1"]
        with pair.replica_frozen():
            with pytest.raises(StoreUnavailable):
                await log.append(event(2))
        # the master took it, the replica had not confirmed it: it was not acknowledged, and the
        # run's log takes nothing but its closing events after that hole-that-may-be
        assert await master.xlen("aura:run:{run_a}:events") == 2
        with pytest.raises(StoreUnavailable):
            await log.append(event(3))
    finally:
        await log.aclose()


async def test_a_run_is_admitted_only_once_the_replica_holds_its_record(
        pair: Pair, master: Redis, replica: Redis) -> None:
    """A run's id reaches its client (the POST's 200) only once the replica, the master's successor
    in a failover, holds its record: else a resume after the failover answers 404 for a run the
    client was told exists (seen in the Sentinel failover test). Unconfirmed, the admission is
    taken back and refused (retryable)."""
    directory = run_directory(master, CONFIRM)
    admission = {"user_limit": 5, "tenant_limit": 5, "slot_seconds": 900, "lease_seconds": 15}
    with pair.replica_frozen():
        with pytest.raises(StoreUnavailable):
            await directory.admit(record("run_1"), **admission)
    assert await master.exists("aura:run:{run_1}:meta", "aura:run:{run_1}:lease") == 0
    assert await master.zscore("aura:runs:active", "run_1") is None
    assert await master.zcard("aura:slots:{acme}:user:alice") == 0
    assert await master.zcard("aura:slots:{acme}:tenant") == 0

    log = CommandLog(master)
    assert await directory.admit(record("run_2"), **admission) is None
    # one round trip: the `WAIT` ends the admission's own write, on the connection that made it
    assert log.take() == ["PACKED ZADD SET SET EVALSHA WAIT"]
    assert await replica.get("aura:run:{run_2}:meta") == orjson.dumps(record("run_2").to_record())
    assert await replica.get("aura:run:{run_2}:lease") == b"aura-a"


async def test_without_confirmation_no_wait_is_sent(pair: Pair, master: Redis) -> None:
    log = RedisEventLog(master, **EVENT_LOG)
    try:
        with pair.replica_frozen():
            await log.append(event(1))  # the plain single-Redis set-up: acknowledged at once
        assert await master.xlen("aura:run:{run_a}:events") == 1
    finally:
        await log.aclose()


async def test_a_decision_is_applied_only_once_the_replica_holds_it(
        pair: Pair, master: Redis, replica: Redis) -> None:
    store = RedisApprovalStore(master, confirmation=CONFIRM)
    first, second = approval_request(1), approval_request(2)
    await store.create(first)
    await store.create(second)
    result = await store.decide(first.request_id, ApprovalStatus.APPROVED, decided_by="u1", decided_at=first.created_at,
                                reason=None)
    assert result is not None and result.applied
    decided = await replica.get(f"hitl:request:{first.request_id}")
    assert decided is not None and b'"status":"approved"' in decided

    stored = await store.read(second.request_id)
    with pair.replica_frozen():
        # both ways of deciding (in place, and against the bytes read) refuse to report it applied
        with pytest.raises(StoreUnavailable):
            await store.decide(second.request_id, ApprovalStatus.REJECTED, decided_by="u1",
                               decided_at=second.created_at, reason=None)
    third = approval_request(3)
    await store.create(third)
    stored = await store.read(third.request_id)
    with pair.replica_frozen():
        with pytest.raises(StoreUnavailable):
            await store.decide(third.request_id, ApprovalStatus.APPROVED, decided_by="u1",
                               decided_at=third.created_at, reason=None, expected=stored)


async def test_a_heard_decision_is_written_to_its_session_only_once_the_replica_holds_it(
        pair: Pair, master: Redis, replica: Redis) -> None:
    # The waiting run's write of its session record is confirmed like every other write: an
    # unconfirmed one raises (the gate retries it), never reported written.
    store = RedisApprovalStore(master, confirmation=CONFIRM)
    first, second = approval_request(1), approval_request(2)
    for request in (first, second):
        await store.create(request)
    decided = first.decide(ApprovalStatus.APPROVED, by="u1", at=first.created_at, reason=None)
    await store.settle_session(decided)
    assert await replica.get(f"hitl:session:{first.session_id}") == encode_json(decided.session_record())
    with pair.replica_frozen():
        with pytest.raises(StoreUnavailable):
            await store.settle_session(second.decide(ApprovalStatus.REJECTED, by="u1", at=second.created_at,
                                                     reason=None))


async def test_ready_on_a_master_with_its_replica(master: Redis) -> None:
    assert await health_probe(master, required_replicas=1).check() is None
    assert await master.get("aura:ready:probe") == b"1"  # the probe's write
    assert 0 < await master.pttl("aura:ready:probe") <= 10_000


async def test_not_ready_with_fewer_replicas_than_writes_need(master: Redis) -> None:
    assert await health_probe(master, required_replicas=2).check() == \
        "redis master has 1 of the 2 replica(s) that must confirm writes"


async def test_not_ready_on_a_replica(replica: Redis) -> None:
    assert await health_probe(replica).check() == "redis is a slave, not a master: it takes no writes"


async def test_not_ready_when_the_master_refuses_writes(master: Redis) -> None:
    await master.config_set("min-replicas-to-write", 2)
    try:
        assert await health_probe(master).check() == "redis refuses writes: NOREPLICAS"
    finally:
        await master.config_set("min-replicas-to-write", 0)


async def test_not_ready_when_no_sentinel_names_a_master(tmp_path: Path) -> None:
    port, process = start_sentinel(tmp_path, 0, monitor_port=None)
    client = client_of(f"redis+sentinel://127.0.0.1:{port}/aura")
    try:
        assert await health_probe(client).check() == "redis master unknown: no sentinel names one"
    finally:
        await close_redis(client)
        process.kill()
        process.wait(timeout=10)


async def test_a_read_sets_its_connections_wait_offset(pair: Pair, master: Redis) -> None:
    """The server property the confirmed reads rely on (Redis 7): WAIT after a read, on the read's
    connection, waits for every write the read could see, though the connection wrote nothing."""
    writer = client_of(pair.master.url)
    try:
        with pair.replica_frozen():
            await writer.set("written", b"1")
            pipe = master.pipeline(transaction=False)
            pipe.get("written")
            pipe.execute_command("WAIT", 1, 100)
            assert await pipe.execute() == [b"1", 0]
    finally:
        await close_redis(writer)


async def test_a_replay_hands_out_only_what_the_replica_holds(pair: Pair, master: Redis) -> None:
    unconfirmed = RedisEventLog(master, **EVENT_LOG)
    confirmed = RedisEventLog(master, **EVENT_LOG, confirmation=CONFIRM)
    try:
        await unconfirmed.append(event(1))
        assert await confirmed.read_after("run_a", 0) == [event(1)]
        with pair.replica_frozen():
            await unconfirmed.append(event(2))  # on the master, not on the replica
            with pytest.raises(StoreUnavailable):
                await confirmed.read_after("run_a", 0)
        assert await confirmed.read_after("run_a", 0) == [event(1), event(2)]
    finally:
        await unconfirmed.aclose()
        await confirmed.aclose()


async def test_a_follower_catches_up_only_on_what_the_replica_holds(pair: Pair, master: Redis) -> None:
    """The follow's log read ends with a WAIT on its connection: an event the master took but the
    replica does not hold yet is not handed on (the follow fails, retryable), and is once it does."""
    writer = RedisEventLog(master, **EVENT_LOG)  # writes without waiting, as a demoted master's last ones
    follower = run_follower(master, block_ms=100, confirmation=ReplicaConfirmation(1, 50))
    try:
        with pair.replica_frozen():
            await writer.append(event(1))
            with pytest.raises(StoreUnavailable):
                async for _ in follower.follow("run_a", 0):
                    pass
        async with asyncio.timeout(10):
            async for followed in follower.follow("run_a", 0):
                assert followed == event(1)
                break
    finally:
        await follower.aclose()
        await writer.aclose()


async def test_the_owner_publishes_an_event_to_followers_only_once_the_replica_holds_it(
        pair: Pair, master: Redis) -> None:
    """A follower takes the run's tail as published, without a WAIT of its own: so the owner
    publishes an event only after its WAIT confirmed it, and never one the replica did not confirm."""
    first = RedisEventLog(master, **EVENT_LOG, confirmation=CONFIRM)
    follower = run_follower(master, block_ms=100, confirmation=ReplicaConfirmation(1, 50))
    delivered: list[int] = []
    following = asyncio.Event()

    async def read() -> None:
        async for followed in follower.follow("run_a", 0):
            following.set()
            if followed is not None:
                delivered.append(followed.seq)

    reading = asyncio.create_task(read())
    try:
        async with asyncio.timeout(10):
            await following.wait()  # subscribed and registered as a reader, the log read once
        await first.append(event(1))
        async with asyncio.timeout(10):
            while delivered != [1]:  # noqa: ASYNC110 - the follow's task appends
                await asyncio.sleep(0.01)
        published = await _calls(master, "publish")
        with pair.replica_frozen():
            with pytest.raises(StoreUnavailable):
                await first.append(event(2))
        assert await _calls(master, "publish") == published  # the unconfirmed event went to no follower
        assert delivered == [1]
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await follower.aclose()
        await first.aclose()


async def _calls(client: Redis, command: str) -> int:
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def _until(count: Callable[[], Awaitable[int]], at_least: int) -> None:
    async with asyncio.timeout(10):
        while await count() < at_least:  # noqa: ASYNC110 - another process (Redis) moves the counter
            await asyncio.sleep(0.01)  # polling the server's counter, a condition
