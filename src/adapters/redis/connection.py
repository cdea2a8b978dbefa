"""The one place Aura reaches past redis-py's documented API: connections whose writes never lose
a cancellation.

redis-py writes every command under `asyncio.wait_for(..., socket_timeout)`. Before Python 3.12,
`wait_for` loses a cancellation that arrives after the write has finished but before the waiting
task resumed (CPython issue 86296): it returns normally, the caller reads the reply and carries on
as if it had never been cancelled. A run cancelled while it stored its approval request then went
on to wait for the approval with nobody watching, and stayed there.

Here the write is bounded by `asyncio.timeout` instead (it never swallows a cancellation; no task
per command): the subclass runs redis-py's own `send_packed_command` with the socket timeout
lifted for the write and puts the same bound around it. Every error is redis-py's, raised the way
redis-py raises it. What this relies on, checked by tests/integration/test_redis_cancellation.py
on a single server and on a cluster: `AbstractConnection.send_packed_command` and its
`socket_timeout` attribute, `ConnectionPool.connection_class`, and for a cluster the
`connection_kwargs` its nodes are built from and `ClusterNode.connection_class`; under Sentinel,
`SentinelManagedConnection.connect`, which asks the sentinels for the master.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import SentinelManagedConnection
from redis.exceptions import TimeoutError as RedisTimeoutError


class _CancellationSafeWrites(AbstractConnection):
    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        if not self.is_connected and isinstance(self, SentinelManagedConnection):
            # redis-py reconnects a dropped connection to the address it had; one that follows a
            # Sentinel group (dropped on a demoted master's READONLY) asks the sentinels first.
            await self.connect()  # type: ignore[no-untyped-call]  # unannotated in redis-py
        timeout = self.socket_timeout
        if not timeout:
            await super().send_packed_command(command, check_health)
            return
        try:
            async with asyncio.timeout(timeout):
                self.socket_timeout = None  # bounded here, not by redis-py's wait_for
                try:
                    await super().send_packed_command(command, check_health)
                finally:
                    self.socket_timeout = timeout
        except TimeoutError:
            # redis-py dropped the connection when the bound cancelled its write.
            raise RedisTimeoutError("Timeout writing to socket") from None


_SAFE: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def cancellation_safe(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """`connection_class` (TCP, TLS or Unix socket) with cancellation-safe writes."""
    if issubclass(connection_class, _CancellationSafeWrites):
        return connection_class
    if connection_class not in _SAFE:
        _SAFE[connection_class] = type(
            f"CancellationSafe{connection_class.__name__}", (_CancellationSafeWrites, connection_class), {})
    return _SAFE[connection_class]


def make_cancellation_safe(client: Redis | RedisCluster) -> None:
    """Every connection `client` opens from now on writes cancellation-safely."""
    if isinstance(client, RedisCluster):
        kwargs = client.connection_kwargs  # what every node the cluster discovers is built from
        kwargs["connection_class"] = cancellation_safe(kwargs.get("connection_class") or _default_class())
        for node in client.startup_nodes:
            node.connection_class = cancellation_safe(node.connection_class)  # type: ignore[assignment]
        return
    pool = client.connection_pool
    pool.connection_class = cancellation_safe(pool.connection_class)


def _default_class() -> type[AbstractConnection]:
    from redis.asyncio.connection import Connection

    return Connection
