"""Conversation memory and the run-start rate limit against fakeredis and a real redis-server."""

from __future__ import annotations

import orjson
import pytest
from redis.asyncio import Redis

from adapters.redis.conversations import CUT_MARKER, RedisConversationStore, fitted, turns_key, usage_key
from adapters.redis.limits import RedisStartRateLimiter
from tests.defaults import THREADS


def turn(number: int, size: int = 10) -> dict[str, object]:
    return {"runId": f"run_{number}", "prompt": "p" * size, "answer": "a" * size, "tools": [], "at": number}


async def test_a_thread_id_names_a_thread_per_tenant_and_user(redis_client: Redis) -> None:
    store = RedisConversationStore(redis_client, **THREADS)

    # Someone in another tenant, and another user of the same tenant, use the id first.
    assert await store.open("globex", "mallory", "thread-1") == []
    assert await store.append("globex", "mallory", "thread-1", turn(1))
    assert await store.append("acme", "bob", "thread-1", turn(2))

    # The owner is not locked out and sees only their own turns; the others only theirs.
    assert await store.open("acme", "alice", "thread-1") == []
    assert await store.append("acme", "alice", "thread-1", turn(3))
    assert [t["runId"] for t in await store.open("acme", "alice", "thread-1")] == ["run_3"]
    assert [t["runId"] for t in await store.open("globex", "mallory", "thread-1")] == ["run_1"]
    assert [t["runId"] for t in await store.open("acme", "bob", "thread-1")] == ["run_2"]


async def test_ids_with_colons_never_share_a_key(redis_client: Redis) -> None:
    store = RedisConversationStore(redis_client, **THREADS)

    await store.append("a:b", "c", "t", turn(1))
    await store.append("a", "b:c", "t", turn(2))
    await store.append("a", "b", "c:t", turn(3))

    assert [t["runId"] for t in await store.open("a:b", "c", "t")] == ["run_1"]
    assert [t["runId"] for t in await store.open("a", "b:c", "t")] == ["run_2"]
    assert [t["runId"] for t in await store.open("a", "b", "c:t")] == ["run_3"]
    assert turns_key("a:b", "c", "t") == "aura:thread:{a%3Ab:c}:t:turns"


async def test_turns_are_trimmed_and_expire(redis_client: Redis) -> None:
    store = RedisConversationStore(redis_client, **(THREADS | {"ttl_seconds": 600, "max_turns": 3}))
    for number in range(5):
        await store.append("acme", "alice", "t", turn(number))

    assert [t["runId"] for t in await store.open("acme", "alice", "t")] == ["run_2", "run_3", "run_4"]
    assert 590 <= await redis_client.ttl(turns_key("acme", "alice", "t")) <= 600
    assert 590 <= await redis_client.ttl(usage_key("acme", "alice")) <= 600
    stored = await redis_client.lrange(turns_key("acme", "alice", "t"), 0, -1)  # type: ignore[misc]
    assert await redis_client.hgetall(usage_key("acme", "alice")) == {b"t": str(sum(map(len, stored))).encode()}


async def test_a_turn_larger_than_the_limit_is_kept_shortened(redis_client: Redis) -> None:
    store = RedisConversationStore(redis_client, **(THREADS | {"max_turn_bytes": 2048}))
    big = {**turn(1, 100_000), "tools": [{"tool": "git_status", "summary": "x" * 5000}]}

    await store.append("acme", "alice", "t", big)

    [kept] = await store.open("acme", "alice", "t")
    assert len(orjson.dumps(kept)) <= 2048
    assert kept["tools"] == []
    assert kept["prompt"].endswith(CUT_MARKER) and kept["prompt"].startswith("ppp")
    assert kept["answer"].endswith(CUT_MARKER) and kept["answer"].startswith("aaa")
    assert kept["runId"] == "run_1"


@pytest.mark.parametrize("text", ["ü" * 50_000, '"\\' * 30_000, "\x01" * 20_000])
def test_shortening_keeps_within_the_limit_whatever_the_text(text: str) -> None:
    packed = fitted({"runId": "r", "prompt": text, "answer": text, "tools": [], "at": 1}, 1024)
    assert len(packed) <= 1024
    assert orjson.loads(packed)["prompt"].endswith(CUT_MARKER)


async def test_one_user_cannot_store_more_than_the_limit(redis_client: Redis) -> None:
    store = RedisConversationStore(redis_client, **(THREADS | {"max_turn_bytes": 4096, "max_user_bytes": 10_000}))
    kept = [await store.append("acme", "alice", f"thread-{n}", turn(n, 1500)) for n in range(6)]

    assert kept == [True, True, True, False, False, False]
    assert await store.open("acme", "alice", "thread-3") == []
    # Other users are not affected; the user's own expired threads free their room.
    assert await store.append("acme", "bob", "thread-0", turn(9, 1500))
    await redis_client.delete(turns_key("acme", "alice", "thread-0"))
    assert await store.append("acme", "alice", "thread-3", turn(3, 1500))
    assert b"thread-0" not in await redis_client.hgetall(usage_key("acme", "alice"))


async def test_run_starts_are_limited_per_user_per_window(redis_client: Redis) -> None:
    now = [1_000_000.0]
    limiter = RedisStartRateLimiter(redis_client, limit=3, window_seconds=60, now=lambda: now[0])

    assert [await limiter.admit("acme", "alice") for _ in range(3)] == [None, None, None]
    assert await limiter.admit("acme", "alice") == 20.0  # the window ends at 1_000_020
    assert await limiter.admit("acme", "bob") is None
    assert await limiter.admit("acme:alice", "x") is None  # no collision through ':'
    now[0] += 20
    assert await limiter.admit("acme", "alice") is None
