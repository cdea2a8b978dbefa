"""The URL alone chooses the Redis topology; what is not a Redis URL Aura reads is refused at start,
saying what is wrong (and never echoing a password)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.redis.client import RedisTarget, batch, close_redis, parse_redis_url
from adapters.redis.packed import PackedConnection, pack
from tests.defaults import client_of
from tests.redis_server import start_redis_server, stop_redis_server


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


@pytest.mark.redis_server
async def test_a_unix_socket_url_reaches_a_real_server_through_every_path(tmp_path: Path) -> None:
    """`unix://` takes the same client options as TCP where the socket type allows them (no TCP
    keep-alive on a unix socket): commands, pipelines and the event log's packed batches work."""
    socket = tmp_path / "redis.sock"
    server = start_redis_server(tmp_path, None, "--unixsocket", str(socket), "--unixsocketperm", "700")
    client = client_of(f"unix://{socket}?db=2")
    connection = PackedConnection(client)  # type: ignore[arg-type]
    try:
        assert await client.set(b"aura:test:k", b"v") is True
        pipe = batch(client)
        pipe.get(b"aura:test:k")
        pipe.incr(b"aura:test:n")
        assert await pipe.execute() == [b"v", 1]
        assert await connection.execute(pack(b"XADD", b"aura:test:log", b"1-1", b"e", b"x"), 1) == [b"1-1"]
        info = await client.client_info()
        assert (info["db"], info["laddr"]) == (2, f"{socket}:0")  # the URL's database, over the socket
    finally:
        await connection.aclose()
        await close_redis(client)
        stop_redis_server(server)
