"""A real Redis Sentinel group for tests: 1 master, 1 replica and 3 sentinels on loopback.

Every process listens on a free port, keeps nothing on disk but the sentinels' own config files
(Sentinel rewrites them) and is killed at the end. `wait_until_healthy` returns once the sentinels
know each other and the replica is in sync, so a `SENTINEL FAILOVER` can proceed; `failover`
returns once every sentinel names the new master and the old one replicates from it.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.redis_server import RedisServer, _drain, free_port, start_redis_server

SERVICE_NAME = "aura"
GROUP_TIMEOUT_SECONDS = 30.0


@dataclass
class SentinelGroup:
    directory: Path
    servers: list[RedisServer] = field(default_factory=list)  # master first at start
    sentinel_ports: list[int] = field(default_factory=list)
    sentinel_processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE_NAME}/0"

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.sentinel_ports[index], decode_responses=True,
                           socket_timeout=5)

    def master_port(self) -> int:
        """The master every sentinel names (fails while they disagree or name none)."""
        named = set()
        for index in range(len(self.sentinel_ports)):
            with self.sentinel(index) as client:
                _host, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE_NAME)
                named.add(int(port))
        assert len(named) == 1, f"the sentinels disagree on the master: {named}"
        return named.pop()

    def master(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.master_port())

    def server_on(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def wait_until_healthy(self) -> None:
        """Every sentinel knows the two others and a replica in sync with the master it names."""
        def healthy() -> bool:
            master_port = self.master_port()
            for index in range(len(self.sentinel_ports)):
                with self.sentinel(index) as client:
                    state = client.sentinel_master(SERVICE_NAME)
                    if int(state["num-other-sentinels"]) != len(self.sentinel_ports) - 1:
                        return False
                    if int(state["port"]) != master_port or state["flags"] != "master":
                        return False
                    replicas = client.sentinel_slaves(SERVICE_NAME)
                    if not any(r["master-link-status"] == "ok" and r["flags"] == "slave" for r in replicas):
                        return False
            with redis.Redis(host="127.0.0.1", port=master_port) as master:
                info = master.info("replication")
                return bool(info["role"] == "master" and info["connected_slaves"] >= 1
                            and info["slave0"]["state"] == "online")
        wait_for(healthy, "the Sentinel group to be healthy")

    def failover(self) -> int:
        """`SENTINEL FAILOVER`, then wait until the old master replicates from the new one; the new
        master's port."""
        old = self.master_port()
        with self.sentinel() as client:
            client.execute_command("SENTINEL", "FAILOVER", SERVICE_NAME)

        def switched() -> bool:
            try:
                new = self.master_port()
            except AssertionError:
                return False
            if new == old:
                return False
            with redis.Redis(host="127.0.0.1", port=old) as demoted:
                info = demoted.info("replication")
                return bool(info["role"] == "slave" and int(info["master_port"]) == new
                            and info["master_link_status"] == "up")
        wait_for(switched, "the failover to complete")
        return self.master_port()

    def stop(self) -> None:
        for process in self.sentinel_processes:
            process.kill()
            process.wait(timeout=10)
        for server in self.servers:
            server.process.kill()
            server.process.wait(timeout=10)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = GROUP_TIMEOUT_SECONDS) -> None:
    """Poll `condition` until it holds (a condition, never a fixed sleep); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (redis.RedisError, OSError, KeyError) as exc:
            last_error = exc
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what} (last error: {last_error!r})", pytrace=False)


def start_replica(directory: Path, master: RedisServer) -> RedisServer:
    """A redis-server replicating `master`, returned once its link is up."""
    with redis.Redis(host="127.0.0.1", port=master.port) as client:
        client.config_set("repl-diskless-sync-delay", 0)  # the default waits 5 s for more replicas
    replica = start_redis_server(directory)
    with redis.Redis(host="127.0.0.1", port=replica.port) as client:
        client.config_set("repl-diskless-sync-delay", 0)  # it is the master after a failover
        client.execute_command("REPLICAOF", "127.0.0.1", str(master.port))
        wait_for(lambda: client.info("replication")["master_link_status"] == "up", "the replica to sync")
    with redis.Redis(host="127.0.0.1", port=master.port) as client:
        # A replica whose link is up may take a while more to apply the master's stream (offset
        # 0 for up to a second here): until it does, every WAIT for it times out.
        wait_for(lambda: client.set("aura:test:replicating", b"1") and client.execute_command("WAIT", 1, 100) == 1,
                 "the replica to confirm a write")
        client.delete("aura:test:replicating")
    return replica


def start_sentinel(directory: Path, index: int, monitor_port: int | None) -> tuple[int, subprocess.Popen[bytes]]:
    """A sentinel (watching the master on `monitor_port` as `SERVICE_NAME`, or nothing), once it answers."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH: these tests need a real server "
                    "(the README's test command installs it: apt-get install redis-server)", pytrace=False)
    port = free_port()
    config = directory / f"sentinel-{index}.conf"
    text = f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {directory}\nlogfile \"\"\n"
    if monitor_port is not None:
        text += (f"sentinel monitor {SERVICE_NAME} 127.0.0.1 {monitor_port} 2\n"
                 # Quick to notice a dead master, so a test of a crash does not wait half a minute.
                 f"sentinel down-after-milliseconds {SERVICE_NAME} 1000\n"
                 f"sentinel failover-timeout {SERVICE_NAME} 10000\n"
                 f"sentinel parallel-syncs {SERVICE_NAME} 1\n")
    config.write_text(text)
    process = subprocess.Popen([binary, str(config), "--sentinel"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threading.Thread(target=_drain, args=(process,), daemon=True).start()
    try:
        def answers() -> bool:
            with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as client:
                return bool(client.ping())
        # A sentinel logs no "ready" line: it is up when it answers.
        wait_for(answers, f"sentinel {index} to answer")
    except BaseException:
        process.kill()
        process.wait(timeout=10)
        raise
    return port, process


def start_sentinel_group(directory: Path, sentinels: int = 3) -> SentinelGroup:
    group = SentinelGroup(directory=directory)
    try:
        for name in ("master", "replica"):
            (directory / name).mkdir()
        master = start_redis_server(directory / "master")
        group.servers.append(master)
        group.servers.append(start_replica(directory / "replica", master))
        for index in range(sentinels):
            port, process = start_sentinel(directory, index, master.port)
            group.sentinel_ports.append(port)
            group.sentinel_processes.append(process)
        group.wait_until_healthy()
    except BaseException:
        group.stop()
        raise
    return group
