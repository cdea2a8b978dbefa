"""Approval signals over Redis Pub/Sub (contract section 4), one pattern subscription per bus.

Every waiting run of the process shares one dedicated Pub/Sub connection, read by one reader
task, subscribed once to the pattern `hitl:channel:*`. Each `subscribe()` gets its own bounded
queue (one `PubSub` object shared by every wait would let one user's approval break another
user's wait) and registers its session's channel in the bus; the reader hands each message to the
waits of its channel and drops the rest (signals of runs other instances own). A wait therefore
costs Redis nothing: no SUBSCRIBE before it, no UNSUBSCRIBE after it, however it ends; the price
is that every instance receives every signal, a few hundred bytes each.

Ordering guarantees the approval flow relies on:
- `subscribe()` yields only after the server confirmed the pattern subscription (once per
  connection), so a caller that then stores its request (or reads `hitl:signal:{sessionId}`)
  cannot miss a signal published after;
- leaving it is immediate and local.

When the connection drops, the reader reconnects with capped, jittered exponential backoff,
subscribes the pattern again and then re-reads `hitl:signal:{sessionId}` of every live wait,
delivering the stored value as if it had been published: a signal sent during the outage still
counts (the domain ignores duplicates and signals for other requests). Waiters see no error
meanwhile.

Wire details: the connection is built from the client's own settings but speaks RESP2 with raw
bytes, has no redis-py retries (this bus reconnects and resubscribes itself) and no redis-py
health checks (those would read a reply meant for the reader); the reader PINGs an idle
connection instead and drops it when the PING goes unanswered.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelManagedConnection
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from adapters.redis.client import RedisClient, execute_and_publish, get_values, new_connection, raise_error
from adapters.redis.client import batch as command_batch
from adapters.redis.sentinel import DEFAULT_MASTER_CHECK_SECONDS, master_watch
from domain.model.approval import Signal
from domain.model.errors import StoreUnavailable
from domain.model.ports import SignalBus, SignalSubscription
from domain.runtime.waits import Backoff, Flag

_log = logging.getLogger(__name__)

CHANNEL_PREFIX = "hitl:channel:"
SIGNAL_KEY_PREFIX = "hitl:signal:"
DEFAULT_SIGNAL_TTL_SECONDS = 300
DEFAULT_QUEUE_SIZE = 64
DEFAULT_IDLE_PING_SECONDS = 15.0
DEFAULT_RECONNECT_INITIAL_DELAY_SECONDS = 0.05
DEFAULT_RECONNECT_MAX_DELAY_SECONDS = 5.0
# Keys per MGET when the stored signals of every live wait are re-read after a reconnect.
_BATCH_SIZE = 256
# The one subscription of a bus: every session's channel.
_PATTERN = (CHANNEL_PREFIX + "*").encode()

_T = TypeVar("_T")


def channel_name(session_id: str) -> str:
    return f"{CHANNEL_PREFIX}{session_id}"


def signal_key(session_id: str) -> str:
    return f"{SIGNAL_KEY_PREFIX}{session_id}"


def _signal_key_of_channel(channel: bytes) -> bytes:
    return SIGNAL_KEY_PREFIX.encode() + channel[len(CHANNEL_PREFIX) :]


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _batches(items: Sequence[_T], size: int) -> list[Sequence[_T]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


class SignalBusClosed(StoreUnavailable):
    """The bus was closed (shutdown) while a wait was open or starting."""

    code = "signal_bus_closed"
    retryable = False


class _Subscription(SignalSubscription):
    """One wait's view of a channel: its own bounded buffer, fed by the bus's reader.

    No asyncio.Queue (three deques and an Event, some 3 KiB, for a buffer that is almost always
    empty) and no task per read: a wait holds one future, which `deliver` completes."""

    __slots__ = ("_buffered", "_ended", "_readers", "_size", "channel")

    def __init__(self, channel: bytes, queue_size: int) -> None:
        self.channel = channel
        self._size = queue_size
        self._buffered: deque[bytes] | None = None  # delivered before anyone asked for them
        self._readers: list[asyncio.Future[bytes]] = []  # asked before anything was delivered
        self._ended = False

    def deliver(self, payload: bytes) -> None:
        while self._readers:
            reader = self._readers.pop(0)
            if not reader.done():  # a reader that gave up (cancelled) gets nothing
                reader.set_result(payload)
                return
        buffered = self._buffered
        if buffered is None:
            buffered = self._buffered = deque()
        if len(buffered) >= self._size:
            # A wait that never reads must not grow without bound nor stall every other wait.
            buffered.popleft()
            _log.warning(
                "a wait on %r is not reading its signals; dropped the oldest one",
                self.channel.decode("utf-8", "replace"),
            )
        buffered.append(payload)

    def end(self) -> None:
        """The bus closed: wake the waiter (messages delivered before still come first)."""
        self._ended = True
        readers, self._readers = self._readers, []
        for reader in readers:
            if not reader.done():
                reader.set_exception(SignalBusClosed("the signal bus is closed"))

    def receive(self) -> asyncio.Future[bytes]:  # type: ignore[override]  # bytes is str | bytes
        reader: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        buffered = self._buffered
        if buffered:
            reader.set_result(buffered.popleft())
            if not buffered:
                self._buffered = None
        elif self._ended:
            reader.set_exception(SignalBusClosed("the signal bus is closed"))  # every later call ends so
        else:
            self._readers = [r for r in self._readers if not r.done()]
            self._readers.append(reader)
        return reader

    async def next_message(self) -> bytes:
        return await self.receive()


class _Channel:
    """A session's channel with at least one wait in this process."""

    __slots__ = ("name", "subscribers")

    def __init__(self, name: bytes) -> None:
        self.name = name
        # A list: a channel has one wait (a session's run waits on one approval at a time) or a
        # few, and an empty set alone is 216 bytes that every parked run would hold.
        self.subscribers: list[_Subscription] = []


