"""The one place that builds Redis clients, real or in-process, for every Redis adapter.

Storage format: every client built here returns **bytes** (`decode_responses=False`). Values
Aura writes are UTF-8 JSON encoded by Aura itself, so the stored bytes are exactly what the DWP
backend reads; raw bytes also mean a foreign, non-UTF-8 payload on a channel can never crash a
reader — the domain's parsers accept `str | bytes` and refuse what they cannot read.

Both clients speak RESP2: it is what every Redis deployment and proxy in the DWP understands,
and the pub/sub reader in `signals.py` parses RESP2 replies.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import fakeredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelManagedConnection
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import HIREDIS_AVAILABLE

from adapters.redis.sentinel import create_sentinel_redis, is_sentinel_url, parse_sentinel_url

_log = logging.getLogger(__name__)

RESP_PROTOCOL = 2
DEFAULT_SOCKET_TIMEOUT_SECONDS = 5.0
DEFAULT_CONNECT_TIMEOUT_SECONDS = 2.0
DEFAULT_HEALTH_CHECK_INTERVAL_SECONDS = 30
# A command that hits a dropped connection or a timeout is retried this often (jittered
# backoff) before the error reaches the caller; the approval writes are compare-and-set.
DEFAULT_COMMAND_RETRIES = 2
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_POOL_TIMEOUT_SECONDS = 5.0


def _hiredis_options() -> dict[str, Any]:
    if not HIREDIS_AVAILABLE:
        _log.warning("hiredis is not installed; Redis replies are parsed in pure Python")
        return {}
    # Private module, but the only public way to name the parser; redis-py would pick it by
    # default anyway, so this only makes the choice explicit.
    from redis._parsers import _AsyncHiredisParser

    return {"parser_class": _AsyncHiredisParser}


class _CancellationSafeWrites(AbstractConnection):
    """redis-py writes every command under `asyncio.wait_for(..., socket_timeout)`. Before Python
    3.12, `wait_for` loses a cancellation that arrives after the write has finished but before the
    waiting task resumed (CPython issue 86296): it returns normally, the caller reads the reply and
    carries on as if it had never been cancelled. A run cancelled while it stored its approval
    request then went on to wait for the approval with nobody watching, and stayed there. And
    `wait_for` runs the write in a task of its own: one more task per command.

    Here the write is bounded by `asyncio.timeout` instead (no task, and it never swallows a
    cancellation); errors are handled as redis-py handles them."""

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        if not self.is_connected:
            if isinstance(self, SentinelManagedConnection):
                await self.connect()  # type: ignore[no-untyped-call]  # asks the sentinels for the master first
            else:
                await self.connect_check_health(check_health=False)
        if check_health:
            await self.check_health()  # type: ignore[no-untyped-call]  # unannotated in redis-py
        writer = self._writer
        assert writer is not None  # connected above
        try:
            if isinstance(command, str):
                command = command.encode()
            if isinstance(command, bytes):
                command = [command]
            writer.writelines(command)
            transport = writer.transport
            if transport.get_write_buffer_size() or transport.is_closing():
                # Only a write the socket did not take at once needs waiting for (and a closing
                # transport the connection-lost news drain() raises); most batches are small.
                async with asyncio.timeout(self.socket_timeout):
                    await writer.drain()
        except BaseException as exc:
            # Part of the command may be on the wire; the connection cannot be reused.
            await self._drop(exc, "writing to")

    async def read_replies(self, count: int) -> list[Any]:
        """The replies to `count` commands sent before, in order, under one timeout. An error reply
        is returned as its `ResponseError`, not raised, so one refused command hides no other
        reply. redis-py's `read_response` per reply costs a timeout scope and its bookkeeping each:
        more than the parsing itself for the event log's small batches."""
        try:
            async with asyncio.timeout(self.socket_timeout):
                parser: Any = self._parser  # an async parser (hiredis or RESP2), typed as their base
                replies = [await parser.read_response(disable_decoding=True) for _ in range(count)]
        except BaseException as exc:
            # Replies may be left unread; the connection cannot be reused.
            await self._drop(exc, "reading from")
        if isinstance(self, SentinelManagedConnection) and any(isinstance(r, ReadOnlyError) for r in replies):
            # The master this connection reached was demoted (a failover): nothing of the batch was
            # written there. Drop it, so the retry asks the sentinels for the new master, as
            # redis-py's `SentinelManagedConnection.read_response` does.
            await self.disconnect(nowait=True)
            raise RedisConnectionError("The previous master is now a replica")
        if self.health_check_interval:
            self.next_health_check = asyncio.get_running_loop().time() + self.health_check_interval
        return replies

    async def _drop(self, error: BaseException, doing: str) -> NoReturn:
        """Drops the connection after a failed write or read and raises `error` as redis-py would
        (a cancellation stays what it is)."""
        await self.disconnect(nowait=True)
        if isinstance(error, TimeoutError):
            raise RedisTimeoutError(f"Timeout {doing} socket") from None
        if isinstance(error, OSError):
            raise RedisConnectionError(f"Error while {doing} socket: {error}") from error
        raise error


