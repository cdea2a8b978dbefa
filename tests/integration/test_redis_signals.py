"""RedisSignalBus against fakeredis and a real redis-server: the stored and published signal, the
one multiplexed Pub/Sub connection, reference-counted channels, and surviving connection loss."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, cast

import pytest
from redis.asyncio import Redis, RedisCluster

from adapters.redis import RedisSignalBus, SignalBusClosed
from domain.model.approval import Signal
from tests.defaults import client_of

WAIT_SECONDS = 10.0
APPROVAL = Signal.approval("req_00000000000000000000000000000001", "u1", 1767000000)
REJECTION = Signal.rejection("req_00000000000000000000000000000002", "u1", 1767000001, "not now")


def wire(signal: Signal) -> bytes:
    return signal.to_json().encode("utf-8")


@pytest.fixture
async def bus(redis_client: Redis) -> AsyncIterator[RedisSignalBus]:
    signal_bus = RedisSignalBus(redis_client)
    try:
        yield signal_bus
    finally:
        await signal_bus.close()


async def on_every_node(client: Redis, *command: Any) -> list[Any]:
    """A command's reply from the server, or from each node of a cluster (Pub/Sub subscriptions
    and client connections are a node's own)."""
    if isinstance(client, RedisCluster):
        return [await client.execute_command(*command, target_nodes=node) for node in client.get_nodes()]
    return [await client.execute_command(*command)]


def receivers(client: Redis, subscribed: int) -> set[int]:
    """What PUBLISH answers with `subscribed` connections listening: on a cluster it counts only
    the listeners on the node that took it (every node's listeners hear the message)."""
    return set(range(subscribed + 1)) if isinstance(client, RedisCluster) else {subscribed}


async def subscriber_counts(client: Redis, *sessions: str) -> list[int]:
    channels = [f"hitl:channel:{s}" for s in sessions]
    totals = [0] * len(channels)
    for reply in await on_every_node(client, "PUBSUB NUMSUB", *channels):
        for index, (_, count) in enumerate(reply):
            totals[index] += count
    return totals


async def pattern_subscriptions(client: Redis) -> int:
    """Pattern subscriptions the server (every node of a cluster) holds, all clients together."""
    return sum(int(reply) for reply in await on_every_node(client, "PUBSUB NUMPAT"))


async def subscribed_channels(client: Redis, pattern: str) -> list[Any]:
    return [channel for reply in await on_every_node(client, "PUBSUB CHANNELS", pattern) for channel in reply]


async def pubsub_connections(client: Redis) -> int:
    """Connections the server counts as subscribers (those with at least one channel)."""
    return sum(len(reply) for reply in await on_every_node(client, "CLIENT LIST", "TYPE", "pubsub"))


async def signal_bus_connections(client: Redis) -> int:
    """Connections opened by signal buses, subscribed or not (they are named for it)."""
    return sum(1 for reply in await on_every_node(client, "CLIENT LIST") for entry in reply
               if entry["name"] == "aura-hitl-signals")


async def test_publish_stores_then_publishes_the_exact_json(redis_client: Redis, bus: RedisSignalBus) -> None:
    receivers = await bus.publish("sess_a", REJECTION)

    assert receivers == 0
    assert wire(REJECTION) == (
        b'{"type":"rejection","requestId":"req_00000000000000000000000000000002","status":"rejected",'
        b'"reason":"not now","userId":"u1","timestamp":1767000001}'
    )
    assert await redis_client.get("hitl:signal:sess_a") == wire(REJECTION)
    assert 298 <= await redis_client.ttl("hitl:signal:sess_a") <= 300


async def test_publish_honours_the_configured_ttl(redis_client: Redis) -> None:
    await RedisSignalBus(redis_client, signal_ttl_seconds=60).publish("sess_a", APPROVAL)

    assert 58 <= await redis_client.ttl("hitl:signal:sess_a") <= 60


async def test_a_signal_published_before_subscribing_is_read_through_latest(bus: RedisSignalBus) -> None:
    assert await bus.latest("sess_a") is None
    await bus.publish("sess_a", APPROVAL)

    async with bus.subscribe("sess_a"):
        assert await bus.latest("sess_a") == wire(APPROVAL)


