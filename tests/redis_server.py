"""A real `redis-server` for tests: started on a free port, without persistence, killed at the end.

Used by the integration tests (next to fakeredis) and by the end-to-end tests of several Aura
instances. A missing binary fails the run: these tests exist to prove Aura against the real thing.
"""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER_START_TIMEOUT_SECONDS = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    directory: Path

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




def start_redis_server(directory: Path, port: int | None = None) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH: these tests need a real server "
                    "(the README's test command installs it: apt-get install redis-server)", pytrace=False)
    port = port or free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--logfile", "", "--daemonize", "no"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    _wait_until_ready(process)
    threading.Thread(target=_drain, args=(process,), daemon=True).start()
    return RedisServer(port=port, process=process, directory=directory)


def stop_redis_server(server: RedisServer) -> None:
    server.process.kill()
    server.process.wait(timeout=10)


def restart_redis_server(server: RedisServer) -> RedisServer:
    """Kill the server and start a new, empty one on the same port (an outage and a recovery)."""
    stop_redis_server(server)
    return start_redis_server(server.directory, server.port)
