"""The one place that builds Redis clients for every Redis adapter, and the few helpers they share.

The URL alone chooses the topology (`parse_redis_url`):
- `redis://`, `rediss://` (TLS), `unix://`: one server;
- `redis+cluster://host:port[,host:port…]`, `rediss+cluster://…` (TLS): a Redis Cluster, from
  its seed nodes; redis-py's `RedisCluster` follows the slot map, redirections and failovers;
- `redis+sentinel://host:port[,host:port…]/<service-name>[/db]`, `rediss+sentinel://…` (TLS): the
  master a Sentinel group names (sentinel.py: the URL's details and the client that follows
  failovers).

Storage format: every client built here returns **bytes** (`decode_responses=False`). Values
Aura writes are UTF-8 JSON encoded by Aura itself, so the stored bytes are exactly what the DWP
backend reads; raw bytes also mean a foreign, non-UTF-8 payload on a channel can never crash a
reader — the domain's parsers accept `str | bytes` and refuse what they cannot read. The clients
speak RESP2, which every Redis deployment and proxy in the DWP understands.

The embedded mode's in-process Redis (fakeredis) is chosen by the composition root, not here.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, ClusterDownError, NoScriptError, RedisError, TryAgainError
from redis.typing import ScriptTextT
from redis.utils import HIREDIS_AVAILABLE

from adapters.redis.connection import make_cancellation_safe
from adapters.redis.sentinel import SENTINEL_SCHEMES, SentinelAddress, create_sentinel_redis, parse_sentinel_url
from adapters.redis.topology import attach_slot_map, cluster_dispatcher

_log = logging.getLogger(__name__)

RedisClient = Redis | RedisCluster
"""A client of one server or of a cluster: the adapters use only what both offer."""

RESP_PROTOCOL = 2
DEFAULT_SOCKET_TIMEOUT_SECONDS = 5.0
DEFAULT_CONNECT_TIMEOUT_SECONDS = 2.0
DEFAULT_HEALTH_CHECK_INTERVAL_SECONDS = 30
# A command that hits a dropped connection or a timeout is retried this often (jittered
# backoff) before the error reaches the caller; the approval writes are compare-and-set.
DEFAULT_COMMAND_RETRIES = 2

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
# How long a batch waits before it sends again the calls a cluster node refused with CLUSTERDOWN
# (redis-py's own pause for a command that failed so).
CLUSTER_DOWN_PAUSE_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where Aura's Redis is: one server (`url`, as redis-py reads it), a cluster (`nodes`) or the
    master of a Sentinel group (`sentinel`)."""

    topology: Literal["single", "cluster", "sentinel"]
    url: str | None = None
    sentinel: SentinelAddress | None = None
    nodes: tuple[tuple[str, int], ...] = ()
    tls: bool = False
    username: str | None = None
    password: str | None = None