async def test_a_signal_published_after_subscribing_is_received(redis_client: Redis, bus: RedisSignalBus) -> None:
    async with bus.subscribe("sess_a") as subscription:
        # Subscribed means the bus's one pattern subscription is confirmed by the server: nothing
        # published from here on is missed. The wait itself subscribes to nothing.
        assert await pattern_subscriptions(redis_client) == 1
        assert await subscriber_counts(redis_client, "sess_a") == [0]

        assert await bus.publish("sess_a", APPROVAL) in receivers(redis_client, 1)

        assert await asyncio.wait_for(subscription.next_message(), WAIT_SECONDS) == wire(APPROVAL)
        assert await bus.latest("sess_a") == wire(APPROVAL)


async def test_a_foreign_publisher_is_received_byte_for_byte(redis_client: Redis, bus: RedisSignalBus) -> None:
    async with bus.subscribe("sess_a") as subscription:
        await redis_client.publish("hitl:channel:sess_a", b"\xff not json")

        assert await asyncio.wait_for(subscription.next_message(), WAIT_SECONDS) == b"\xff not json"


async def test_waits_on_different_sessions_only_see_their_own_signals(bus: RedisSignalBus) -> None:
    async with bus.subscribe("sess_a") as on_a, bus.subscribe("sess_b") as on_b:
        await bus.publish("sess_b", REJECTION)
        await bus.publish("sess_a", APPROVAL)

        assert await asyncio.wait_for(on_a.next_message(), WAIT_SECONDS) == wire(APPROVAL)
        assert await asyncio.wait_for(on_b.next_message(), WAIT_SECONDS) == wire(REJECTION)


async def test_two_waits_on_one_session_both_hear_it_until_each_leaves(
    redis_client: Redis, bus: RedisSignalBus
) -> None:
    async with bus.subscribe("sess_a") as first:
        async with bus.subscribe("sess_a") as second:
            assert bus.live_channels() == 1
            assert await pattern_subscriptions(redis_client) == 1

            assert await bus.publish("sess_a", APPROVAL) in receivers(redis_client, 1)

            assert await asyncio.wait_for(first.next_message(), WAIT_SECONDS) == wire(APPROVAL)
            assert await asyncio.wait_for(second.next_message(), WAIT_SECONDS) == wire(APPROVAL)

        assert bus.live_channels() == 1
        # its waits are a list: an empty set alone is 216 bytes, held by every parked run
        assert bus._channels[b"hitl:channel:sess_a"].subscribers == [first]  # type: ignore[comparison-overlap]
        await bus.publish("sess_a", REJECTION)
        assert await asyncio.wait_for(first.next_message(), WAIT_SECONDS) == wire(REJECTION)

    assert bus.live_channels() == 0
    assert await pattern_subscriptions(redis_client) == 1  # the pattern stays for the next wait
    assert bus._channels == {}  # the bus keeps no entry of the session, not even an empty one


async def test_leaving_a_wait_never_waits_for_the_server(redis_client: Redis, bus: RedisSignalBus) -> None:
    # A decided run leaves its wait and goes on: leaving sends nothing (the bus's pattern
    # subscription stays for the next wait).
    wait = bus.subscribe("sess_a")
    await wait.__aenter__()
    leaving = cast(Coroutine[Any, Any, Any], wait.__aexit__(None, None, None))
    with pytest.raises(StopIteration):  # finished at the first step, without suspending
        leaving.send(None)
    assert bus.live_channels() == 0
    assert await pattern_subscriptions(redis_client) == 1
    assert bus._channels == {}  # nothing of the wait left in the bus


async def test_a_wait_that_fails_releases_its_channel(redis_client: Redis, bus: RedisSignalBus) -> None:
    with pytest.raises(LookupError, match="boom"):
        async with bus.subscribe("sess_a"):
            raise LookupError("boom")

    assert bus.live_channels() == 0
    assert bus._channels == {}  # nothing of the wait left in the bus
    assert await pattern_subscriptions(redis_client) == 1  # the pattern stays for the next wait


async def test_a_session_can_be_waited_on_again_after_its_channel_was_released(
    redis_client: Redis, bus: RedisSignalBus
) -> None:
    async with bus.subscribe("sess_a"):
        pass

    async with bus.subscribe("sess_a") as again:
        assert bus.live_channels() == 1
        await bus.publish("sess_a", APPROVAL)
        assert await asyncio.wait_for(again.next_message(), WAIT_SECONDS) == wire(APPROVAL)