_CANCELLATION_SAFE: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def cancellation_safe(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """`connection_class` (TCP, TLS or Unix socket, as the URL chose) with cancellation-safe writes."""
    if connection_class not in _CANCELLATION_SAFE:
        _CANCELLATION_SAFE[connection_class] = type(
            f"CancellationSafe{connection_class.__name__}", (_CancellationSafeWrites, connection_class), {})
    return _CANCELLATION_SAFE[connection_class]


def pack(*args: bytes) -> bytes:
    """One command in RESP, from arguments that are already bytes."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


class DedicatedConnection:
    """A connection with the client's settings (URL, TLS, credentials, timeouts, retries) held by
    one sequential writer (`SharedConnection`'s sender) instead of borrowed from the pool for each
    batch: at small batches redis-py's pool checkout and its `Pipeline` (packing argument by
    argument, bookkeeping per reply) cost more CPU than the exchange itself, so commands come here
    packed by the caller (`pack`) and go out in one write.

    A dropped connection or a timeout is retried as the client's own commands are (the caller's
    commands must be safe to repeat); an error reply is a value in the result, not an exception.
    The connection is taken from the client's pool and kept: closing the client closes it too."""

    def __init__(self, redis: Redis) -> None:
        self._pool = redis.connection_pool
        self._connection: AbstractConnection | None = None

    async def execute(self, packed: bytes, replies: int) -> list[Any]:
        connection = self._connection
        if connection is None:
            connection = self._connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]

        async def attempt() -> list[Any]:
            await connection.send_packed_command(packed)
            if isinstance(connection, _CancellationSafeWrites):
                return await connection.read_replies(replies)
            return await _read_each(connection, replies)  # the in-process fake

        async def fail(_error: Exception) -> None:
            await connection.disconnect(nowait=True)

        result: list[Any] = await connection.retry.call_with_retry(attempt, fail)
        return result

    async def aclose(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await self._pool.release(connection)


async def _read_each(connection: AbstractConnection, count: int) -> list[Any]:
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await connection.read_response(disable_decoding=True))
        except ResponseError as error:
            replies.append(error)
    return replies


@dataclass(slots=True)
class _Queued:
    packed: bytes
    replies: int
    future: asyncio.Future[list[Any]]


