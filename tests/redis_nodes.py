"""Real `redis-server` processes on loopback: one started on a free port, without persistence, killed
at the end; and a real Redis Cluster of such servers (`redis-cli --cluster create` for 3 masters or
more, the slots assigned by hand below that).

No test framework here: the tests start them through tests/redis_server.py (which turns a
`RedisStartError` into a test failure), the benchmarks (bench/capacity.py) from here directly.
"""

from __future__ import annotations

import os
import random
import selectors
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SERVER_START_TIMEOUT_SECONDS = 10.0


class RedisStartError(RuntimeError):
    """A server or a cluster could not be started (a missing binary, a server that did not come up)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port below 55536 whose cluster bus port (+10000) is free too, picked at random (below
    the kernel's ephemeral range, so no client connection takes it meanwhile)."""
    chooser = random.SystemRandom()
    for _ in range(1000):
        port = chooser.randrange(20_000, 28_000)
        if _is_free(port) and _is_free(port + 10_000):
            return port
    raise RedisStartError("no free port pair for a cluster node")


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
    raise RedisStartError("redis-server did not start:\n" + printed.decode("utf-8", "replace"))


def _drain(process: subprocess.Popen[bytes]) -> None:
    """Keep reading the server's log so a full pipe can never block it."""
    assert process.stdout is not None
    for _ in process.stdout:
        pass


def start_redis_server(directory: Path, port: int | None = None, *extra: str) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisStartError("redis-server is not on PATH: these tests need a real server "
                              "(the README's test command installs it: apt-get install redis-server)")
    port = port or free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--logfile", "", "--daemonize", "no", *extra],
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


CLUSTER_MASTERS = 3
CLUSTER_FORM_TIMEOUT_SECONDS = 30.0


@dataclass
class RedisCluster:
    """Masters (3 by default), each with its replicas, on loopback; `url` is Aura's (every node a
    seed)."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]


def start_redis_cluster(directory: Path, masters: int = CLUSTER_MASTERS, replicas: int = 1) -> RedisCluster:
    """Start `masters` times (1 + `replicas`) cluster-enabled servers, join them with `redis-cli
    --cluster create … --cluster-replicas <replicas>` (which refuses fewer than 3 masters: those get
    their slots by hand) and wait until every node says the cluster is ok."""
    cli = shutil.which("redis-cli")
    if cli is None:
        raise RedisStartError("redis-cli is not on PATH: the cluster tests need it (apt-get install redis-tools)")
    nodes: list[RedisServer] = []
    try:
        for index in range(masters * (1 + replicas)):
            node_dir = directory / f"node-{index}"
            node_dir.mkdir(parents=True, exist_ok=True)
            nodes.append(start_redis_server(
                node_dir, free_cluster_port(), "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"), "--cluster-node-timeout", "2000"))
        if masters >= CLUSTER_MASTERS:
            _run_cli(cli, "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in nodes),
                     "--cluster-replicas", str(replicas), "--cluster-yes")
        else:
            _form_small_cluster(cli, nodes, masters)
        _wait_until_cluster_ok(cli, nodes, masters * replicas)
    except BaseException:
        for node in nodes:
            stop_redis_server(node)
        raise
    return RedisCluster(nodes)


def _run_cli(cli: str, *args: str) -> str:
    done = subprocess.run([cli, *args], capture_output=True, timeout=CLUSTER_FORM_TIMEOUT_SECONDS, check=False)
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    if done.returncode != 0 or output.startswith(("ERR", "(error)")):
        raise RedisStartError(f"redis-cli {' '.join(args)} failed:\n{output}")
    return output


def _form_small_cluster(cli: str, nodes: list[RedisServer], masters: int) -> None:
    """Fewer masters than `redis-cli --cluster create` takes: the first `masters` nodes share the
    16,384 slots in equal ranges, every node meets the first, and each of the rest replicates a
    master in turn."""
    for index, node in enumerate(nodes[:masters]):
        first, last = index * 16384 // masters, (index + 1) * 16384 // masters - 1
        _run_cli(cli, "-p", str(node.port), "cluster", "addslotsrange", str(first), str(last))
    for node in nodes[1:]:
        _run_cli(cli, "-p", str(node.port), "cluster", "meet", "127.0.0.1", str(nodes[0].port))
    master_ids = [_run_cli(cli, "-p", str(node.port), "cluster", "myid").strip() for node in nodes[:masters]]
    for index, node in enumerate(nodes[masters:]):
        deadline = time.monotonic() + CLUSTER_FORM_TIMEOUT_SECONDS
        while master_ids[index % masters] not in _run_cli(cli, "-p", str(node.port), "cluster", "nodes"):
            if time.monotonic() > deadline:
                raise RedisStartError(f"node {node.port} never learned of its master")
            time.sleep(0.1)  # the handshake travels over the cluster bus
        _run_cli(cli, "-p", str(node.port), "cluster", "replicate", master_ids[index % masters])


def _wait_until_cluster_ok(cli: str, nodes: list[RedisServer], replicas: int) -> None:
    deadline = time.monotonic() + CLUSTER_FORM_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        states = [subprocess.run([cli, "-p", str(node.port), "cluster", "info"], capture_output=True,
                                 timeout=5, check=False).stdout for node in nodes]
        found = subprocess.run([cli, "-p", str(nodes[0].port), "cluster", "nodes"], capture_output=True,
                               timeout=5, check=False).stdout.count(b"slave")
        if all(b"cluster_state:ok" in state for state in states) and found == replicas:
            return
        time.sleep(0.1)
    raise RedisStartError("the Redis Cluster did not become ok")


def stop_redis_cluster(cluster: RedisCluster) -> None:
    for node in cluster.nodes:
        stop_redis_server(node)


def flush_redis_cluster(cluster: RedisCluster) -> None:
    """Empty every master (replicas follow) and forget every Lua script, as a fresh cluster."""
    import redis

    for node in cluster.nodes:
        client = redis.Redis(port=node.port)
        try:
            replication = client.info("replication")
            if replication["role"] == "master":
                client.flushall()
                client.script_flush()
                # both reach the replicas later: wait, or a script loaded there meanwhile is flushed
                if replication["connected_slaves"]:
                    client.execute_command("WAIT", replication["connected_slaves"], 1000)  # type: ignore[no-untyped-call]
        finally:
            client.close()