def parse_redis_url(url: str) -> RedisTarget:
    """The topology and address an `AURA_REDIS__URL` names; a `ValueError` saying what is wrong
    otherwise. One branch per scheme family, so a new one (Sentinel) is one more branch."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        raise ValueError(f"not a Redis URL (no scheme): {_redacted(url)}")
    scheme = scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget("single", url=url)
    if scheme in CLUSTER_SCHEMES:
        return _cluster_target(rest, tls=CLUSTER_SCHEMES[scheme], url=url)
    if scheme in SENTINEL_SCHEMES:
        address = parse_sentinel_url(url)
        return RedisTarget("sentinel", sentinel=address, tls=address.tls, username=address.username,
                           password=address.password)
    raise ValueError(f"unsupported Redis URL scheme {scheme!r}: use redis://, rediss://, unix://, "
                     f"redis+cluster://, rediss+cluster://, redis+sentinel:// or rediss+sentinel://")


def _cluster_target(rest: str, *, tls: bool, url: str) -> RedisTarget:
    location, _, tail = rest.partition("/")
    if tail.split("?", 1)[0] not in ("", "0") or "?" in rest:
        raise ValueError(f"a cluster URL names seed nodes only (database 0, no options): {_redacted(url)}")
    credentials, at, hosts = location.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
    nodes = []
    for seed in hosts.split(","):
        host, colon, port = seed.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"a cluster seed node must be host:port, got {seed!r}")
        nodes.append((host.strip("[]"), int(port)))
    return RedisTarget("cluster", nodes=tuple(nodes), tls=tls, username=username, password=password)


def _redacted(url: str) -> str:
    scheme, separator, rest = url.partition("://")
    _credentials, at, location = rest.rpartition("@")
    return f"{scheme}{separator}***@{location}" if at else url


def _hiredis_options() -> dict[str, Any]:
    if not HIREDIS_AVAILABLE:
        _log.warning("hiredis is not installed; Redis replies are parsed in pure Python")
    # redis-py picks the hiredis parser by itself when it is installed.
    return {}


def create_redis(
    url: str,
    *,
    socket_timeout_seconds: float = DEFAULT_SOCKET_TIMEOUT_SECONDS,
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
    health_check_interval_seconds: int = DEFAULT_HEALTH_CHECK_INTERVAL_SECONDS,
    max_connections: int,
    pool_timeout_seconds: float,
) -> RedisClient:
    """A client of the Redis `url` names (see `parse_redis_url`); the caller closes it (`aclose`)."""
    target = parse_redis_url(url)
    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), DEFAULT_COMMAND_RETRIES)
    client: RedisClient
    if target.topology == "cluster":
        dispatcher = cluster_dispatcher()
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            username=target.username, password=target.password, ssl=target.tls,
            decode_responses=False, protocol=RESP_PROTOCOL,
            socket_timeout=socket_timeout_seconds, socket_connect_timeout=connect_timeout_seconds,
            socket_keepalive=True, health_check_interval=health_check_interval_seconds,
            max_connections=max_connections, retry=retry, event_dispatcher=dispatcher,
            **_hiredis_options(),
        )
        attach_slot_map(client, dispatcher)
    else:
        # A blocking pool: when every connection is busy a command waits for one (up to the pool
        # timeout) instead of failing at once, which is what redis-py's default pool does past its
        # cap. The benchmark's bursts of new streams and thousands of parked runs hit exactly that.
        options: dict[str, Any] = dict(
            max_connections=max_connections,
            timeout=pool_timeout_seconds,
            decode_responses=False,
            protocol=RESP_PROTOCOL,
            socket_timeout=socket_timeout_seconds,
            socket_connect_timeout=connect_timeout_seconds,
            health_check_interval=health_check_interval_seconds,
            retry=retry,
            **_hiredis_options(),
        )
        if target.topology != "single" or not url.lower().startswith("unix:"):
            options["socket_keepalive"] = True  # TCP only: a unix socket's connection refuses it
        if target.sentinel is not None:
            client = create_sentinel_redis(target.sentinel, options)
        else:
            client = Redis(connection_pool=BlockingConnectionPool.from_url(url, **options))
    make_cancellation_safe(client)
    return client


async def close_redis(redis: RedisClient) -> None:
    """Close `redis` and every connection it opened: a plain client does not own the pool it was
    given, so closing it alone would leave the pool's connections open."""
    if isinstance(redis, RedisCluster):
        await redis.aclose()
        return
    watch = getattr(redis.connection_pool, "master_watch", None)
    if watch is not None:
        await watch.stop()
    await redis.aclose(close_connection_pool=True)
    sentinels = getattr(redis.connection_pool, "sentinel_manager", None)
    if sentinels is not None:  # redis+sentinel://: the clients of the sentinels too
        await sentinels.aclose()


def is_cluster(redis: RedisClient) -> bool:
    return isinstance(redis, RedisCluster)


def batch(redis: RedisClient) -> Pipeline | ClusterPipeline:
    """A pipeline without MULTI: its commands go out in one write per server and run in order on
    each (on a cluster, the servers' parts run side by side: callers order what must be ordered
    by awaiting one batch before the next)."""
    return redis.pipeline(transaction=False)


async def execute_and_publish(redis: RedisClient, pipe: Pipeline | ClusterPipeline, channel: str,
                              message: bytes) -> tuple[list[Any], Any]:
    """`pipe`'s commands, then a classic PUBLISH after them: in the same write on a server; on a
    cluster (where a pipeline takes no PUBLISH, which names no key) as the next command. The
    pipeline's replies (errors as values) and the PUBLISH's reply (its error as a value)."""
    if isinstance(redis, RedisCluster):
        replies = await pipe.execute(raise_on_error=False)
        try:
            published: Any = await redis.publish(channel, message)
        except RedisError as error:
            published = error
        return replies, published
    pipe.publish(channel, message)
    replies = await pipe.execute(raise_on_error=False)
    return replies[:-1], replies[-1]


