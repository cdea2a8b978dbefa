"""After the app shuts down, nothing the container opened is left open: no connection on the real
Redis server, no open HTTP client, no background task."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from dependency_injector import providers
from redis.asyncio import Redis

from adapters.models.openai_compatible import OpenAICompatibleChatModel
from adapters.redis.runs import RedisRunControl
from app.container import Container
from app.factory import create_app
from app.settings import Settings
from tests.redis_server import RedisServer
from tests.support import SECRET, bearer, events_of, make_repo, parse_sse


async def connections(redis: Redis) -> set[str]:
    """The ids of the clients connected to the server, the asking one included."""
    listed = await redis.client_list()
    return {str(client["id"]) for client in listed}


def aura_tasks() -> set[asyncio.Task[object]]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}


@pytest.mark.redis_server
async def test_shutdown_closes_every_redis_connection_and_every_task(
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

    assert await connections(real_redis) - before == set()  # other tests' clients may close meanwhile
    await asyncio.sleep(0)  # a cancelled task is done once the loop ran it
    assert {task.get_name() for task in aura_tasks() - tasks_before if not task.done()} == set()


@pytest.mark.redis_server
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


async def test_shutdown_closes_the_model_servers_http_client(tmp_path: Path) -> None:
    settings = Settings(auth={"jwt_secret": SECRET}, tools={"workspace_root": str(tmp_path)},
                        model={"provider": "openai", "base_url": "http://127.0.0.1:9/v1"})  # never called here
    container = Container(settings=settings)
    app = create_app(settings, container)

    async with app.test_app():
        model = container.model()  # built at start-up, with the run service
        assert isinstance(model, OpenAICompatibleChatModel)
        http_client = container.http_client()  # the one client the model and its profile share
        assert not http_client.is_closed

    assert http_client.is_closed


def test_the_offline_model_opens_no_http_client(tmp_path: Path) -> None:
    settings = Settings(auth={"jwt_secret": SECRET}, tools={"workspace_root": str(tmp_path)})
    container = Container(settings=settings)
    made: list[object] = []
    container.http_client.override(providers.Callable(lambda: made.append("client")))

    container.model()
    container.model_profile()

    assert made == []


@pytest.mark.parametrize("turns", range(12))
async def test_the_run_control_stops_listening_whenever_it_is_closed(redis_client: Redis, turns: int) -> None:
    # Closed 1 to 9 loop turns after it started listening, the in-process Redis swallowed the
    # listener's cancel (CPython issue 86296) and the shutdown waited forever.
    control = RedisRunControl(redis_client, "instance-a")
    control.listen(lambda run_id, reason: None)
    for _ in range(turns):
        await asyncio.sleep(0)

    async with asyncio.timeout(2):
        await control.aclose()
