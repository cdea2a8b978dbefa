"""Counting the round trips an adapter makes: every command a client sends, in order."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from adapters.redis.client import SharedConnection


class CommandLog:
    """Records every command the client sends (one entry per round trip; a pipeline is one entry,
    PIPELINE, however many commands it carries). Connections the client does not send through
    (the signal bus's own Pub/Sub connection) are not seen, unless they are shared connections given
    here: each caller's commands sent through it are one entry, BATCH."""

    def __init__(self, client: Redis, *dedicated: SharedConnection) -> None:
        self.commands: list[str] = []
        for connection in dedicated:
            self._record_batches(connection)
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

    def _record_batches(self, connection: SharedConnection) -> None:
        execute = connection.execute

        async def recorded(packed: bytes, replies: int) -> list[Any]:
            self.commands.append("BATCH")
            return await execute(packed, replies)

        connection.execute = recorded  # type: ignore[method-assign]

    def take(self) -> list[str]:
        taken, self.commands = self.commands, []
        return taken
