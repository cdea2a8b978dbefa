"""Threads belong to tenant + user, only threads the client named are remembered, and run
starts are rate-limited per user: through the HTTP API on the in-process Redis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quart import Quart
from redis.asyncio import Redis

from app.container import Container
from app.factory import create_app
from tests.support import bearer, events_of, parse_sse

STREAM = "/aura/test/stream"


async def run(app: Quart, body: dict[str, Any], headers: dict[str, str]) -> list[dict[str, Any]]:
    response = await app.test_client().post(STREAM, json=body, headers=headers)
    assert response.status_code == 200, await response.get_data(as_text=True)
    return events_of(parse_sse(await response.get_data(as_text=True)))


async def thread_keys(container: Container) -> list[str]:
    return sorted(key.decode() for key in await container.redis().keys("aura:thread*"))


async def test_a_run_without_a_thread_id_keeps_no_history(app: Quart, container: Container) -> None:
    events = await run(app, {"prompt": "x" * 20_000}, bearer())

    assert events[-1]["data"]["status"] == "completed"
    assert await thread_keys(container) == []


async def test_a_thread_squatted_by_another_tenant_or_user_stays_the_owners(app: Quart, container: Container) -> None:
    # Others use alice's thread id first (today's first-come owner record locked her out for 7 days).
    await run(app, {"prompt": "squat", "thread_id": "thr-alice"}, bearer("mallory", "globex"))
    await run(app, {"prompt": "squat too", "thread_id": "thr-alice"}, bearer("bob"))

    first = await run(app, {"prompt": "first question", "thread_id": "thr-alice"}, bearer())
    second = await run(app, {"prompt": "second question", "thread_id": "thr-alice"}, bearer())

    assert first[-1]["data"]["status"] == second[-1]["data"]["status"] == "completed"
    assert {e["threadId"] for e in first + second} == {"thr-alice"}
    redis: Redis = container.redis()
    mine = [t for t in await redis.lrange("aura:thread:{acme:alice}:thr-alice:turns", 0, -1)]  # type: ignore[misc]
    assert [b"first question" in t for t in mine] == [True, False]
    assert [b"second question" in t for t in mine] == [False, True]
    assert await thread_keys(container) == [
        "aura:thread:{acme:alice}:thr-alice:turns", "aura:thread:{acme:bob}:thr-alice:turns",
        "aura:thread:{globex:mallory}:thr-alice:turns", "aura:threads:{acme:alice}:bytes",
        "aura:threads:{acme:bob}:bytes", "aura:threads:{globex:mallory}:bytes"]


async def test_run_starts_beyond_the_rate_limit_get_429_with_retry_after(
        make_settings: Callable[..., Any]) -> None:
    app = create_app(make_settings(runs={"max_starts_per_window": 3, "start_window_seconds": 3600}))
    async with app.test_app():
        client = app.test_client()
        for _ in range(3):
            response = await client.post(STREAM, json={"prompt": "hi"}, headers=bearer())
            assert response.status_code == 200
            await response.get_data()

        refused = await client.post(STREAM, json={"prompt": "hi"}, headers=bearer())
        other_user = await client.post(STREAM, json={"prompt": "hi"}, headers=bearer("bob"))

        assert refused.status_code == 429
        problem = await refused.get_json()
        assert problem["code"] == "too_many_run_starts"
        assert 1 <= int(refused.headers["Retry-After"]) <= 3600
        assert other_user.status_code == 200
