"""What one run costs in Redis round trips beyond its events, through the real app on a real
redis-server: its start (the start rate, the admission) and its close, each one round trip."""

from __future__ import annotations

import asyncio
from pathlib import Path

from quart.typing import TestClientProtocol

from app.container import Container
from app.factory import create_app
from app.settings import Settings
from tests.integration.commands import CommandLog
from tests.redis_server import RedisServer
from tests.support import SECRET, bearer, events_of, parse_sse


async def _one_run(client: TestClientProtocol) -> None:
    response = await client.post("/aura/test/stream", headers=bearer(),
                                 json={"prompt": '@answer {"text": "one two three", "chunks": 3}'})
    assert response.status_code == 200
    assert events_of(parse_sse(await response.get_data(as_text=True)))[-1]["type"] == "end"
    # the run's close follows its `end`: its task is done once the run is closed
    await asyncio.gather(*(task for task in asyncio.all_tasks() if task.get_name().startswith("run run_")))


async def test_a_run_starts_in_one_round_trip_and_closes_in_one(redis_server: RedisServer, tmp_path: Path,
                                                                 clean_redis: object) -> None:
    container = Container(settings=Settings(auth={"jwt_secret": SECRET}, tools={"workspace_root": str(tmp_path)},
                                            redis={"url": redis_server.url}))
    app = create_app(container.settings(), container)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        await _one_run(client)  # the scripts are loaded now
        log = CommandLog(container.redis())
        await _one_run(client)
        # the admission's four commands in one write, the close's script in one; the event log's
        # appends go on its own held connection, not counted here
        assert log.take() == ["PACKED ZADD SET SET EVALSHA", "PACKED EVALSHA"]