async def run_batch(redis: RedisClient, calls: Sequence[tuple[AsyncScript, Sequence[Any], Sequence[Any]]]
                    ) -> list[Any]:
    """Each (script, keys, args) by EVALSHA in one pipeline; the replies in order, an error reply
    as its exception (not raised). A script the server does not know yet (a restart, a failover, a
    flushed cache) is loaded and its calls sent again: they did not run.

    On a cluster the calls of one slot must run in the order given (the event log's appends of a
    run), so a redirected call is not resent by itself: redis-py resends each redirected command
    on its own, one round trip after another, and a failover's new master that lacks the script
    would then refuse the first ones (NOSCRIPT) and run the later ones once another client loaded
    it, out of order. Here a redirection or a missing script fails the call; the scripts are then
    loaded on every node, replicas too (a replica a failover promotes knows them already), and the
    failed calls are sent again, in order (those a node refused with CLUSTERDOWN, a moment later)."""
    cluster = isinstance(redis, RedisCluster)
    pipe = batch(redis)
    for script, keys, args in calls:
        pipe.evalsha(script.sha, len(keys), *keys, *args)
    replies: list[Any] = await (pipe.execute(raise_on_error=False, allow_redirections=False)  # type: ignore[call-arg]
                                if cluster else pipe.execute(raise_on_error=False))
    # MOVED is an ASK; a node in a failover may answer CLUSTERDOWN for a moment
    again_after = (NoScriptError, AskError, TryAgainError, ClusterDownError) if cluster else (NoScriptError,)
    unknown = [index for index, reply in enumerate(replies) if isinstance(reply, again_after)]
    if any(isinstance(replies[index], ClusterDownError) for index in unknown):
        await asyncio.sleep(CLUSTER_DOWN_PAUSE_SECONDS)
    if unknown:
        for body in {calls[index][0].script for index in unknown}:
            if isinstance(redis, RedisCluster):
                await load_on_every_node(redis, body)
            else:
                await redis.script_load(body)
        again = batch(redis)
        for index in unknown:
            script, keys, args = calls[index]
            again.evalsha(script.sha, len(keys), *keys, *args)
        for index, reply in zip(unknown, await again.execute(raise_on_error=False), strict=True):
            replies[index] = reply
    return replies


async def load_on_every_node(redis: RedisCluster, body: ScriptTextT) -> None:
    """SCRIPT LOAD `body` on the primaries, then on every other node `CLUSTER NODES` names (the
    replicas, which the client does not hold connections to): a replica that a failover promotes
    then runs the script at once. A replica that cannot be reached now is skipped."""
    await redis.script_load(body)  # on the primaries redis-py knows
    primaries = redis.get_primaries()
    loaded = {node.name for node in primaries}
    template = primaries[0]
    options = {key: value for key, value in template.connection_kwargs.items() if key not in ("host", "port")}
    for address, info in (await redis.cluster_nodes()).items():
        flags = str(info.get("flags", ""))
        if address in loaded or "fail" in flags or "noaddr" in flags:
            continue
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            continue
        node = ClusterNode(host, int(port), connection_class=template.connection_class, **options)
        try:
            await node.execute_command("SCRIPT", "LOAD", body)
        except (RedisError, OSError) as exc:
            _log.warning("could not load a script on cluster node %s: %s", address, exc)
        finally:
            await node.disconnect()


def raise_error(reply: Any) -> Any:
    """`reply`, or the error it is (a pipeline's replies carry errors as values)."""
    if isinstance(reply, Exception):
        raise reply
    return reply


async def new_connection(redis: RedisClient, **overrides: Any) -> AbstractConnection:
    """A connection of its own (not from a pool) with the client's settings, for a reader that
    holds one (Pub/Sub): to the server, or to one node of the cluster (any node hears every
    classic PUBLISH; a new one is picked at each call, so a lost node is left behind)."""
    if isinstance(redis, RedisCluster):
        await redis.initialize()
        node = random.choice(redis.get_nodes())  # nosec B311 # spreading readers, not a secret
        return node.connection_class(**{**node.connection_kwargs, **overrides})
    pool = redis.connection_pool
    return pool.connection_class(**{**pool.connection_kwargs, **overrides})


async def get_values(redis: RedisClient, keys: Sequence[str | bytes]) -> list[Any]:
    """The values of `keys`, in order: one MGET on a server; on a cluster one MGET per slot, sent in
    one pipeline (one write per node): never a cross-slot command."""
    if isinstance(redis, RedisCluster):
        return list(await redis.mget_nonatomic(list(keys)))
    return list(await redis.mget(list(keys)))
