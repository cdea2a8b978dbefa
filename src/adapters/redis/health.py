"""Readiness of Redis: whether the store can take a write now, reported as a short reason, never
raised, and bounded by a timeout (the client's own retries could outlast a readiness check).

`store_problem` runs `WRITE_CHECKS` in order and reports the first problem; each check is a small
function of the client: under Sentinel, that a sentinel names a master; the cluster state; that the
server is a master (`ROLE`: a replica or a demoted master answers PING but takes no write); a real
write; a two-key script of one hash tag. When writes must be confirmed by replicas (`WAIT`), the
probe adds a check that the master has that many replicas connected (`write_checks`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import RedisCluster
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters.redis.client import RedisClient, is_cluster
from adapters.redis.sentinel import current_master
from domain.model.ports import HealthProbe

_log = logging.getLogger(__name__)

PROBE_KEY = "aura:ready:probe"
PROBE_TTL_MS = 10_000

WriteCheck = Callable[[RedisClient], Awaitable[str | None]]


async def cluster_mode_matches(redis: RedisClient) -> str | None:
    """A cluster is reached through a cluster client and every primary says the cluster is ok; a
    single-server URL pointed at a cluster node would refuse most of a run's keys (MOVED)."""
    if isinstance(redis, RedisCluster):
        states = await redis.cluster_info(target_nodes=RedisCluster.PRIMARIES)
        for node, info in (states.items() if isinstance(states, dict) and "cluster_state" not in states
                           else [("", states)]):
            state = info.get("cluster_state") if isinstance(info, dict) else None
            if state not in ("ok", b"ok"):
                return f"redis cluster state is {_text(state)} at {node}".rstrip(" at")
        return None
    try:
        info = await redis.info("cluster")
    except ResponseError:  # a server without the section (the in-process one) is no cluster node
        return None
    if info.get("cluster_enabled") in (1, "1", b"1"):
        return "redis is a cluster node: use a redis+cluster:// URL"
    return None


async def sentinel_names_master(redis: RedisClient) -> str | None:
    """Under Sentinel, a sentinel names the service's master (asks nobody for another client)."""
    try:
        await current_master(redis)
    except MasterNotFoundError:
        return "redis master unknown: no sentinel names one"
    return None


async def _role(redis: RedisClient) -> list[object] | None:
    """`ROLE`'s reply; None where there is no one server to ask (a cluster: its state check covers
    its nodes) or no `ROLE` (the in-process Redis of the embedded mode)."""
    if isinstance(redis, RedisCluster):
        return None
    try:
        role = await redis.execute_command("ROLE")  # type: ignore[no-untyped-call]  # unannotated in redis-py
    except ResponseError as exc:
        if "unknown command" in str(exc).lower():
            return None
        raise
    return list(role)


async def is_master(redis: RedisClient) -> str | None:
    """The server is a master: a replica, or a master Sentinel demoted, answers PING but refuses
    every write."""
    role = await _role(redis)
    if role is not None and role[0] not in (b"master", "master"):
        return f"redis is a {_text(role[0])}, not a master: it takes no writes"
    return None


def has_replicas(required: int) -> WriteCheck:
    """A check that the master has `required` replicas connected: with fewer, every `WAIT` for
    them fails and no event or decision can be acknowledged."""
    async def replicas_connected(redis: RedisClient) -> str | None:
        role = await _role(redis)
        if role is not None and role[0] in (b"master", "master"):
            connected = len(role[2])  # type: ignore[arg-type]  # ROLE's third part lists the replicas
            if connected < required:
                return f"redis master has {connected} of the {required} replica(s) that must confirm writes"
        return None
    return replicas_connected


async def accepts_writes(redis: RedisClient) -> str | None:
    """A real write (a key of its own, expiring): a replica, a READONLY or OOM server, a cluster
    slot without a primary all refuse it."""
    await redis.set(PROBE_KEY, b"1", px=PROBE_TTL_MS)
    return None


# Two keys under one hash tag, written by one script: what every run's atomic step needs. A proxy
# or set-up that refuses scripts or splits one tag over two slots (CROSSSLOT) fails it.
_SCRIPT_PROBE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""
SCRIPT_PROBE_KEYS = ("aura:ready:{probe}:a", "aura:ready:{probe}:b")


async def runs_single_slot_scripts(redis: RedisClient) -> str | None:
    await redis.register_script(_SCRIPT_PROBE)(keys=list(SCRIPT_PROBE_KEYS), args=[b"1", PROBE_TTL_MS])
    return None


WRITE_CHECKS: list[WriteCheck] = [sentinel_names_master, cluster_mode_matches, is_master, accepts_writes,
                                  runs_single_slot_scripts]


def write_checks(required_replicas: int) -> list[WriteCheck]:
    """`WRITE_CHECKS`, with the replica count when writes wait for `required_replicas` (> 0)."""
    if required_replicas <= 0:
        return list(WRITE_CHECKS)
    checks = list(WRITE_CHECKS)
    checks.insert(checks.index(is_master) + 1, has_replicas(required_replicas))
    return checks


async def store_problem(redis: RedisClient, checks: list[WriteCheck] | None = None) -> str | None:
    """The first reason the store cannot take a write now, or None."""
    for check in WRITE_CHECKS if checks is None else checks:
        try:
            problem = await check(redis)
        except (TimeoutError, RedisTimeoutError, RedisConnectionError):
            raise  # not a refusal: the probe reports them as such
        except RedisError as exc:
            _log.debug("redis readiness check %s failed: %r", check.__name__, exc)
            return f"redis refuses writes: {_first_word(exc)}"
        if problem is not None:
            return problem
    return None


class RedisHealthProbe(HealthProbe):
    def __init__(self, redis: RedisClient, *, timeout_seconds: float, required_replicas: int) -> None:
        self._redis = redis
        self._timeout_seconds = timeout_seconds
        self._checks = write_checks(required_replicas)

    async def check(self) -> str | None:
        try:
            async with asyncio.timeout(self._timeout_seconds):
                return await store_problem(self._redis, self._checks)
        except (TimeoutError, RedisTimeoutError):
            return "redis timed out"
        except Exception as exc:  # a probe reports, it never raises
            _log.debug("redis health check failed: %r", exc)
            return "redis unreachable"


def _first_word(error: Exception) -> str:
    words = str(error).split()
    return words[0] if words and words[0].isupper() else type(error).__name__


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["WRITE_CHECKS", "RedisHealthProbe", "WriteCheck", "accepts_writes", "cluster_mode_matches",
           "has_replicas", "is_cluster", "is_master", "runs_single_slot_scripts", "sentinel_names_master",
           "store_problem", "write_checks"]
