"""The URL alone chooses the Redis topology; what is not a Redis URL Aura reads is refused at start,
saying what is wrong (and never echoing a password)."""

from __future__ import annotations

import pytest

from adapters.redis.client import RedisTarget, parse_redis_url


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://user:pw@redis.example:6380/2",
                                 "unix:///run/redis.sock?db=1", "REDIS://host:1"])
def test_single_server_urls_go_to_redis_py_as_they_are(url: str) -> None:
    assert parse_redis_url(url) == RedisTarget("single", url=url)


def test_a_cluster_url_names_its_seed_nodes() -> None:
    assert parse_redis_url("redis+cluster://10.0.0.1:6379,10.0.0.2:7000, redis-3:6379") == RedisTarget(
        "cluster", nodes=(("10.0.0.1", 6379), ("10.0.0.2", 7000), ("redis-3", 6379)))
    assert parse_redis_url("rediss+cluster://aura:s%40cret@[::1]:6379/0") == RedisTarget(
        "cluster", nodes=(("::1", 6379),), tls=True, username="aura", password="s@cret")
    assert parse_redis_url("redis+cluster://:only-a-password@h:1") == RedisTarget(
        "cluster", nodes=(("h", 1),), password="only-a-password")


@pytest.mark.parametrize(("url", "message"), [
    ("localhost:6379", "no scheme"),
    ("memcached://h:1", "unsupported Redis URL scheme 'memcached'"),
    ("redis+cluster://h:1/3", "database 0, no options"),
    ("redis+cluster://h:1/?ssl_cert_reqs=none", "database 0, no options"),
    ("redis+cluster://h", "must be host:port"),
    ("redis+cluster://h:1,:2", "must be host:port"),
])
def test_what_is_not_a_redis_url_is_refused_saying_why(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_redis_url(url)


def test_a_refusal_never_shows_the_password() -> None:
    with pytest.raises(ValueError) as refused:
        parse_redis_url("redis+cluster://aura:hunter2@h:1/5")
    assert "hunter2" not in str(refused.value)
