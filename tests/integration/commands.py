"""Counting the round trips an adapter makes: every command a client sends, in order."""

from __future__ import annotations

from typing import Any

from adapters.redis.client import RedisClient


class CommandLog:
    """Records every command the client sends (one entry per round trip; a pipeline is one entry,
    PIPELINE, however many commands it carries; a script called through `register_script` is its
    EVALSHA). Connections the client does not send through (the Pub/Sub readers' own
    connections) are not seen."""

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

    def take(self) -> list[str]:
        taken, self.commands = self.commands, []
        return taken
