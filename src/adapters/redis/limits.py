"""The per-user rate limit on run starts, in Redis so every instance counts the same starts.

A fixed window: `aura:starts:{<tenant>:<user>}:<window>` counts the starts in one window of
`window_seconds` (ids percent-encoded; the user's hash tag). A user may make `limit` starts per window; the refusal
says how long until the next window opens."""

from __future__ import annotations

import math
from collections.abc import Callable

from redis.exceptions import RedisError

from adapters.redis.client import RedisClient, batch
from adapters.redis.keys import user_tag
from domain.model.errors import StoreUnavailable
from domain.model.ports import StartRateLimiter


def starts_key(tenant_id: str, user_id: str, window: int) -> str:
    return f"aura:starts:{user_tag(tenant_id, user_id)}:{window}"


class RedisStartRateLimiter(StartRateLimiter):
    def __init__(self, redis: RedisClient, *, limit: int, window_seconds: int, now: Callable[[], float]) -> None:
        if limit < 1 or window_seconds < 1:
            raise ValueError("limit and window_seconds must be positive")
        self._redis = redis
        self._limit = limit
        self._window = window_seconds
        self._now = now

    async def admit(self, tenant_id: str, user_id: str) -> float | None:
        now = self._now()
        window = int(now // self._window)
        key = starts_key(tenant_id, user_id, window)
        # The key is created with its expiry before it is counted: a crash between the two
        # leaves a key that expires, never one that counts forever.
        pipe = batch(self._redis)
        pipe.set(key, 0, ex=self._window + 1, nx=True)
        pipe.incr(key)
        try:
            _, count = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The run directory is unavailable.") from exc
        if int(count) <= self._limit:
            return None
        return max(1.0, math.ceil((window + 1) * self._window - now))
