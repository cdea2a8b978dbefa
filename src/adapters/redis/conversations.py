"""Conversation memory in Redis: a bounded list of turns per tenant, user and thread.

Keys (Aura's own): `aura:thread:{threadId}:owner` = "<tenant>\\n<user>" (who may use the thread id)
and `aura:thread:{tenant}:{user}:{threadId}:turns`, a list of JSON turns trimmed to the newest
`max_turns`; both expire `ttl_seconds` after the last turn."""

from __future__ import annotations

from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from adapters.redis.client import arg, pack, shared_connection
from domain.errors import NotFound, StoreUnavailable
from domain.ports import ConversationStore


def owner_key(thread_id: str) -> str:
    return f"aura:thread:{thread_id}:owner"


def turns_key(tenant_id: str, user_id: str, thread_id: str) -> str:
    return f"aura:thread:{tenant_id}:{user_id}:{thread_id}:turns"


class RedisConversationStore(ConversationStore):
    def __init__(self, redis: Redis, *, ttl_seconds: int = 7 * 86_400, max_turns: int = 20) -> None:
        self._redis = redis
        self._shared = shared_connection(redis)  # the append is on every run's path
        self._ttl = ttl_seconds
        self._max_turns = max_turns

    async def open(self, tenant_id: str, user_id: str, thread_id: str) -> list[dict[str, Any]]:
        owner = f"{tenant_id}\n{user_id}".encode()
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.set(owner_key(thread_id), owner, nx=True, ex=self._ttl)
            pipe.get(owner_key(thread_id))
            pipe.lrange(turns_key(tenant_id, user_id, thread_id), 0, -1)
            _, current, turns = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("Conversation memory is unavailable.") from exc
        if current != owner:
            # Someone else's thread: answer exactly as for a thread that does not exist.
            raise NotFound("No such thread.", code="thread_not_found")
        return [cast(dict[str, Any], orjson.loads(turn)) for turn in turns]

    async def append(self, tenant_id: str, user_id: str, thread_id: str, turn: dict[str, Any]) -> None:
        key = turns_key(tenant_id, user_id, thread_id).encode()
        ttl = arg(self._ttl)
        try:
            await self._shared.transaction(
                pack(b"RPUSH", key, orjson.dumps(turn)),
                pack(b"LTRIM", key, arg(-self._max_turns), b"-1"),
                pack(b"EXPIRE", key, ttl),
                pack(b"EXPIRE", owner_key(thread_id).encode(), ttl))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("Conversation memory is unavailable.") from exc