async def test_500_concurrent_waits_share_one_pattern_subscription_and_leave_no_channel(
    redis_client: Redis, bus: RedisSignalBus, request: pytest.FixtureRequest
) -> None:
    real_server = request.node.callspec.params["redis_client"] == "redis-server"
    finishing = [f"sess_finish_{i}" for i in range(200)]
    abandoned = [f"sess_cancel_{i}" for i in range(200)]
    interrupted = [f"sess_early_{i}" for i in range(100)]
    subscribed = 0
    all_subscribed = asyncio.Event()
    finish = asyncio.Event()

    async def wait(session: str) -> str | bytes | None:
        nonlocal subscribed
        async with bus.subscribe(session) as subscription:
            subscribed += 1
            if subscribed == len(finishing) + len(abandoned):
                all_subscribed.set()
            if session.startswith("sess_finish"):
                await finish.wait()
                return None
            return await subscription.next_message()

    waits = {session: asyncio.create_task(wait(session)) for session in finishing + abandoned}
    await asyncio.wait_for(all_subscribed.wait(), 60)
    # A third group is cancelled while subscribing: one loop turn puts each of them inside
    # subscribe(), before the server could possibly have confirmed.
    early = [asyncio.create_task(wait(session)) for session in interrupted]
    await asyncio.sleep(0)
    for task in early:
        task.cancel()

    assert bus.live_channels() >= len(finishing) + len(abandoned)
    assert await pattern_subscriptions(redis_client) == 1
    assert await subscribed_channels(redis_client, "hitl:channel:*") == []
    if real_server:
        assert await pubsub_connections(redis_client) == 1
        assert await signal_bus_connections(redis_client) == 1
    await bus.publish(abandoned[0], APPROVAL)
    assert await asyncio.wait_for(waits[abandoned[0]], WAIT_SECONDS) == wire(APPROVAL)

    for session in abandoned[1:]:
        waits[session].cancel()
    finish.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*waits.values(), *early, return_exceptions=True), 60)

    assert sum(isinstance(outcome, asyncio.CancelledError) for outcome in outcomes) == 199 + 100
    assert bus.live_channels() == 0
    assert bus._channels == {}  # no entry left by 500 waits that finished, were cancelled or never started
    assert await pattern_subscriptions(redis_client) == 1  # kept for the next wait
    if real_server:
        assert await pubsub_connections(redis_client) == 1
        assert await signal_bus_connections(redis_client) == 1


async def publish_through_one_node(client: Redis, session: str, signal: Signal) -> None:
    """PUBLISH on the server, or always on the same node of a cluster: messages that entered
    through different nodes may reach the subscriber's node in either order."""
    if isinstance(client, RedisCluster):
        await client.execute_command("PUBLISH", f"hitl:channel:{session}", wire(signal),
                                     target_nodes=client.get_primaries()[0])
    else:
        await client.publish(f"hitl:channel:{session}", wire(signal))


async def test_a_wait_that_never_reads_keeps_only_the_newest_signals(redis_client: Redis) -> None:
    bus = RedisSignalBus(redis_client, queue_size=2)
    try:
        async with bus.subscribe("sess_slow") as slow, bus.subscribe("sess_marker") as marker:
            signals = [Signal.approval(f"req_{i}", "u1", i) for i in range(3)]
            for signal in signals:
                await publish_through_one_node(redis_client, "sess_slow", signal)
            await publish_through_one_node(redis_client, "sess_marker", APPROVAL)
            # One connection, one reader, in order: once the marker is here, so are all three.
            assert await asyncio.wait_for(marker.next_message(), WAIT_SECONDS) == wire(APPROVAL)

            assert await slow.next_message() == wire(signals[1])
            assert await slow.next_message() == wire(signals[2])
    finally:
        await bus.close()


async def test_close_ends_open_waits_and_refuses_new_ones(redis_client: Redis) -> None:
    bus = RedisSignalBus(redis_client)
    async with bus.subscribe("sess_a") as subscription:
        pending = asyncio.create_task(subscription.next_message())
        await bus.close()

        with pytest.raises(SignalBusClosed):
            await asyncio.wait_for(pending, WAIT_SECONDS)
        with pytest.raises(SignalBusClosed):
            await subscription.next_message()

    with pytest.raises(SignalBusClosed):
        async with bus.subscribe("sess_b"):
            pass


# -- connection loss: real server only -----------------------------------------------------------


