"""Redis behind Sentinel: `redis+sentinel://` URLs and a client that follows failovers.

`redis+sentinel://[user:password@]host:port[,host:port...]/<service-name>[/db]` names the
sentinels (any number; each is asked in turn) and the service they watch; `rediss+sentinel://`
speaks TLS to the data nodes (the sentinels too, unless `sentinel_ssl=false`). Query parameters:
`sentinel_username` and `sentinel_password` when the sentinels require their own credentials
(the URL's user and password are the data nodes'), and `ssl_ca_certs`, `ssl_cert_reqs` for TLS.

The client is redis-py's own (`redis.asyncio.sentinel.Sentinel.master_for`): every new
connection asks a sentinel for the current master, and a connection that meets a demoted master
(a READONLY reply) is dropped so the next command reconnects to the new one. Aura adds a blocking
pool (a burst waits for a connection instead of failing, as with `redis://`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379
# How often a connection that follows failovers itself asks a sentinel where the master is.
DEFAULT_MASTER_CHECK_SECONDS = 1.0


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
    puts the sentinel's master lookup in front of `BlockingConnectionPool`)."""


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


async def master_moved(redis: Redis | RedisCluster, connection: AbstractConnection) -> bool:
    """Whether the sentinels now name another master than the one `connection` (of `redis`'s
    pool) is connected to: a connection that must follow failovers at once (the signal bus's
    Pub/Sub connection, which a demoted master keeps serving until Sentinel reconfigures it, some
    seconds later) drops itself then. Asking also moves the pool: its idle connections to the old
    master are closed."""
    address = await current_master(redis)
    if address is None:
        return False
    host = getattr(connection, "host", None)
    port = getattr(connection, "port", None)
    return (host, port) != address
