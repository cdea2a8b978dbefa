"""The fast path on one server: commands the caller packs itself, sent in one write on a
connection it holds (the event log's appends; a run's admission and close; an approval's writes).

Why it exists (a same-run A/B, 2026-12-07, 2,000 sequential appends and 50 runs of 100 appends on
one redis-server, medians of 5): redis-py's pipeline encodes every argument of every command
(`Encoder.encode`, a generator per command) and checks a connection out of the pool for each
batch; for the event log's EVALSHA of twelve arguments that cost 163 µs of CPU per event at one
stream against 115 µs here, and 38 µs against 16 µs at 50 streams. Every event of every run pays
it; so do every run's admission and close and every approval's creation, decision and session
record (`PackedConnections`: many runs' calls side by side; a same-run A/B, 2026-12-08, 2,000
admissions and closes, medians of 5: 229 µs of CPU per run against 411). Everything else uses
redis-py's pipelines and scripts.

It uses only redis-py's public connection surface: `ConnectionPool.get_connection`/`release`,
`AbstractConnection.send_packed_command`, `read_response` and `disconnect`, and `Retry`. A cluster
has no one connection to hold: there the event log sends its batch as a pipeline
(`client.run_batch`), and the run directory and the approval store use redis-py's commands."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Each bulk string's length header for the lengths most arguments have (an envelope is a few hundred
# bytes), made once: bytes %-formatting per argument was most of the cost of packing an append.
_HEADERS = [b"$%d" % length for length in range(1024)]


def pack(*args: bytes) -> bytes:
    """One command in RESP, from arguments that are already bytes: `*<n>`, then `$<length>` and
    the argument for each, every part ended by CRLF (one join, no per-argument formatting)."""
    parts = [b"*%d" % len(args)]
    for arg in args:
        length = len(arg)
        parts.append(_HEADERS[length] if length < 1024 else b"$%d" % length)
        parts.append(arg)
    parts.append(b"")
    return b"\r\n".join(parts)


class PackedConnection:
    """A connection of the client's pool (its URL, TLS, credentials, timeouts and retries) held by
    one sequential writer. A batch is written at once and its replies read in order; an error
    reply is a value in the result, not an exception. A dropped connection or a timeout is retried
    as the client's own commands are (the caller's commands must be safe to repeat); a batch cut
    short (cancelled) drops the connection, whose replies could be left unread. Closing the
    client closes the connection too."""

    def __init__(self, redis: Redis) -> None:
        self._pool = redis.connection_pool
        self._connection: AbstractConnection | None = None
        self._lock = asyncio.Lock()

    async def execute(self, packed: bytes, replies: int) -> list[Any]:
        async with self._lock:
            connection = self._connection
            if connection is None:
                connection = self._connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            return await _exchange(connection, packed, replies)

    async def aclose(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await self._pool.release(connection)


class PackedConnections:
    """Connections of the client's pool for callers that each send one batch and wait for its
    replies, side by side (the run directory's admission and close of many runs at once). A caller
    takes an idle one, or one from the pool; up to `keep` stay held between calls (a checkout from
    the pool checks the connection's socket, a cost per call this avoids), the others go back to
    the pool. Writes, replies, retries and a cut-short batch as `PackedConnection`'s."""

    def __init__(self, redis: Redis, *, keep: int = 4) -> None:
        self._pool = redis.connection_pool
        self._keep = keep
        self._idle: list[AbstractConnection] = []
        self._closed = False

    async def execute(self, packed: bytes, replies: int) -> list[Any]:
        idle = self._idle
        connection = idle.pop() if idle else await self._pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            result = await _exchange(connection, packed, replies)
        except BaseException:
            await self._pool.release(connection)  # dropped by `_exchange`: the pool connects it again
            raise
        if len(idle) < self._keep and not self._closed:
            idle.append(connection)
        else:
            await self._pool.release(connection)
        return result

    async def call_script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """One call of a script registered on the client, as a packed EVALSHA; its reply (an error
        reply as a value). A server that does not know the script (a restart, a flushed cache) gets
        the call through the script object, which loads it and runs it."""
        (reply,) = await self.execute(pack(b"EVALSHA", script.sha.encode(), b"%d" % len(keys),
                                           *map(as_argument, keys), *map(as_argument, args)), 1)
        if isinstance(reply, NoScriptError):
            reply = await script(keys=keys, args=args)
        return reply

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await self._pool.release(connection)


async def _exchange(connection: AbstractConnection, packed: bytes, replies: int) -> list[Any]:
    """`packed` written on `connection` and its `replies` read, retried as the client's own
    commands are; the connection is dropped when the exchange fails or is cut short."""

    async def attempt() -> list[Any]:
        try:
            await connection.send_packed_command(packed)
            return await _replies(connection, replies)
        except BaseException:
            await connection.disconnect(nowait=True)
            raise

    async def fail(_error: Exception) -> None:
        await connection.disconnect(nowait=True)

    result: list[Any] = await connection.retry.call_with_retry(attempt, fail)
    return result


def as_argument(value: bytes | str | int | float) -> bytes:
    """One argument as redis-py's encoder sends it (an int in decimal, a float by `repr`)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int):
        return b"%d" % value
    return repr(value).encode()


async def _replies(connection: AbstractConnection, count: int) -> list[Any]:
    """`count` replies under one bound, the connection's socket timeout, for the whole batch:
    `read_response`'s own bound (with `timeout=None`) opens a timeout scope per reply, which cost
    more than parsing the event log's small replies. `math.inf` is redis-py's documented "no bound
    of its own" for one read."""
    replies: list[Any] = []
    bound = connection.socket_timeout
    try:
        async with asyncio.timeout(bound):
            for _ in range(count):
                try:
                    replies.append(await connection.read_response(disable_decoding=True, timeout=math.inf))
                except ResponseError as error:
                    replies.append(error)
    except TimeoutError:
        # as redis-py raises it (a retryable error; the caller drops the connection)
        raise RedisTimeoutError("Timeout reading from the Redis socket") from None
    return replies
