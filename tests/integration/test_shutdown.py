"""After the app shuts down, nothing the container opened is left open: no connection on the real
Redis server, no open HTTP client, no background task."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.container import Container
from app.factory import create_app
from app.settings import Settings
from tests.redis_server import RedisServer
from tests.support import SECRET, bearer, events_of, make_repo, parse_sse

pytestmark = pytest.mark.redis_server


async def connections(redis: Redis) -> set[str]:
    """The ids of the clients connected to the server, the asking one included."""
    listed = await redis.client_list()
    return {str(client["id"]) for client in listed}


def aura_tasks() -> set[asyncio.Task[object]]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}


async def test_shutdown_closes_every_redis_connection_the_http_client_and_every_task(
        redis_server: RedisServer, real_redis: Redis, tmp_path: Path) -> None:
    make_repo(tmp_path / "workspace" / "repo")
    settings = Settings(auth={"jwt_secret": SECRET}, redis={"url": redis_server.url},
                        tools={"workspace_root": str(tmp_path / "workspace")})
    container = Container(settings=settings)
    app = create_app(settings, container)
    before = await connections(real_redis)
    tasks_before = aura_tasks()

    async with app.test_app():
        client = app.test_client()
        response = await client.post("/aura/test/stream", json={"prompt": "hello"}, headers=bearer())
        events = events_of(parse_sse(await response.get_data(as_text=True)))
        assert events[-1]["type"] == "end"
        assert (await client.get("/ready")).status_code == 200
        # the run, its event log, the signal bus and the run control hold connections of their own
        assert len(await connections(real_redis) - before) >= 2
        http_client = container.http_client()
        assert not http_client.is_closed

    assert await connections(real_redis) - before == set()  # other tests' clients may close meanwhile
    assert http_client.is_closed
    await asyncio.sleep(0)  # a cancelled task is done once the loop ran it
    assert {task.get_name() for task in aura_tasks() - tasks_before if not task.done()} == set()


async def test_shutdown_closes_what_was_built_after_start_up_too(redis_server: RedisServer, real_redis: Redis,
                                                                  tmp_path: Path) -> None:
    settings = Settings(auth={"jwt_secret": SECRET}, redis={"url": redis_server.url},
                        tools={"workspace_root": str(tmp_path)})
    container = Container(settings=settings)
    app = create_app(settings, container)
    before = await connections(real_redis)

    async with app.test_app():
        assert (await app.test_client().get("/ready")).status_code == 200  # the health probe's Redis

    assert await connections(real_redis) - before == set()  # other tests' clients may close meanwhile
