"""Redis behind Sentinel: `redis+sentinel://` URLs and a client that follows failovers.

`redis+sentinel://[user:password@]host:port[,host:port...]/<service-name>[/db]` names the
sentinels (any number; each is asked in turn) and the service they watch; `rediss+sentinel://`
speaks TLS to the data nodes (the sentinels too, unless `sentinel_ssl=false`). Query parameters:
`sentinel_username` and `sentinel_password` when the sentinels require their own credentials
(the URL's user and password are the data nodes'), and `ssl_ca_certs`, `ssl_cert_reqs` for TLS.

The client is redis-py's own (`redis.asyncio.sentinel.Sentinel.master_for`): every new
connection asks a sentinel for the current master, and a connection that meets a demoted master
(a READONLY reply) is dropped so the next command reconnects to the new one. Aura adds a blocking
pool (a burst waits for a connection instead of failing, as with `redis://`), and `MasterWatch`:
the Pub/Sub connections, which send no command a demoted master could refuse, learn that the
master moved from the sentinels' own `+switch-master` message instead of asking them over and over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import RedisError

from domain.runtime.waits import Backoff

_log = logging.getLogger(__name__)

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379
# How often a connection that follows failovers looks (in memory) whether the watch saw the master move.
DEFAULT_MASTER_CHECK_SECONDS = 1.0
# The sentinels' message for a completed failover: "<service> <old ip> <old port> <new ip> <new port>".
SWITCH_MASTER_CHANNEL = b"+switch-master"
# An idle subscription to a sentinel is PINGed this often, so a dead one is noticed and replaced.
SENTINEL_KEEPALIVE_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class SentinelAddress:
    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    sentinel_tls: bool = False
    tls_options: tuple[tuple[str, str], ...] = ()


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelAddress:
    """The parts of a `redis+sentinel://` URL; ValueError (saying what is wrong) for a bad one."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL (expected {' or '.join(s + '://' for s in SENTINEL_SCHEMES)})")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    if not hosts:
        raise ValueError("a Sentinel URL names at least one sentinel: redis+sentinel://host:port/service-name")
    sentinels = tuple(_host_port(item) for item in hosts.split(","))
    path = [unquote(segment) for segment in parts.path.split("/")[1:]]
    if path and path[-1] == "":
        path.pop()
    if not path or not path[0] or len(path) > 2:
        raise ValueError("a Sentinel URL ends with the service name and an optional db: "
                         "redis+sentinel://host:port[,host:port...]/<service-name>[/db]")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ValueError(f"the db after the service name must be a number, not {path[1]!r}")
        db = int(path[1])
    username, password = None, None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    known = {"sentinel_username", "sentinel_password", "sentinel_ssl", "ssl_ca_certs", "ssl_cert_reqs"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise ValueError(f"unknown Sentinel URL parameter(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    tls = parts.scheme.lower() == "rediss+sentinel"
    sentinel_ssl = query.get("sentinel_ssl", "true" if tls else "false").lower()
    if sentinel_ssl not in ("true", "false"):
        raise ValueError("sentinel_ssl is true or false")
    return SentinelAddress(
        sentinels=sentinels, service_name=path[0], db=db, tls=tls, username=username, password=password,
        sentinel_username=query.get("sentinel_username"), sentinel_password=query.get("sentinel_password"),
        sentinel_tls=sentinel_ssl == "true",
        tls_options=tuple((key, value) for key, value in sorted(query.items()) if key.startswith("ssl_")))


def _host_port(item: str) -> tuple[str, int]:
    if not item:
        raise ValueError("an empty sentinel address in the URL (two commas, or a trailing one)")
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"sentinel address {item!r} has no host")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"sentinel address {item!r} has no valid port")
    return host, int(port_text)


