"""Approval signals over Redis Pub/Sub (contract section 4), one subscriber connection per bus.

Every waiting run of the process shares one dedicated Pub/Sub connection, read by one reader
task. Each `subscribe()` gets its own bounded queue (one `PubSub` object shared by every wait would
let one user's approval break another user's wait), channels are
reference-counted (two waits on one session share a SUBSCRIBE), and a channel is UNSUBSCRIBEd
when its last wait ends, however it ends.

Ordering guarantees the approval flow relies on:
- `subscribe()` yields only after the server confirmed the SUBSCRIBE, so a caller that then
  stores its request (or reads `hitl:signal:{sessionId}`) cannot miss a signal published after;
- leaving it does not wait for the server: the UNSUBSCRIBE (when it was the channel's last wait)
  is sent and confirmed in the background, so a decided run goes on at once instead of after one
  more round trip; a new wait on the same session meanwhile either keeps the channel or
  subscribes again behind the UNSUBSCRIBE. `settled()` waits for those confirmations.

When the connection drops, the reader reconnects with capped, jittered exponential backoff,
resubscribes every live channel and then re-reads `hitl:signal:{sessionId}` of each, delivering
the stored value as if it had been published: a signal sent during the outage still counts (the
domain ignores duplicates and signals for other requests). Waiters see no error meanwhile.

Wire details: the connection is built from the client's own settings but speaks RESP2 with raw
bytes, has no redis-py retries (this bus reconnects and resubscribes itself) and no redis-py
health checks (those would read a reply meant for the reader); the reader PINGs an idle
connection instead and drops it when the PING goes unanswered.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine, Sequence
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
from domain.runtime.waits import Backoff, Flag, TaskSet

_log = logging.getLogger(__name__)

CHANNEL_PREFIX = "hitl:channel:"
SIGNAL_KEY_PREFIX = "hitl:signal:"
DEFAULT_SIGNAL_TTL_SECONDS = 300
DEFAULT_QUEUE_SIZE = 64
DEFAULT_IDLE_PING_SECONDS = 15.0
DEFAULT_RECONNECT_INITIAL_DELAY_SECONDS = 0.05
DEFAULT_RECONNECT_MAX_DELAY_SECONDS = 5.0
# Channels per SUBSCRIBE command and keys per MGET when a whole connection is resubscribed.
_BATCH_SIZE = 256

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
    """A channel with at least one wait, and where its SUBSCRIBE stands on the current connection."""

    __slots__ = ("confirmed", "name", "on_wire", "replay_when_confirmed", "subscribers")

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.subscribers: set[_Subscription] = set()
        # SUBSCRIBE sent on the current connection and no UNSUBSCRIBE since.
        self.on_wire = False
        # The server confirmed that SUBSCRIBE; cleared when the connection is lost.
        self.confirmed = Flag()
        # Resubscribed after an outage: deliver the stored signal once confirmed.
        self.replay_when_confirmed = False


class _Wait:
    """`RedisSignalBus.subscribe`: joins the session's channel (SUBSCRIBE confirmed before it enters)
    and leaves it however the wait ends (UNSUBSCRIBE when it was the channel's last wait). A class
    rather than an @asynccontextmanager: a waiting run keeps it for the whole wait, and a generator,
    its frame and the context manager around it are several times this object's size."""

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
        channel.subscribers.add(subscription)
        self._channel, self._subscription = channel, subscription
        try:
            bus._ensure_reader()
            await bus._shielded(bus._put_on_wire(channel))
            await channel.confirmed.wait()
            if bus._closed:
                raise SignalBusClosed("the signal bus is closed")
        except BaseException:
            await self._leave()
            raise
        return subscription

    async def __aexit__(self, *exc_info: object) -> None:
        await self._leave()

    async def _leave(self) -> None:
        channel, subscription = self._channel, self._subscription
        if channel is None or subscription is None:
            return
        self._channel = self._subscription = None
        channel.subscribers.discard(subscription)
        if not channel.subscribers:
            self._bus._in_background(self._bus._release(channel))


# What the reader expects back, per channel and in command order: a SUBSCRIBE confirmation
# completes the `_Channel` that asked for it, an UNSUBSCRIBE confirmation completes a future.
_Ack = _Channel | asyncio.Future[None]


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
        # Serialises every command sent on the Pub/Sub connection with the bookkeeping that goes
        # with it, so the order of `_acks` is the order on the wire.
        self._send_lock = asyncio.Lock()
        self._connection: AbstractConnection | None = None
        self._acks: dict[bytes, deque[_Ack]] = {}
        self._had_connection = False
        self._resubscribes_outstanding = 0
        self._replay_due: list[_Channel] = []
        self._reader: asyncio.Task[None] | None = None
        self._watched_generation = 0
        self._background = TaskSet()
        self._unsubscribing: set[asyncio.Future[None]] = set()  # sent, not yet confirmed
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
        # it, and an UNSUBSCRIBE confirmation may be on its way now): cancel until the reader ends.
        while reader is not None and not reader.done():
            reader.cancel()
            await asyncio.wait([reader], timeout=0.05)
        if self._connection is not None:
            await self._abandon(self._connection)
        for channel in list(self._channels.values()):
            channel.confirmed.set()  # waits still starting see the bus closed
            for subscription in channel.subscribers:
                subscription.end()
        await self._background.wait()

    # -- subscriptions ------------------------------------------------------------------------

    async def settled(self) -> None:
        """Wait until every finished wait's UNSUBSCRIBE was sent and confirmed (or its connection
        is gone): for tests and diagnostics that look at the server's subscriptions."""
        while pending := {*self._background, *self._unsubscribing}:
            await asyncio.wait(pending)

    def _in_background(self, operation: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self._background.spawn(operation)

    async def _shielded(self, operation: Coroutine[Any, Any, None]) -> None:
        """Run `operation` to the end even if the caller is cancelled meanwhile: a command cut
        short would leave the bookkeeping out of step with the server (and redis-py drops a
        connection whose send was cancelled)."""
        await asyncio.shield(self._in_background(operation))

    async def _put_on_wire(self, channel: _Channel) -> None:
        async with self._send_lock:
            connection = self._connection
            if (
                channel.on_wire
                or not channel.subscribers
                or self._channels.get(channel.name) is not channel
                or connection is None
                or not connection.is_connected
            ):
                # Already asked for, or already released; when there is no usable connection the
                # reader subscribes every live channel as soon as it has one.
                return
            channel.on_wire = True
            self._expect_ack(channel.name, channel)
            try:
                await connection.send_command("SUBSCRIBE", channel.name, check_health=False)
            except (RedisError, OSError) as exc:
                # The reader finds the connection broken and resubscribes on the next one.
                _log.warning("SUBSCRIBE %r failed: %s", channel.name, exc)

    async def _release(self, channel: _Channel) -> None:
        async with self._send_lock:
            if channel.subscribers or self._channels.get(channel.name) is not channel:
                return  # a new wait joined meanwhile, or it is already released
            # Forget it before sending, so a wait arriving now starts a fresh SUBSCRIBE that is
            # queued behind this UNSUBSCRIBE.
            del self._channels[channel.name]
            connection = self._connection
            if not channel.on_wire or connection is None or not connection.is_connected:
                return
            channel.on_wire = False
            unsubscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._expect_ack(channel.name, unsubscribed)
            # Either the server confirms, or the connection is abandoned, which completes it too.
            self._unsubscribing.add(unsubscribed)
            unsubscribed.add_done_callback(self._unsubscribing.discard)
            try:
                await connection.send_command("UNSUBSCRIBE", channel.name, check_health=False)
            except (RedisError, OSError) as exc:
                # The connection is broken; the server drops its subscriptions with it.
                _log.warning("UNSUBSCRIBE %r failed: %s", channel.name, exc)

    def _expect_ack(self, name: bytes, ack: _Ack) -> None:
        self._acks.setdefault(name, deque()).append(ack)

    def _pop_ack(self, name: bytes) -> _Ack | None:
        pending = self._acks.get(name)
        if not pending:
            return None
        ack = pending.popleft()
        if not pending:
            del self._acks[name]
        return ack

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
        """Make `connection` current and subscribe every live channel on it."""
        async with self._send_lock:
            replay = self._had_connection
            live = [channel for channel in self._channels.values() if channel.subscribers]
            self._connection = connection
            self._had_connection = True
            for channel in live:
                channel.on_wire = True
                channel.replay_when_confirmed = replay
                self._expect_ack(channel.name, channel)
            self._resubscribes_outstanding = len(live) if replay else 0
            for batch in _batches([channel.name for channel in live], _BATCH_SIZE):
                await connection.send_command("SUBSCRIBE", *batch, check_health=False)
        if live:
            _log.info("signal bus subscribed %d channel(s) on a new connection", len(live))

    async def _abandon(self, connection: AbstractConnection) -> None:
        async with self._send_lock:
            if self._connection is connection:
                self._connection = None
                for pending in self._acks.values():
                    for ack in pending:
                        if isinstance(ack, asyncio.Future) and not ack.done():
                            ack.set_result(None)  # the subscription went with the connection
                self._acks = {}
                self._replay_due = []
                self._resubscribes_outstanding = 0
                for channel in self._channels.values():
                    channel.on_wire = False
                    channel.replay_when_confirmed = False
                    channel.confirmed.clear()
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
            self._dispatch(reply)
            if self._replay_due and not self._resubscribes_outstanding:
                await self._replay()

    def _dispatch(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 2:
            _log.debug("unexpected reply on the signal connection: %r", reply)
            return
        kind, name = reply[0], reply[1]
        if kind == b"message" and len(reply) == 3:
            channel = self._channels.get(name)
            if channel is not None:
                for subscription in list(channel.subscribers):
                    subscription.deliver(_as_bytes(reply[2]))
        elif kind == b"subscribe":
            self._on_subscribed(name)
        elif kind == b"unsubscribe":
            ack = self._pop_ack(name)
            if isinstance(ack, asyncio.Future) and not ack.done():
                ack.set_result(None)
        elif kind != b"pong":
            _log.debug("unexpected reply on the signal connection: %r", reply)

    def _on_subscribed(self, name: bytes) -> None:
        ack = self._pop_ack(name)
        if not isinstance(ack, _Channel):
            _log.warning("unexpected SUBSCRIBE confirmation for %r", name)
            return
        ack.confirmed.set()
        if ack.replay_when_confirmed:
            ack.replay_when_confirmed = False
            self._resubscribes_outstanding -= 1
            if self._channels.get(name) is ack:
                self._replay_due.append(ack)

    async def _replay(self) -> None:
        """Deliver each resubscribed channel's stored signal, in case it was sent while down.

        A failure here propagates: the connection is then dropped and the next one replays."""
        due, self._replay_due = self._replay_due, []
        for batch in _batches(due, _BATCH_SIZE):
            stored = await get_values(self._redis, [_signal_key_of_channel(channel.name) for channel in batch])
            for channel, raw in zip(batch, stored, strict=True):
                if raw is None or self._channels.get(channel.name) is not channel:
                    continue
                for subscription in list(channel.subscribers):
                    subscription.deliver(_as_bytes(raw))