class _Link:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.blackholed = False

    def close(self) -> None:
        self.client.close()
        self.upstream.close()


class RedisProxy:
    """A TCP relay in front of the test server that a test can break on purpose: refuse new
    connections (an outage) or silently swallow the traffic of the open ones (a half-open link)."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._refusing = False
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def refuse_new_connections(self, refuse: bool) -> None:
        self._refusing = refuse

    def blackhole_open_connections(self) -> None:
        for link in self._links:
            link.blackholed = True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            client_writer.close()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            client_writer.close()
            return
        link = _Link(client_writer, upstream_writer)
        self._links.add(link)
        try:
            await asyncio.gather(
                self._relay(client_reader, upstream_writer, link),
                self._relay(upstream_reader, client_writer, link),
            )
        finally:
            self._links.discard(link)
            link.close()

    @staticmethod
    async def _relay(source: asyncio.StreamReader, target: asyncio.StreamWriter, link: _Link) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if link.blackholed:
                    continue
                target.write(data)
                await target.drain()
        target.close()


@pytest.fixture
async def redis_proxy(redis_server_port: int) -> AsyncIterator[RedisProxy]:
    proxy = RedisProxy(redis_server_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.mark.redis_server
async def test_a_wait_survives_its_pubsub_connection_being_killed(real_redis: Redis) -> None:
    bus = RedisSignalBus(real_redis, reconnect_initial_delay_seconds=0.01)
    try:
        async with bus.subscribe("sess_a") as subscription:
            assert await real_redis.client_kill_filter(_type="pubsub") == 1

            # Whether the reader has resubscribed yet or not, the signal arrives: live, or
            # re-read from hitl:signal after the resubscription.
            await bus.publish("sess_a", APPROVAL)

            assert await asyncio.wait_for(subscription.next_message(), WAIT_SECONDS) == wire(APPROVAL)
            assert bus.live_channels() == 1
        await bus.settled()
        assert await real_redis.pubsub_channels("hitl:channel:*") == []
        assert await signal_bus_connections(real_redis) == 1
    finally:
        await bus.close()


@pytest.fixture
async def proxied_bus(redis_proxy: RedisProxy) -> AsyncIterator[RedisSignalBus]:
    client = client_of(redis_proxy.url)
    bus = RedisSignalBus(client, reconnect_initial_delay_seconds=0.01, reconnect_max_delay_seconds=0.05)
    try:
        yield bus
    finally:
        await bus.close()
        await client.aclose()


@pytest.mark.redis_server
async def test_a_signal_published_while_the_connection_is_down_is_delivered_after_reconnecting(
    real_redis: Redis, redis_proxy: RedisProxy, proxied_bus: RedisSignalBus
) -> None:
    async with proxied_bus.subscribe("sess_a") as subscription, proxied_bus.subscribe("sess_b") as other:
        redis_proxy.refuse_new_connections(True)
        assert await real_redis.client_kill_filter(_type="pubsub") == 1

        # Nobody listens now, so only the stored copy can bring it to the waiter.
        assert await RedisSignalBus(real_redis).publish("sess_a", APPROVAL) == 0
        redis_proxy.refuse_new_connections(False)

        assert await asyncio.wait_for(subscription.next_message(), WAIT_SECONDS) == wire(APPROVAL)
        # And the pattern is subscribed again (the stored signals are re-read once it is).
        assert await pattern_subscriptions(real_redis) == 1
        assert await RedisSignalBus(real_redis).publish("sess_b", REJECTION) == 1
        assert await asyncio.wait_for(other.next_message(), WAIT_SECONDS) == wire(REJECTION)


@pytest.mark.redis_server
async def test_a_silently_dead_connection_is_detected_by_ping_and_replaced(
    real_redis: Redis, redis_proxy: RedisProxy
) -> None:
    client = client_of(redis_proxy.url)
    bus = RedisSignalBus(client, idle_ping_seconds=0.1, reconnect_initial_delay_seconds=0.01)
    try:
        async with bus.subscribe("sess_a") as subscription:
            redis_proxy.blackhole_open_connections()

            # The server still counts the old subscriber, but nothing reaches it any more.
            assert await RedisSignalBus(real_redis).publish("sess_a", APPROVAL) == 1

            assert await asyncio.wait_for(subscription.next_message(), WAIT_SECONDS) == wire(APPROVAL)
    finally:
        await bus.close()
        await client.aclose()
