"""Redis backends for the integration tests: an in-process fakeredis and a real `redis-server`.

`redis_client` runs each test against both. The real server is started once per session on a
free port, without persistence, in a temporary directory, and killed at the end. A missing
binary fails the run: these tests exist to prove the adapters against the real thing.
"""

from __future__ import annotations

import asyncio
import contextlib
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


def _wait_until_ready(process: subprocess.Popen[bytes]) -> list[str]:
    """Read the server's log until it says it accepts connections; return what it printed."""
    assert process.stdout is not None
    printed: list[str] = []
    deadline = time.monotonic() + SERVER_START_TIMEOUT_SECONDS
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if not selector.select(remaining):
                break
            line = process.stdout.readline().decode("utf-8", "replace")
            if not line:  # the process exited
                break
            printed.append(line)
            if "Ready to accept connections" in line:
                return printed
    process.kill()
    pytest.fail("redis-server did not start:\n" + "".join(printed), pytrace=False)


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


class _Link:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.blackholed = False

    def close(self) -> None:
        self.client.close()
        self.upstream.close()


class RedisProxy:
    """A TCP relay in front of the test server that a test can break on purpose: refuse new
    connections (an outage) or silently swallow the traffic of the open ones (a half-open link)."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._refusing = False
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def refuse_new_connections(self, refuse: bool) -> None:
        self._refusing = refuse

    def blackhole_open_connections(self) -> None:
        for link in self._links:
            link.blackholed = True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            client_writer.close()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            client_writer.close()
            return
        link = _Link(client_writer, upstream_writer)
        self._links.add(link)
        try:
            await asyncio.gather(
                self._relay(client_reader, upstream_writer, link),
                self._relay(upstream_reader, client_writer, link),
            )
        finally:
            self._links.discard(link)
            link.close()

    @staticmethod
    async def _relay(source: asyncio.StreamReader, target: asyncio.StreamWriter, link: _Link) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if link.blackholed:
                    continue
                target.write(data)
                await target.drain()
        target.close()


@pytest.fixture
async def redis_proxy(redis_server: RedisServer) -> AsyncIterator[RedisProxy]:
    proxy = RedisProxy(redis_server.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