class _Wait:
    """`RedisSignalBus.subscribe`: registers the wait with its session's channel once the bus's
    pattern subscription is confirmed, and removes it however the wait ends. A class rather than
    an @asynccontextmanager: a waiting run keeps it for the whole wait, and a generator, its frame
    and the context manager around it are several times this object's size."""

    __slots__ = ("_bus", "_channel", "_session_id", "_subscription")

    def __init__(self, bus: RedisSignalBus, session_id: str) -> None:
        self._bus = bus
        self._session_id = session_id
        self._channel: _Channel | None = None
        self._subscription: _Subscription | None = None

    async def __aenter__(self) -> SignalSubscription:
        bus = self._bus
        if bus._closed:
            raise SignalBusClosed("the signal bus is closed")
        name = channel_name(self._session_id).encode("utf-8")
        channel = bus._channels.get(name)
        if channel is None:
            channel = bus._channels[name] = _Channel(name)
        subscription = _Subscription(name, bus._queue_size)
        channel.subscribers.append(subscription)
        self._channel, self._subscription = channel, subscription
        try:
            if not bus._subscribed.is_set():
                bus._ensure_reader()
                await bus._subscribed.wait()
            if bus._closed:
                raise SignalBusClosed("the signal bus is closed")
        except BaseException:
            self._leave()
            raise
        return subscription

    async def __aexit__(self, *exc_info: object) -> None:
        self._leave()

    def _leave(self) -> None:
        channel, subscription = self._channel, self._subscription
        if channel is None or subscription is None:
            return
        self._channel = self._subscription = None
        if subscription in channel.subscribers:
            channel.subscribers.remove(subscription)
        if not channel.subscribers and self._bus._channels.get(channel.name) is channel:
            del self._bus._channels[channel.name]


