"""Redis backends for the integration tests: an in-process fakeredis and a real `redis-server`.

`redis_client` runs each test against both. The real server is started once per session on a
free port, without persistence, in a temporary directory, and killed at the end. A missing
binary fails the run: these tests exist to prove the adapters against the real thing.
"""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from adapters.redis.client import create_redis

SERVER_START_TIMEOUT_SECONDS = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def _wait_until_ready(process: subprocess.Popen[bytes]) -> None:
    """Read the server's log until it says it accepts connections.

    Reads the pipe unbuffered: a buffered readline could pull the ready line into Python's
    buffer, where `select` no longer sees it."""
    assert process.stdout is not None
    descriptor = process.stdout.fileno()
    printed = b""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_SECONDS
    with selectors.DefaultSelector() as selector:
        selector.register(descriptor, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if not selector.select(remaining):
                break
            chunk = os.read(descriptor, 65536)
            if not chunk:  # the process exited
                break
            printed += chunk
            if b"Ready to accept connections" in printed:
                return
    process.kill()
    pytest.fail("redis-server did not start:\n" + printed.decode("utf-8", "replace"), pytrace=False)


def _drain(process: subprocess.Popen[bytes]) -> None:
    """Keep reading the server's log so a full pipe can never block it."""
    assert process.stdout is not None
    for _ in process.stdout:
        pass


@pytest.fixture
def unused_port() -> int:
    """A local port nothing listens on (for a client of a stopped server)."""
    return free_port()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not on PATH: the Redis integration tests need a real server "
            "(install it, e.g. `apt-get install redis-server`)",
            pytrace=False,
        )
    directory: Path = tmp_path_factory.mktemp("redis-server")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--logfile",
            "",
            "--daemonize",
            "no",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    _wait_until_ready(process)
    threading.Thread(target=_drain, args=(process,), daemon=True).start()
    try:
        yield RedisServer(port=port, process=process)
    finally:
        process.kill()
        process.wait(timeout=10)


BACKENDS = ["fakeredis", pytest.param("redis-server", marks=pytest.mark.redis_server)]


@pytest.fixture(params=BACKENDS)
async def redis_client(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    """A client of a fresh, empty keyspace, once per backend."""
    if request.param == "fakeredis":
        client = create_redis(None)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        client = create_redis(server.url)
        await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def real_redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A client of the real server's fresh, empty keyspace, for what only a real server shows."""
    client = create_redis(redis_server.url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def redis_server_port(redis_server: RedisServer) -> int:
    return redis_server.port
