"""The fast path on one server (`adapters/redis/packed.py`): a batch of pre-packed commands in one
write with every reply in order (error replies as values), a reconnect and retry when the server
drops the connection, a typed error when it is down, and a connection still in step with the server
after a batch cancelled at any point; for `PackedConnections` (callers side by side) each caller's
own replies, a bounded number of held connections and none leaked by a failure or a cancel."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters.redis.packed import PackedConnection, PackedConnections, pack
from app.embedded_redis import embedded_redis
from tests.defaults import client_of
from tests.redis_server import RedisServer


@pytest.fixture(params=["fakeredis", pytest.param("redis-server", marks=pytest.mark.redis_server)])
async def single(request: pytest.FixtureRequest) -> Redis:
    if request.param == "fakeredis":
        return embedded_redis()
    server: RedisServer = request.getfixturevalue("redis_server")
    client = client_of(server.url)
    await client.flushall()
    assert isinstance(client, Redis)
    return client


def test_pack_is_the_resp_array_of_its_arguments() -> None:
    assert pack(b"SET", b"k", b"v\r\n") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n"
    assert pack(b"PING") == b"*1\r\n$4\r\nPING\r\n"


@pytest.mark.parametrize("length", [0, 1, 9, 10, 1023, 1024, 1025, 70_000])
def test_pack_gives_the_bytes_redis_py_packs_for_any_argument_length(length: int) -> None:
    """Lengths below 1,024 take their header from a table, longer ones are formatted."""
    from redis.connection import PythonRespSerializer

    args = (b"EVALSHA", b"s" * 40, b"1", b"k", b"x\r\n" * (length // 3) + b"y" * (length % 3), b"")
    expected = b"".join(PythonRespSerializer(65536, lambda value: value).pack(*args))
    assert pack(*args) == expected


async def test_a_batch_gets_every_reply_in_order_with_error_replies_as_values(single: Redis) -> None:
    await single.set(b"aura:test:string", b"s")
    connection = PackedConnection(single)
    try:
        replies = await connection.execute(b"".join([
            pack(b"SET", b"aura:test:a", b"1"),
            pack(b"XADD", b"aura:test:string", b"1-1", b"e", b"x"),  # WRONGTYPE
            pack(b"XADD", b"aura:test:stream", b"1-1", b"e", b"x"),
            pack(b"XADD", b"aura:test:stream", b"1-1", b"e", b"x"),  # not after the last id
            pack(b"GET", b"aura:test:a"),
        ]), 5)
        assert replies[0] in (b"OK", True)
        assert isinstance(replies[1], ResponseError) and "WRONGTYPE" in str(replies[1])
        assert replies[2] == b"1-1"
        assert isinstance(replies[3], ResponseError) and "equal or smaller" in str(replies[3])
        assert replies[4] == b"1"
        assert await connection.execute(pack(b"GET", b"aura:test:a"), 1) == [b"1"]  # nothing left unread
    finally:
        await connection.aclose()
        await single.aclose()


async def test_a_connection_the_server_dropped_is_reopened_and_the_batch_retried(
        redis_server: RedisServer) -> None:
    client = client_of(redis_server.url)
    assert isinstance(client, Redis)
    connection = PackedConnection(client)
    try:
        await client.flushall()
        await connection.execute(pack(b"CLIENT", b"SETNAME", b"aura-test-packed"), 1)
        victim = next(c for c in await client.client_list() if c["name"] == "aura-test-packed")
        assert await client.client_kill_filter(_id=victim["id"]) == 1
        assert await connection.execute(pack(b"INCR", b"aura:test:counter"), 1) == [1]  # once, on a new connection
        assert await client.get("aura:test:counter") == b"1"
    finally:
        await connection.aclose()
        await client.aclose()


async def test_a_batch_to_a_stopped_server_fails_typed(unused_port: int) -> None:
    client = client_of(f"redis://127.0.0.1:{unused_port}/0", connect_timeout_seconds=0.2)
    assert isinstance(client, Redis)
    connection = PackedConnection(client)
    try:
        with pytest.raises(RedisConnectionError):
            await connection.execute(pack(b"PING"), 1)
    finally:
        await connection.aclose()
        await client.aclose()


async def test_a_batch_cancelled_at_any_loop_step_leaves_the_connection_in_step(redis_server: RedisServer) -> None:
    client = client_of(redis_server.url)
    assert isinstance(client, Redis)
    connection = PackedConnection(client)
    try:
        await client.flushall()
        await connection.execute(pack(b"PING"), 1)
        step = 0
        while True:  # cancel after 0, 1, 2, ... loop steps until the batch completes first
            assert step < 500
            batch = asyncio.create_task(connection.execute(
                pack(b"SET", b"aura:test:step", b"%d" % step) + pack(b"GET", b"aura:test:step"), 2))
            for _ in range(step):
                await asyncio.sleep(0)
            if not batch.cancel():
                assert (await batch)[1] == b"%d" % step
                break
            with pytest.raises(asyncio.CancelledError):
                await batch
            # whatever was cut off, the next batch reads its own replies
            assert await connection.execute(pack(b"ECHO", b"step-%d" % step), 1) == [b"step-%d" % step]
            step += 1
        assert step > 1
    finally:
        await connection.aclose()
        await client.aclose()


async def test_a_batch_larger_than_the_socket_takes_at_once_is_written_whole(single: Redis) -> None:
    connection = PackedConnection(single)
    value = b"v" * (16 * 2**20)
    try:
        assert await connection.execute(pack(b"SET", b"aura:test:big", value) + pack(b"STRLEN", b"aura:test:big"),
                                        2) in ([b"OK", len(value)], [True, len(value)])
    finally:
        await connection.aclose()
        await single.aclose()


@pytest.mark.redis_server
async def test_a_batch_is_bounded_by_the_socket_timeout_as_a_whole_and_fails_typed(redis_server: RedisServer) -> None:
    """Each reply of this batch comes within the timeout of the one before, the batch's last one
    not: the bound is the batch's (a retryable redis-py TimeoutError, after the client's retries),
    and the next batch reads its own replies."""
    client = client_of(redis_server.url, socket_timeout_seconds=0.3)
    assert isinstance(client, Redis)
    connection = PackedConnection(client)
    slow = pack(b"BLPOP", b"aura:test:empty", b"0.2")  # nil after 0.2 s
    try:
        with pytest.raises(RedisTimeoutError):
            await connection.execute(slow + slow, 2)
        assert await connection.execute(slow, 1) == [None]
        assert await connection.execute(pack(b"ECHO", b"after"), 1) == [b"after"]
    finally:
        await connection.aclose()
        await client.aclose()


async def test_callers_side_by_side_each_get_their_own_replies_on_a_few_held_connections(single: Redis) -> None:
    connections = PackedConnections(single, keep=3)
    try:
        replies = await asyncio.gather(*(connections.execute(
            pack(b"SET", b"aura:test:%d" % n, b"v%d" % n) + pack(b"GET", b"aura:test:%d" % n), 2) for n in range(30)))
        assert [reply[1] for reply in replies] == [b"v%d" % n for n in range(30)]
        assert len(connections._idle) == 3  # the others went back to the pool
        held = set(connections._idle)
        assert await connections.execute(pack(b"ECHO", b"again"), 1) == [b"again"]
        assert set(connections._idle) == held  # a held one served it: no checkout from the pool
    finally:
        await connections.aclose()
        assert connections._idle == []
        await single.aclose()


@pytest.mark.redis_server
async def test_a_side_by_side_call_cancelled_at_any_loop_step_leaves_every_connection_in_step(
        redis_server: RedisServer) -> None:
    client = client_of(redis_server.url)
    assert isinstance(client, Redis)
    connections = PackedConnections(client, keep=2)
    try:
        await client.flushall()
        step = 0
        while True:  # cancel after 0, 1, 2, ... loop steps until the call completes first
            assert step < 500
            other = asyncio.create_task(connections.execute(pack(b"ECHO", b"other-%d" % step), 1))
            call = asyncio.create_task(connections.execute(
                pack(b"SET", b"aura:test:step", b"%d" % step) + pack(b"GET", b"aura:test:step"), 2))
            for _ in range(step):
                await asyncio.sleep(0)
            cancelled = call.cancel()
            assert await other == [b"other-%d" % step]
            if not cancelled:
                assert (await call)[1] == b"%d" % step
                break
            with pytest.raises(asyncio.CancelledError):
                await call
            # whatever was cut off, the next calls read their own replies
            assert await asyncio.gather(*(connections.execute(pack(b"ECHO", b"%d-%d" % (step, n)), 1)
                                          for n in range(3))) == [[b"%d-%d" % (step, n)] for n in range(3)]
            step += 1
        assert step > 1
        assert len(client.connection_pool._in_use_connections) == len(connections._idle) <= 2  # nothing leaked
    finally:
        await connections.aclose()
        await client.aclose()


async def test_side_by_side_calls_to_a_stopped_server_fail_typed_and_hold_nothing(unused_port: int) -> None:
    client = client_of(f"redis://127.0.0.1:{unused_port}/0", connect_timeout_seconds=0.2)
    assert isinstance(client, Redis)
    connections = PackedConnections(client)
    try:
        for outcome in await asyncio.gather(*(connections.execute(pack(b"PING"), 1) for _ in range(3)),
                                            return_exceptions=True):
            assert isinstance(outcome, RedisConnectionError)
        assert connections._idle == [] and not client.connection_pool._in_use_connections
    finally:
        await connections.aclose()
        await client.aclose()