class RedisSignalBus(SignalBus):
    def __init__(
        self,
        redis: RedisClient,
        *,
        signal_ttl_seconds: int = DEFAULT_SIGNAL_TTL_SECONDS,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        idle_ping_seconds: float = DEFAULT_IDLE_PING_SECONDS,
        reconnect_initial_delay_seconds: float = DEFAULT_RECONNECT_INITIAL_DELAY_SECONDS,
        reconnect_max_delay_seconds: float = DEFAULT_RECONNECT_MAX_DELAY_SECONDS,
        master_check_seconds: float = DEFAULT_MASTER_CHECK_SECONDS,
    ) -> None:
        self._master_check_seconds = master_check_seconds
        self._redis = redis
        self._signal_ttl_seconds = signal_ttl_seconds
        self._queue_size = queue_size
        self._idle_ping_seconds = idle_ping_seconds
        self._reconnects = Backoff(reconnect_initial_delay_seconds, reconnect_max_delay_seconds, jitter=True)

        self._channels: dict[bytes, _Channel] = {}
        # Serialises the commands sent on the Pub/Sub connection (the PSUBSCRIBE, the PINGs).
        self._send_lock = asyncio.Lock()
        self._connection: AbstractConnection | None = None
        # The server confirmed the pattern subscription on the current connection.
        self._subscribed = Flag()
        self._had_connection = False
        # Re-read every live wait's stored signal once the pattern is confirmed again.
        self._replay_when_subscribed = False
        self._reader: asyncio.Task[None] | None = None
        self._watched_generation = 0
        self._closed = False

    # -- the port -----------------------------------------------------------------------------

    def subscribe(self, session_id: str) -> AbstractAsyncContextManager[SignalSubscription]:
        return _Wait(self, session_id)

    async def publish(self, session_id: str, signal: Signal) -> int:
        """As the Java service does: store the signal (TTL 300 s), then publish the same JSON."""
        payload = signal.to_json().encode("utf-8")
        try:
            # Stored, then published (a PUBLISH names no key: on a cluster it belongs to no slot,
            # so no MULTI around both; the message carries the signal itself).
            pipe = command_batch(self._redis)
            pipe.set(signal_key(session_id), payload, ex=self._signal_ttl_seconds)
            (stored,), receivers = await execute_and_publish(self._redis, pipe, channel_name(session_id), payload)
            raise_error(stored)
            raise_error(receivers)
        except RedisError as exc:
            raise StoreUnavailable("the signal store is unavailable") from exc
        return int(receivers)

    async def latest(self, session_id: str) -> bytes | None:
        try:
            raw = await self._redis.get(signal_key(session_id))
        except RedisError as exc:
            raise StoreUnavailable("the signal store is unavailable") from exc
        return None if raw is None else _as_bytes(raw)

    # -- the rest of the public surface ------------------------------------------------------

    def listen(self) -> None:
        """Subscribe the pattern now, in the background (the app does at start-up), so that the
        first wait finds it confirmed instead of waiting for it."""
        self._ensure_reader()

    def live_channels(self) -> int:
        """Channels with at least one open wait (for metrics and tests)."""
        return sum(1 for channel in self._channels.values() if channel.subscribers)

    async def close(self) -> None:
        """Stop the reader, release the connection and end every open wait."""
        if self._closed:
            return
        self._closed = True
        reader, self._reader = self._reader, None
        # On Python 3.11 asyncio.wait_for swallows a cancel that lands in the loop turn its awaited
        # reply arrives in (CPython issue 86296; fakeredis, the in-process Redis, reads through
        # it): cancel until the reader ends.
        while reader is not None and not reader.done():
            reader.cancel()
            await asyncio.wait([reader], timeout=0.05)
        if self._connection is not None:
            await self._abandon(self._connection)
        self._subscribed.set()  # waits still starting see the bus closed
        for channel in list(self._channels.values()):
            for subscription in channel.subscribers:
                subscription.end()

    async def settled(self) -> None:
        """Nothing is left in flight when a wait ends (it sends nothing): kept for callers that
        look at the server's subscriptions after waits ended."""

    # -- the reader ---------------------------------------------------------------------------

    def _ensure_reader(self) -> None:
        if self._closed:
            return
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_forever(), name="aura-hitl-signal-reader")

    async def _read_forever(self) -> None:
        while True:
            await self._reconnects.pause()
            try:
                connection = await self._new_connection()
            except (RedisError, OSError) as exc:
                attempt = self._reconnects.failed()
                _log.warning("signal bus cannot reach Redis (%s); retrying, attempt %d", exc, attempt)
                continue
            watch = master_watch(self._redis)
            # The master the watch knew before this connection asked the sentinels for it.
            self._watched_generation = watch.generation if watch is not None else 0
            try:
                await connection.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                await self._adopt(connection)
                await self._pump(connection)
            except (RedisError, OSError) as exc:
                attempt = self._reconnects.failed()
                _log.warning("signal bus connection lost (%s); reconnecting, attempt %d", exc, attempt)
            except Exception:
                attempt = self._reconnects.failed()
                _log.exception("signal bus reader failed; reconnecting, attempt %d", attempt)
            finally:
                await self._abandon(connection)

    async def _new_connection(self) -> AbstractConnection:
        return await new_connection(
            self._redis,
            protocol=2,
            decode_responses=False,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            client_name="aura-hitl-signals",
        )

    async def _adopt(self, connection: AbstractConnection) -> None:
        """Make `connection` current and subscribe the pattern on it."""
        async with self._send_lock:
            self._connection = connection
            self._replay_when_subscribed = self._had_connection
            self._had_connection = True
            await connection.send_command("PSUBSCRIBE", _PATTERN, check_health=False)

    async def _abandon(self, connection: AbstractConnection) -> None:
        async with self._send_lock:
            if self._connection is connection:
                self._connection = None
                self._subscribed.clear()
                self._replay_when_subscribed = False
        try:
            await connection.disconnect(nowait=True)
        except Exception as exc:  # already broken; nothing more to release
            _log.debug("closing the signal connection failed: %r", exc)

    async def _pump(self, connection: AbstractConnection) -> None:
        """Read and dispatch replies until the connection fails (then raise)."""
        awaiting_pong = False
        loop = asyncio.get_running_loop()
        # Under Sentinel, a demoted master keeps this connection (and its subscriptions) until
        # Sentinel reconfigures it, seconds after the failover, while signals are published on the
        # new master: move as soon as the sentinels announce the switch (`MasterWatch`: no command).
        watch = master_watch(self._redis) if isinstance(connection, SentinelManagedConnection) else None
        watched = self._watched_generation
        quiet_since = loop.time()
        while True:
            timeout = self._idle_ping_seconds
            if watch is not None:
                timeout = min(timeout, self._master_check_seconds)
            reply = await connection.read_response(timeout=timeout, push_request=True)
            now = loop.time()
            if watch is not None and watch.moved(connection, watched):
                raise RedisConnectionError("the Redis master moved (a Sentinel failover)")
            if reply is None:
                if now - quiet_since < self._idle_ping_seconds:
                    continue
                # quiet for a while: prove the connection is still alive
                if awaiting_pong:
                    raise RedisConnectionError("the signal connection did not answer PING")
                async with self._send_lock:
                    await connection.send_command("PING", check_health=False)
                awaiting_pong = True
                quiet_since = now
                continue
            quiet_since = now
            awaiting_pong = False
            self._reconnects.succeeded()
            if self._dispatch(reply) and self._replay_when_subscribed:
                self._replay_when_subscribed = False
                await self._replay()

    def _dispatch(self, reply: Any) -> bool:
        """Deliver a message to its channel's waits; True when `reply` confirmed the pattern."""
        if not isinstance(reply, list) or len(reply) < 2:
            _log.debug("unexpected reply on the signal connection: %r", reply)
            return False
        kind = reply[0]
        if kind == b"pmessage" and len(reply) == 4:
            channel = self._channels.get(reply[2])
            if channel is not None:  # else a run this process does not hold
                for subscription in list(channel.subscribers):
                    subscription.deliver(_as_bytes(reply[3]))
        elif kind == b"psubscribe":
            self._subscribed.set()
            return True
        elif kind != b"pong":
            _log.debug("unexpected reply on the signal connection: %r", reply)
        return False

    async def _replay(self) -> None:
        """Deliver each live wait's stored signal, in case it was sent while the bus was down.

        A failure here propagates: the connection is then dropped and the next one replays."""
        live = list(self._channels.values())
        for batch in _batches(live, _BATCH_SIZE):
            stored = await get_values(self._redis, [_signal_key_of_channel(channel.name) for channel in batch])
            for channel, raw in zip(batch, stored, strict=True):
                if raw is None or self._channels.get(channel.name) is not channel:
                    continue
                for subscription in list(channel.subscribers):
                    subscription.deliver(_as_bytes(raw))
