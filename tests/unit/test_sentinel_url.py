"""`redis+sentinel://` URLs: what they name, what they refuse, and the WAIT default they imply."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from redis.asyncio.sentinel import SentinelManagedConnection

from adapters.redis.client import RedisTarget, close_redis, create_redis, parse_redis_url
from adapters.redis.connection import cancellation_safe
from adapters.redis.sentinel import BlockingSentinelConnectionPool, SentinelAddress, parse_sentinel_url
from app.settings import RedisSettings


def test_sentinels_service_and_db() -> None:
    assert parse_sentinel_url("redis+sentinel://s1:26380,s2,[::1]:26381/mymaster/3") == SentinelAddress(
        sentinels=(("s1", 26380), ("s2", 26379), ("::1", 26381)), service_name="mymaster", db=3)


def test_credentials_tls_and_sentinel_credentials() -> None:
    address = parse_sentinel_url(
        "rediss+sentinel://app:p%40ss@s1:1/svc?sentinel_username=watch&sentinel_password=w&ssl_cert_reqs=none")
    assert (address.username, address.password, address.tls, address.sentinel_tls) == ("app", "p@ss", True, True)
    assert (address.sentinel_username, address.sentinel_password) == ("watch", "w")
    assert address.tls_options == (("ssl_cert_reqs", "none"),)
    assert parse_sentinel_url("rediss+sentinel://s1/svc?sentinel_ssl=false").sentinel_tls is False


@pytest.mark.parametrize(("url", "says"), [
    ("redis+sentinel://s1:1", "ends with the service name"),
    ("redis+sentinel://s1:1/", "ends with the service name"),
    ("redis+sentinel://s1:1/svc/0/extra", "ends with the service name"),
    ("redis+sentinel://s1:1/svc/zero", "must be a number"),
    ("redis+sentinel:///svc", "at least one sentinel"),
    ("redis+sentinel://s1:1,,s2:2/svc", "empty sentinel address"),
    ("redis+sentinel://s1:notaport/svc", "no valid port"),
    ("redis+sentinel://s1:70000/svc", "no valid port"),
    ("redis+sentinel://s1/svc?sentinel_pasword=x", "unknown Sentinel URL parameter(s): sentinel_pasword"),
    ("redis+sentinel://s1/svc?sentinel_ssl=maybe", "sentinel_ssl is true or false"),
])
def test_a_malformed_url_is_refused_with_its_reason(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        parse_sentinel_url(url)
    with pytest.raises(ValidationError, match=says.replace("(", r"\(").replace(")", r"\)")):
        RedisSettings(url=url)


def test_parse_redis_url_selects_sentinel_by_the_scheme() -> None:
    address = parse_sentinel_url("rediss+sentinel://app:pw@s1:1,s2:2/svc/1")
    assert parse_redis_url("rediss+sentinel://app:pw@s1:1,s2:2/svc/1") == RedisTarget(
        "sentinel", sentinel=address, tls=True, username="app", password="pw")


def test_wait_is_refused_on_a_cluster() -> None:
    with pytest.raises(ValidationError, match="not to a cluster"):
        RedisSettings(url="redis+cluster://c1:7000", wait_replicas=1)
    assert RedisSettings(url="redis+cluster://c1:7000").confirming_replicas == 0


def test_replicas_confirm_writes_by_default_under_sentinel_only() -> None:
    assert RedisSettings(url="redis+sentinel://s1/svc").confirming_replicas == 1
    assert RedisSettings(url="redis://r:6379/0").confirming_replicas == 0
    assert RedisSettings(url=None).confirming_replicas == 0
    assert RedisSettings(url="redis+sentinel://s1/svc", wait_replicas=0).confirming_replicas == 0
    assert RedisSettings(url="redis://r:6379/0", wait_replicas=2).confirming_replicas == 2


async def test_the_client_asks_the_sentinels_with_a_blocking_pool() -> None:
    client = create_redis("redis+sentinel://127.0.0.1:1,127.0.0.1:2/svc/2", max_connections=7,
                          pool_timeout_seconds=1.5)
    try:
        pool = client.connection_pool
        assert isinstance(pool, BlockingSentinelConnectionPool)
        assert (pool.service_name, pool.max_connections, pool.timeout) == ("svc", 7, 1.5)
        assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["protocol"] == 2
        sentinels = pool.sentinel_manager.sentinels
        assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [1, 2]
        # its connections write cancellation-safely, as every other client's
        assert pool.connection_class is cancellation_safe(pool.connection_class)
        assert issubclass(pool.connection_class, SentinelManagedConnection)
    finally:
        await close_redis(client)
