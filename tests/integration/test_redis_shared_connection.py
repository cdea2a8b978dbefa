"""The hot path's shared connection: pre-packed commands of concurrent callers in one write, each
caller's replies in order (error replies as values), a reconnect and retry when the server drops it,
a connection in step with the server after a cancelled batch, MULTI/EXEC and Lua scripts."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from adapters.redis.client import (
    DedicatedConnection,
    LuaScript,
    SharedConnection,
    create_redis,
    pack,
    shared_connection,
)
from tests.redis_server import RedisServer


def test_pack_is_the_resp_array_of_its_arguments() -> None:
    assert pack(b"SET", b"k", b"v\r\n") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n"
    assert pack(b"PING") == b"*1\r\n$4\r\nPING\r\n"


async def test_a_batch_gets_every_reply_in_order_with_error_replies_as_values(redis_client: Redis) -> None:
    await redis_client.set(b"aura:test:string", b"s")
    connection = DedicatedConnection(redis_client)
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
        # the next batch's replies are its own: nothing was left unread
        assert await connection.execute(pack(b"GET", b"aura:test:a"), 1) == [b"1"]
    finally:
        await connection.aclose()


async def test_a_connection_the_server_dropped_is_reopened_and_the_batch_retried(
        redis_server: RedisServer) -> None:
    client = create_redis(redis_server.url)
    connection = DedicatedConnection(client)
    try:
        await client.flushall()
        await connection.execute(pack(b"CLIENT", b"SETNAME", b"aura-test-dedicated"), 1)
        listed = await client.client_list()
        victim = next(c for c in listed if c["name"] == "aura-test-dedicated")
        assert await client.client_kill_filter(_id=victim["id"]) == 1
        replies = await connection.execute(pack(b"INCR", b"aura:test:counter"), 1)
        assert replies == [1]  # written once, on a fresh connection
        assert await client.get("aura:test:counter") == b"1"
    finally:
        await connection.aclose()
        await client.aclose()


async def test_a_batch_to_a_stopped_server_fails_typed(unused_port: int) -> None:
    client = create_redis(f"redis://127.0.0.1:{unused_port}/0", connect_timeout_seconds=0.2)
    connection = DedicatedConnection(client)
    try:
        with pytest.raises(RedisConnectionError):
            await connection.execute(pack(b"PING"), 1)
    finally:
        await connection.aclose()
        await client.aclose()


async def test_a_batch_cancelled_at_any_loop_step_leaves_the_connection_in_step(redis_server: RedisServer) -> None:
    client = create_redis(redis_server.url)
    connection = DedicatedConnection(client)
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


async def test_callers_queued_while_a_batch_is_out_share_the_next_write(redis_client: Redis) -> None:
    shared = SharedConnection(redis_client)
    writes: list[int] = []
    execute = shared._connection.execute

    async def counted(packed: bytes, replies: int) -> list[object]:
        writes.append(replies)
        return await execute(packed, replies)

    shared._connection.execute = counted  # type: ignore[method-assign]
    try:
        results = await asyncio.gather(
            shared.execute(pack(b"SET", b"aura:test:one", b"1"), 1),
            shared.execute(pack(b"INCR", b"aura:test:one") + pack(b"INCR", b"aura:test:one"), 2),
            shared.execute(pack(b"GET", b"aura:test:one"), 1))
        assert [r[-1] for r in results] == [results[0][0], 3, b"3"]
        assert writes == [4]  # all three callers queued before the sender ran: one write
        assert shared._sender is None  # nothing lingers once the queue is empty
    finally:
        await shared.aclose()


async def test_a_caller_cancelled_before_the_write_has_its_commands_dropped(redis_client: Redis) -> None:
    shared = SharedConnection(redis_client)
    try:
        first = asyncio.create_task(shared.execute(pack(b"SET", b"aura:test:kept", b"1"), 1))
        dropped = asyncio.create_task(shared.execute(pack(b"SET", b"aura:test:dropped", b"1"), 1))
        await asyncio.sleep(0)  # both queued; the sender has not written yet
        dropped.cancel()
        await first
        with pytest.raises(asyncio.CancelledError):
            await dropped
        assert await redis_client.get("aura:test:kept") == b"1"
        assert await redis_client.exists("aura:test:dropped") == 0
    finally:
        await shared.aclose()


async def test_every_caller_of_a_failed_batch_gets_a_typed_error(unused_port: int) -> None:
    client = create_redis(f"redis://127.0.0.1:{unused_port}/0", connect_timeout_seconds=0.2)
    shared = SharedConnection(client)
    try:
        results = await asyncio.gather(shared.execute(pack(b"PING"), 1), shared.execute(pack(b"PING"), 1),
                                       return_exceptions=True)
        assert [type(r) for r in results] == [RedisConnectionError, RedisConnectionError]
    finally:
        await shared.aclose()
        await client.aclose()


async def test_a_transaction_returns_its_results_and_raises_its_first_error(redis_client: Redis) -> None:
    shared = shared_connection(redis_client)
    assert shared_connection(redis_client) is shared  # one per client
    assert await shared.transaction(pack(b"SET", b"aura:test:t", b"1"), pack(b"INCR", b"aura:test:t"),
                                    pack(b"GET", b"aura:test:t")) in ([b"OK", 2, b"2"], [True, 2, b"2"])
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await shared.transaction(pack(b"INCR", b"aura:test:t"), pack(b"LPUSH", b"aura:test:t", b"x"))
    assert await redis_client.get("aura:test:t") == b"3"  # EXEC ran the commands before the refused one


async def test_a_script_the_server_does_not_know_is_sent_with_its_body(redis_client: Redis) -> None:
    script = LuaScript.of("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    shared = shared_connection(redis_client)
    assert await script.run(shared, ["aura:test:n"], [2]) == 2
    assert await script.run(shared, ["aura:test:n"], [3]) == 5  # by SHA1 now
    await redis_client.script_flush()
    assert await script.run(shared, ["aura:test:n"], [4]) == 9


async def test_a_batch_larger_than_the_socket_takes_at_once_is_written_whole(redis_client: Redis) -> None:
    # The write waits for the socket to drain only when it did not take everything at once.
    connection = DedicatedConnection(redis_client)
    value = b"v" * (16 * 2**20)
    try:
        assert await connection.execute(pack(b"SET", b"aura:test:big", value) + pack(b"STRLEN", b"aura:test:big"),
                                        2) in ([b"OK", len(value)], [True, len(value)])
    finally:
        await connection.aclose()
