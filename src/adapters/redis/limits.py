"""The per-user rate limit on run starts, in Redis so every instance counts the same starts.

A fixed window: `aura:starts:{<tenant>:<user>}:<window>` counts the starts in one window of
`window_seconds` (ids percent-encoded; the user's hash tag). A user may make `limit` starts per window; the refusal
says how long until the next window opens."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from adapters.redis.client import RedisClient, batch
from adapters.redis.keys import user_tag
from domain.model.errors import StoreUnavailable
from domain.model.ports import StartRateLimiter


@dataclass(frozen=True, slots=True)
class StartWindow:
    key: str
    ttl_seconds: int
    limit: int
    wait: float  # seconds until the next window opens: what a refusal tells the user


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

    def current_window(self, tenant_id: str, user_id: str) -> StartWindow:
        """The user's counter in the window open now (also counted by the run directory's
        admission script, in the admission's round trip, where the keys may share a script)."""
        now = self._now()
        window = int(now // self._window)
        return StartWindow(key=starts_key(tenant_id, user_id, window), ttl_seconds=self._window + 1,
                           limit=self._limit, wait=max(1.0, math.ceil((window + 1) * self._window - now)))

    async def admit(self, tenant_id: str, user_id: str) -> float | None:
        window = self.current_window(tenant_id, user_id)
        # The key is created with its expiry before it is counted: a crash between the two
        # leaves a key that expires, never one that counts forever.
        pipe = batch(self._redis)
        pipe.set(window.key, 0, ex=window.ttl_seconds, nx=True)
        pipe.incr(window.key)
        try:
            _, count = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The run directory is unavailable.") from exc
        return None if int(count) <= window.limit else window.wait
