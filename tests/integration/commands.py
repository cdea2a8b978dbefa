"""Counting the round trips an adapter makes: every command a client sends, in order."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from adapters.redis.client import SharedConnection, shared_connection


class CommandLog:
    """Records every command the client sends (one entry per round trip; a pipeline is one entry,
    PIPELINE, however many commands it carries). Connections the client does not send through
    (the signal bus's own Pub/Sub connection) are not seen. What a caller sends through the
    client's shared connection is one entry too, named by its first command (XADD for an event-log
    batch, MULTI for a transaction, EVALSHA for a script)."""

    def __init__(self, client: Redis) -> None:
        self.commands: list[str] = []
        self._record_shared(shared_connection(client))
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

    def _record_shared(self, connection: SharedConnection) -> None:
        execute = connection.execute

        async def recorded(packed: bytes, replies: int) -> list[Any]:
            self.commands.append(packed.split(b"\r\n", 3)[2].decode().upper())  # *<n> $<len> <name>
            return await execute(packed, replies)

        connection.execute = recorded  # type: ignore[method-assign]

    def take(self) -> list[str]:
        taken, self.commands = self.commands, []
        return taken
