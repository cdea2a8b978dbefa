"""Readiness of Redis: can the store take a write now? Reported as a short reason, never raised.

A PING is not enough: a replica, a demoted master (READONLY), a master without the replicas its
writes must reach, or a Sentinel group that names no master all answer PING while every run
would fail. `write_refusal` asks what a write needs, in one round trip (plus one to a sentinel
under Sentinel): the master the sentinels name, `ROLE` (a master, with enough replicas connected
to confirm writes), and a real write (`SET aura:ready ... PX`), which also meets whatever else
refuses writes (`min-replicas-to-write` not met, out of memory). It is a list of checks of the
replies, so a deployment kind with its own failure modes (Redis Cluster) adds its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters.redis.sentinel import current_master
from domain.model.ports import HealthProbe

_log = logging.getLogger(__name__)

PROBE_KEY = "aura:ready"
PROBE_TTL_MS = 10_000

# A check of the replies to `ROLE` and to the probe write (each a value or the error it is): the
# reason the store cannot take a write, or None.
ReplyCheck = Callable[[Any, Any, int], str | None]


def _role(role: Any, _write: Any, required_replicas: int) -> str | None:
    if isinstance(role, ResponseError):
        # Only the in-process fake (dev) lacks ROLE; the write below still judges it.
        return None if "unknown command" in str(role).lower() else f"redis refuses ROLE: {_first_word(role)}"
    kind = role[0]
    if kind != b"master":
        return f"redis is a {kind.decode('utf-8', 'replace')}, not a master: it takes no writes"
    connected = len(role[2])
    if connected < required_replicas:
        return f"redis master has {connected} of the {required_replicas} replica(s) that must confirm writes"
    return None


def _write(_role: Any, write: Any, _required_replicas: int) -> str | None:
    if isinstance(write, Exception):
        return f"redis refuses writes ({_first_word(write)})"
    return None


WRITE_CHECKS: tuple[ReplyCheck, ...] = (_role, _write)


def _first_word(error: Exception) -> str:
    """READONLY, NOREPLICAS, OOM, CLUSTERDOWN...: the error code, not the server's whole sentence."""
    text = str(error).split(" ", 1)[0]
    return text or type(error).__name__


async def write_refusal(redis: Redis, *, required_replicas: int = 0,
                        checks: Sequence[ReplyCheck] = WRITE_CHECKS) -> str | None:
    """Why `redis` cannot take a write now, or None when it can. Raises what the client raises
    for an unreachable server (ConnectionError, TimeoutError)."""
    try:
        await current_master(redis)
    except MasterNotFoundError:
        return "redis master unknown: no sentinel names one"
    pipe = redis.pipeline(transaction=False)
    pipe.execute_command("ROLE")
    pipe.set(PROBE_KEY, b"1", px=PROBE_TTL_MS)
    role, write = await pipe.execute(raise_on_error=False)
    for error in (role, write):
        if isinstance(error, RedisConnectionError | RedisTimeoutError):
            raise error
    for check in checks:
        reason = check(role, write, required_replicas)
        if reason is not None:
            return reason
    return None


class RedisHealthProbe(HealthProbe):
    def __init__(self, redis: Redis, timeout_seconds: float = 1.0, *, required_replicas: int = 0) -> None:
        self._redis = redis
        self._timeout_seconds = timeout_seconds
        self._required_replicas = required_replicas

    async def check(self) -> str | None:
        try:
            # The client's own retries could outlast a readiness check; the timeout bounds them.
            async with asyncio.timeout(self._timeout_seconds):
                return await write_refusal(self._redis, required_replicas=self._required_replicas)
        except (TimeoutError, RedisTimeoutError):
            return "redis timed out"
        except Exception as exc:  # a probe reports, it never raises
            _log.debug("redis health check failed: %r", exc)
            return "redis unreachable"
