"""Readiness of Redis: a PING bounded by a timeout, reported as a short reason, never raised."""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from domain.model.ports import HealthProbe

_log = logging.getLogger(__name__)


class RedisHealthProbe(HealthProbe):
    def __init__(self, redis: Redis, timeout_seconds: float = 1.0) -> None:
        self._redis = redis
        self._timeout_seconds = timeout_seconds

    async def check(self) -> str | None:
        try:
            # The client's own retries could outlast a readiness check; the timeout bounds them.
            async with asyncio.timeout(self._timeout_seconds):
                await self._redis.ping()
        except (TimeoutError, RedisTimeoutError):
            return "redis timed out"
        except Exception as exc:  # a probe reports, it never raises
            _log.debug("redis health check failed: %r", exc)
            return "redis unreachable"
        return None
