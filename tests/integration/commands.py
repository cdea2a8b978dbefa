"""Counting the round trips an adapter makes: every command a client sends, in order."""

from __future__ import annotations

import weakref
from typing import Any

from redis.asyncio import RedisCluster

from adapters.redis.client import RedisClient
from adapters.redis.packed import PackedConnections


class CommandLog:
    """Records every command the client sends (one entry per round trip; a pipeline is one entry,
    PIPELINE, however many commands it carries; a script called through `register_script` is its
    EVALSHA; a write of pre-packed commands through `PackedConnections` is one entry, PACKED and
    the names of the commands it carries, e.g. `PACKED EVALSHA`). Connections the client does not
    send through (the Pub/Sub readers' own connections) and the event log's appends (its own
    held connection, `PackedConnection`) are not seen."""

    def __init__(self, client: RedisClient) -> None:
        self.commands: list[str] = []
        send = client.execute_command
        pipeline = client.pipeline

        async def recorded(*args: Any, **options: Any) -> Any:
            self.commands.append(str(args[0]).upper())
            return await send(*args, **options)

        def recorded_pipeline(*args: Any, **kwargs: Any) -> Any:
            self.commands.append("PIPELINE")
            return pipeline(*args, **kwargs)

        client.execute_command = recorded  # type: ignore[method-assign]
        client.pipeline = recorded_pipeline  # type: ignore[method-assign]
        self._pool = getattr(client, "connection_pool", None)
        _LOGS.add(self)

    def take(self) -> list[str]:
        taken, self.commands = self.commands, []
        return taken


def command_names(packed: bytes) -> list[str]:
    """The name of each command in `packed` (RESP arrays of bulk strings, as `packed.pack` makes)."""
    names, at = [], 0
    while at < len(packed):
        end = packed.index(b"\r\n", at)
        count, at = int(packed[at + 1:end]), end + 2
        for index in range(count):
            end = packed.index(b"\r\n", at)
            length, at = int(packed[at + 1:end]), end + 2
            if index == 0:
                names.append(packed[at:at + length].decode().upper())
            at += length + 2
    return names


_LOGS: weakref.WeakSet[CommandLog] = weakref.WeakSet()
_execute = PackedConnections.execute


async def _recorded_execute(self: PackedConnections, packed: bytes, replies: int) -> list[Any]:
    for log in list(_LOGS):
        if log._pool is self._pool:
            log.commands.append(" ".join(["PACKED", *command_names(packed)]))
    return await _execute(self, packed, replies)


# Once for the whole test process: every `PackedConnections` write is offered to the live logs.
PackedConnections.execute = _recorded_execute  # type: ignore[method-assign]


def packed(client: object, names: str, cluster: str | None = None) -> str:
    """A write `PackedConnections` sends on one server, as `CommandLog` records it (`PACKED <names>`);
    on a cluster, where the same step uses redis-py, `cluster` (by default `names`: one command)."""
    if isinstance(client, RedisCluster):
        return names if cluster is None else cluster
    return f"PACKED {names}"