class SharedConnection:
    """One connection shared by every caller of the hot path's small commands (the event log's
    batches, a run's admission and close, the conversation append, approval decisions). What all
    callers queue while a batch is on the wire goes out together in the next write, and each caller
    gets its own replies: under load a run's admission or close rides in the same round trip as
    other runs' events, and alone a command costs one exchange without redis-py's pool checkout
    and per-argument packing (the bench's `against` phase measures the difference).

    Commands come packed (`pack`), must be quick (no blocking commands, no large reads: one slow
    reply would hold up everyone's) and safe to repeat (a dropped connection is retried, see
    `DedicatedConnection`). An error reply is a value in the caller's result. A caller cancelled
    before its commands were written has them dropped; after, they run, as with redis-py."""

    def __init__(self, redis: Redis) -> None:
        self._connection = DedicatedConnection(redis)
        self._queue: list[_Queued] = []
        self._sender: asyncio.Task[None] | None = None

    async def execute(self, packed: bytes, replies: int) -> list[Any]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(packed, replies, future))
        if self._sender is None:  # it ends when the queue is empty: no task lingers while idle
            self._sender = asyncio.create_task(self._send_queued(), name="redis shared connection")
        return await future

    async def _send_queued(self) -> None:
        try:
            while self._queue:
                batch, self._queue = [item for item in self._queue if not item.future.cancelled()], []
                if batch:
                    await self._send(batch)
        finally:
            self._sender = None

    async def _send(self, batch: list[_Queued]) -> None:
        try:
            results = await self._connection.execute(b"".join(item.packed for item in batch),
                                                     sum(item.replies for item in batch))
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(RedisConnectionError("The Redis connection was closed."))
            raise
        except Exception as exc:  # every caller of the batch gets the failure, typed as redis-py's
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        index = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result(results[index:index + item.replies])
            index += item.replies

    async def transaction(self, *commands: bytes) -> list[Any]:
        """`commands` (each packed) as one MULTI ... EXEC; their results, the first error raised."""
        replies = await self.execute(pack(b"MULTI") + b"".join(commands) + pack(b"EXEC"), len(commands) + 2)
        for reply in replies[:-1]:  # OK, then QUEUED for each command (or the error refusing it)
            raise_error(reply)
        results = raise_error(replies[-1])
        if results is None:
            raise ResponseError("EXEC returned no results: the transaction was discarded")
        for result in results:
            raise_error(result)
        return list(results)

    async def aclose(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        queued, self._queue = self._queue, []
        for item in queued:
            if not item.future.done():
                item.future.set_exception(RedisConnectionError("The Redis connection was closed."))
        await self._connection.aclose()


def arg(value: bytes | str | int | float) -> bytes:
    """One command argument as redis-py would send it."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int):
        return b"%d" % value
    return repr(value).encode()


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua script called through `SharedConnection`: by its SHA1, and with its body once when the
    server does not know it yet (a restart, a flushed script cache), as redis-py's `Script` does."""

    body: bytes
    sha: bytes

    @classmethod
    def of(cls, body: str) -> LuaScript:
        return cls(body.encode(), hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest().encode())

    async def run(self, shared: SharedConnection, keys: Sequence[str],
                  args: Sequence[bytes | str | int | float]) -> Any:
        tail = [b"%d" % len(keys), *(arg(k) for k in keys), *(arg(a) for a in args)]
        (reply,) = await shared.execute(pack(b"EVALSHA", self.sha, *tail), 1)
        if isinstance(reply, NoScriptError):
            (reply,) = await shared.execute(pack(b"EVAL", self.body, *tail), 1)
        return raise_error(reply)


def raise_error(reply: Any) -> Any:
    """`reply`, or the error it is: for callers of `SharedConnection` that want redis-py's raising."""
    if isinstance(reply, ResponseError):
        raise reply
    return reply


_SHARED: weakref.WeakKeyDictionary[Redis, SharedConnection] = weakref.WeakKeyDictionary()


def shared_connection(redis: Redis) -> SharedConnection:
    """The one `SharedConnection` of `redis`: every adapter of a client shares it."""
    shared = _SHARED.get(redis)
    if shared is None:
        shared = _SHARED[redis] = SharedConnection(redis)
    return shared


def create_redis(
    url: str | None,
    *,
    socket_timeout_seconds: float = DEFAULT_SOCKET_TIMEOUT_SECONDS,
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
    health_check_interval_seconds: int = DEFAULT_HEALTH_CHECK_INTERVAL_SECONDS,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    pool_timeout_seconds: float = DEFAULT_POOL_TIMEOUT_SECONDS,
) -> Redis:
    """A Redis client for `url`, or an in-process fakeredis server when `url` is None.

    The fake has its own `FakeServer`, so plain commands, transactions, Lua and pub/sub of
    every connection this client opens share one keyspace, as on a real server.
    """
    if url is None:
        return fakeredis.FakeAsyncRedis(
            server=fakeredis.FakeServer(),
            decode_responses=False,
            protocol=RESP_PROTOCOL,
        )
    # A blocking pool: when every connection is busy a command waits for one (up to the pool
    # timeout) instead of failing at once, which is what redis-py's default pool does past its
    # cap. The benchmark's bursts of new streams and thousands of parked runs hit exactly that.
    options: dict[str, Any] = dict(
        max_connections=max_connections,
        timeout=pool_timeout_seconds,
        decode_responses=False,
        protocol=RESP_PROTOCOL,
        socket_timeout=socket_timeout_seconds,
        socket_connect_timeout=connect_timeout_seconds,
        socket_keepalive=True,
        health_check_interval=health_check_interval_seconds,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), DEFAULT_COMMAND_RETRIES),
        **_hiredis_options(),
    )
    if is_sentinel_url(url):
        redis = create_sentinel_redis(parse_sentinel_url(url), options)
        redis.connection_pool.connection_class = cancellation_safe(redis.connection_pool.connection_class)
        return redis
    pool = BlockingConnectionPool.from_url(url, **options)
    pool.connection_class = cancellation_safe(pool.connection_class)
    return Redis(connection_pool=pool)