class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool with the blocking pool's waiting for a free connection (the MRO
    puts the sentinel's master lookup in front of `BlockingConnectionPool`), and the pool's
    `MasterWatch`."""

    master_watch: MasterWatch | None = None


class MasterWatch:
    """Where the sentinels say the service's master is, kept current without polling them: one
    subscription to `+switch-master` on one sentinel at a time (the next one when it fails), and
    one `SENTINEL MASTERS` query (through redis-py's `get_master_address`, which also moves the
    pool) each time the subscription is (re)made, so a switch missed while unsubscribed counts
    too. An idle subscription is PINGed every `SENTINEL_KEEPALIVE_SECONDS`: that, per process, is
    all it costs while nothing fails over.

    `generation` grows each time the master it knows changes; a connection notes it when it
    connects and moves when it grew and the master is no longer the one it is connected to
    (`moved`). Started by the first connection that asks (`start`), stopped with the client."""

    def __init__(self, sentinel: Sentinel, pool: SentinelConnectionPool, service_name: str) -> None:
        self._sentinel = sentinel
        self._pool = pool
        self._service_name = service_name.encode()
        self.address: tuple[str, int] | None = None
        self.generation = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch(), name="sentinel master watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def moved(self, connection: AbstractConnection, since_generation: int) -> bool:
        """Whether `connection` (connected when the watch was at `since_generation`) must move: the
        master changed since, and it is not the one `connection` is connected to."""
        if self.generation == since_generation or self.address is None:
            return False
        return (getattr(connection, "host", None), getattr(connection, "port", None)) != self.address

    def _learn(self, address: tuple[str, int]) -> None:
        if address != self.address:
            if self.address is not None:
                _log.warning("redis master moved from %s:%s to %s:%s", *self.address, *address)
            self.address = address
            self.generation += 1

    async def _watch(self) -> None:
        retry = Backoff(0.1, 2.0)
        turn = 0
        while True:
            sentinel = self._sentinel.sentinels[turn % len(self._sentinel.sentinels)]
            turn += 1
            pubsub = sentinel.pubsub()
            try:
                await pubsub.subscribe(SWITCH_MASTER_CHANNEL)
                confirmed = await pubsub.get_message(timeout=SENTINEL_KEEPALIVE_SECONDS)
                if confirmed is None or confirmed.get("type") != "subscribe":
                    raise RedisError("the sentinel did not confirm the +switch-master subscription")
                host, port = await self._pool.get_master_address()  # type: ignore[no-untyped-call]
                self._learn((str(host), int(port)))
                retry.succeeded()
                pinged = False
                while True:
                    message = await pubsub.get_message(timeout=SENTINEL_KEEPALIVE_SECONDS)
                    if message is None:
                        if pinged:
                            raise RedisError("the sentinel did not answer PING")
                        await pubsub.ping()
                        pinged = True
                        continue
                    pinged = False
                    if message.get("type") == "message":
                        self._on_switch(message.get("data"))
            except (RedisError, OSError) as exc:
                _log.warning("sentinel master watch: %s; trying the next sentinel", exc)
                retry.failed()
                await retry.pause()
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _on_switch(self, data: Any) -> None:
        parts = data.split() if isinstance(data, bytes) else []
        if len(parts) == 5 and parts[0] == self._service_name and parts[4].isdigit():
            self._learn((parts[3].decode(), int(parts[4])))


def master_watch(redis: Redis | RedisCluster) -> MasterWatch | None:
    """The `MasterWatch` of a client of `create_sentinel_redis`, started (None for another client)."""
    watch = getattr(getattr(redis, "connection_pool", None), "master_watch", None)
    if isinstance(watch, MasterWatch):
        watch.start()
        return watch
    return None


def create_sentinel_redis(address: SentinelAddress, connection_options: dict[str, Any]) -> Redis:
    """A client of `address`'s current master; `connection_options` as for a `redis://` pool
    (timeouts, retries, pool size and timeout, parser)."""
    options = dict(connection_options)
    pool_options = {"max_connections": options.pop("max_connections"), "timeout": options.pop("timeout")}
    sentinel_options: dict[str, Any] = {
        "socket_timeout": options["socket_timeout"],
        "socket_connect_timeout": options["socket_connect_timeout"],
        "username": address.sentinel_username, "password": address.sentinel_password,
        "ssl": address.sentinel_tls, **dict(address.tls_options),
    }
    sentinel = Sentinel(address.sentinels, sentinel_kwargs=sentinel_options)
    data_options: dict[str, Any] = {"db": address.db, "username": address.username, "password": address.password,
                                    **options}
    if address.tls:
        data_options.update(ssl=True, **dict(address.tls_options))
    redis: Redis = sentinel.master_for(address.service_name, connection_pool_class=BlockingSentinelConnectionPool,
                                       **pool_options, **data_options)
    pool = redis.connection_pool
    assert isinstance(pool, BlockingSentinelConnectionPool)
    pool.master_watch = MasterWatch(sentinel, pool, address.service_name)
    return redis


async def current_master(redis: Redis | RedisCluster) -> tuple[str, int] | None:
    """The master the sentinels name now for a client of `create_sentinel_redis` (None, asking
    nobody, for another client); raises `MasterNotFoundError` (a ConnectionError) when no sentinel
    names one."""
    pool = getattr(redis, "connection_pool", None)
    if not isinstance(pool, SentinelConnectionPool):
        return None
    host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]  # unannotated in redis-py
    return str(host), int(port)
