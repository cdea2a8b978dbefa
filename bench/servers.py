"""Start and stop everything a benchmark run needs, and read each server's CPU time and memory.

Every process is started here, in its own session, and stopped by its own pid: nothing that was not
started by this run is ever touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-secret-that-is-long-enough-for-hs256-0123456789"
SEAL_KEY = "bench-seal-key-every-aura-instance-shares-0123"
TENANT = "bench"
START_TIMEOUT_SECONDS = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    ps: psutil.Process | None = None
    health_path: str | None = "/health"
    cwd: Path = ROOT

    def start(self) -> Self:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.ps = psutil.Process(self.process.pid)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not start in time; see {self.log_path}")

    def ready(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}{self.health_path}", timeout=0.5).status_code == 200
        except httpx.TransportError:
            return False

    def cpu(self) -> float:
        """CPU seconds of the server process to the nanosecond: the kernel's run time of each of its
        threads (/proc/<pid>/task/*/schedstat), plus what the children it reaped used. The process
        total in /proc/<pid>/stat counts clock ticks (10 ms): a 0.1 s load read that way is off by
        up to 10 %, which was most of the spread between rounds at one stream. A thread that ended
        takes its run time with it here; `cpu_ticks` still counts it, and `Bench.load` compares the
        two over each load."""
        assert self.ps is not None
        total_ns = 0
        for task in Path(f"/proc/{self.ps.pid}/task").iterdir():
            try:
                total_ns += int((task / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread that ended while we read
        times = self.ps.cpu_times()
        return total_ns / 1e9 + float(times.children_user + times.children_system)

    def cpu_ticks(self) -> float:
        """User + system CPU seconds of the server process (and any children it waits for), in clock
        ticks: ended threads included."""
        assert self.ps is not None
        times = self.ps.cpu_times()
        return float(times.user + times.system + times.children_user + times.children_system)

    def rss(self) -> int:
        assert self.ps is not None
        return int(self.ps.memory_info().rss)

    def uss(self) -> int:
        assert self.ps is not None
        return int(self.ps.memory_full_info().uss)

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class RedisServer(Server):
    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stats(self) -> dict[str, Any]:
        return redis_stats(self.port)

    def command(self, *args: str) -> Any:
        import redis

        client = redis.Redis(port=self.port, decode_responses=True)
        try:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]
        finally:
            client.close()


def cpu_used(server: Server, since: tuple[float, float]) -> float:
    """The server's CPU seconds since `since` (a `cpu_mark`): the precise figure, unless its clock
    ticks say a thread that ended took more with it (ticks ahead by over 30 ms and 10 %)."""
    precise0, ticks0 = since
    precise, ticks = cpu_mark(server)
    used, used_ticks = precise - precise0, ticks - ticks0
    if used_ticks - used > max(0.03, 0.1 * used_ticks):
        print(f"[bench] {server.name}: CPU by thread run times {used:.3f} s, by ticks {used_ticks:.3f} s: "
              "a thread ended; counting ticks", file=sys.stderr, flush=True)
        return used_ticks
    return used


def cpu_mark(server: Server) -> tuple[float, float]:
    return server.cpu(), server.cpu_ticks()


def settle(*servers: Server, quiet_s: float = 0.05, timeout_s: float = 2.0, idle_cpu_s: float = 0.002) -> None:
    """Return once no server used more than `idle_cpu_s` of CPU over `quiet_s` (or after
    `timeout_s`): a load's CPU is read after its servers finished its tail (connections closing,
    runs closing after their [DONE]), so it is counted with that load and not with the next one
    measured on the same server. An idle server's own timers use far less than the threshold."""
    deadline = time.monotonic() + timeout_s
    before = [server.cpu() for server in servers]
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        after = [server.cpu() for server in servers]
        if all(now - then <= idle_cpu_s for now, then in zip(after, before, strict=True)):
            return
        before = after


def redis_stats(port: int) -> dict[str, Any]:
    """Commands a Redis on loopback executed so far, by name (INFO commandstats: a script's own calls
    included), and its CPU seconds by its own account (INFO cpu). Take two and subtract: `stats_delta`."""
    import redis

    client = redis.Redis(port=port)
    try:
        commands = client.info("commandstats")
        cpu = client.info("cpu")
    finally:
        client.close()
    calls = {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in commands.items()}
    return {"calls": calls, "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])}


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AURA_", "BENCH_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def redis_server(workdir: Path) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench: redis-server is not on PATH (apt-get install redis-server)")
    server = RedisServer("redis", [], base_env(), workdir / "redis.log", health_path=None)
    server.argv = [binary, "--port", str(server.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(workdir), "--daemonize", "no", "--maxclients", "30000", "--tcp-backlog", "4096"]
    return server


def aura_server(name: str, workdir: Path, redis_url: str | None, *, event_loop: str = "auto",
                extra_env: dict[str, str] | None = None,
                source: Path | None = None) -> Server:
    """Aura as operators run it: `aura serve` (hypercorn), configured by AURA_* variables. Its
    event loop is its default (`auto`: uvloop when installed) unless `event_loop` says otherwise.
    `source` is another checkout's root (an older revision, for an A/B in the same run). With no
    `redis_url` it runs in its embedded mode: an in-process fakeredis."""
    workspace = workdir / "workspace"
    workspace.mkdir(exist_ok=True)
    env = base_env()
    server = Server(name, [], env, workdir / f"{name}.log")
    env.update({
        "AURA_AUTH__JWT_SECRET": SECRET,
        "AURA_SERVER__HOST": "127.0.0.1",
        "AURA_SERVER__PORT": str(server.port),
        "AURA_TOOLS__WORKSPACE_ROOT": str(workspace),
        "AURA_RUNS__MAX_PER_USER": "1000000", "AURA_STREAM__MAX_PER_USER": "1000000",
        "AURA_RUNS__MAX_PER_TENANT": "1000000", "AURA_RUNS__MAX_STARTS_PER_WINDOW": "1000000",
        "AURA_RUNS__INSTANCE_ID": name,
        "AURA_HITL__TIMEOUT_SECONDS": "1800",  # the longest wait the contract allows (a request lives 1800 s)
        # One seal key for every instance, as docs/operators.md ("Scaling out") recommends.
        "AURA_HITL__SEAL_KEY": SEAL_KEY,
        "AURA_STREAM__HEARTBEAT_SECONDS": "5",
        # Keep finished runs' logs briefly: a full benchmark writes millions of events.
        "AURA_EVENTS__RETENTION_SECONDS": "60",
        "AURA_LOG__LEVEL": "WARNING",
        "AURA_SERVER__EVENT_LOOP": event_loop,
    })
    if redis_url is not None:
        env["AURA_REDIS__URL"] = redis_url
    env.update(extra_env or {})
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source / "src"), env["PYTHONPATH"]])
    server.argv = [sys.executable, "-m", "app.cli", "serve"]
    return server


def peer_server(workdir: Path, *, event_loop: str = "auto") -> Server:
    """uvicorn's own default loop is `auto` too: uvloop when installed."""
    env = base_env()
    server = Server("peer", [], env, workdir / "peer.log")
    server.argv = [sys.executable, "-m", "uvicorn", "bench.apps.peer:app", "--host", "127.0.0.1", "--port",
                   str(server.port), "--log-level", "warning", "--no-access-log",
                   "--loop", event_loop, "--http", "h11", "--timeout-keep-alive", "75"]
    return server


def floor_server(name: str, workdir: Path, redis_url: str | None = None, *, uvloop: bool | None = None) -> Server:
    """On the same loop as Aura's default (uvloop when installed) unless told otherwise."""
    if uvloop is None:
        uvloop = uvloop_available()
    env = base_env()
    if redis_url:
        env["BENCH_FLOOR_REDIS"] = redis_url
    server = Server(name, [], env, workdir / f"{name}.log")
    server.argv = [sys.executable, "-m", "bench.apps.floor", "--port", str(server.port)]
    if uvloop:
        server.argv.append("--uvloop")
    return server


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


LANGGRAPH_APP = ROOT / "bench" / "apps" / "langgraph"
# What `langgraph dev` would otherwise reach beyond loopback, switched off: the CLI's analytics, the
# server's version check against PyPI, LangSmith tracing. With no license key and no LangSmith key
# in its environment it runs no license check and submits no metadata (it logs both).
LANGGRAPH_OFFLINE_ENV = {"LANGGRAPH_CLI_NO_ANALYTICS": "1", "LANGGRAPH_NO_VERSION_CHECK": "true",
                         "LANGSMITH_TRACING": "false", "LANGCHAIN_TRACING_V2": "false"}


def install_langgraph() -> Path:
    """LangGraph's virtualenv from its own lock (bench/apps/langgraph/uv.lock): it cannot share
    Aura's, see its pyproject.toml. Takes seconds when it is already there."""
    uv = shutil.which("uv")
    command = [uv] if uv else [sys.executable, "-m", "uv"]
    subprocess.run([*command, "sync", "--quiet", "--locked", "--project", str(LANGGRAPH_APP)], check=True,
                   env={k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")})
    return LANGGRAPH_APP / ".venv" / "bin" / "langgraph"


def langgraph_server(workdir: Path) -> Server:
    """LangGraph's Agent Server as `langgraph dev` runs it (in-memory runtime, one process), serving
    bench/apps/langgraph/graph.py. Without its file watcher (`--no-reload`: it would add its own CPU),
    and with as many concurrent runs per worker as the bench opens streams (its default is 10)."""
    binary = install_langgraph()
    env = {k: v for k, v in base_env().items()
           if not k.startswith(("LANGSMITH_", "LANGCHAIN_", "LANGGRAPH_")) and k != "PYTHONPATH"}
    env.update(LANGGRAPH_OFFLINE_ENV)
    env["LOG_LEVEL"] = "WARNING"  # as Aura's AURA_LOG__LEVEL here: no info line per run
    home = workdir / "langgraph"  # it keeps its in-memory state's snapshots in ./.langgraph_api
    home.mkdir(exist_ok=True)
    # langgraph.json with its paths made absolute: they are read relative to the working directory
    config = json.loads((LANGGRAPH_APP / "langgraph.json").read_text())
    config["dependencies"] = [str(LANGGRAPH_APP)]
    config["graphs"] = {name: str(LANGGRAPH_APP / where.removeprefix("./")) for name, where in config["graphs"].items()}
    (home / "langgraph.json").write_text(json.dumps(config))
    server = Server("langgraph", [], env, workdir / "langgraph.log", health_path="/ok")
    server.argv = [str(binary), "dev", "--no-browser", "--no-reload", "--host", "127.0.0.1", "--port",
                   str(server.port), "--config", str(home / "langgraph.json"),
                   "--n-jobs-per-worker", "1000", "--server-log-level", "WARNING"]
    server.cwd = home
    return server


def remote_connections(server: Server) -> list[str]:
    """The server's TCP connections to anything but loopback (a baseline must stay offline)."""
    assert server.ps is not None
    return sorted({f"{c.raddr.ip}:{c.raddr.port}" for c in server.ps.net_connections(kind="inet")
                   if c.raddr and not c.raddr.ip.startswith(("127.", "::1", "::ffff:127."))})


# The bench's own look-ups (INFO, CLIENT LIST) are not the servers' work.
BENCH_COMMANDS = {"info", "client|list", "hello"}


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Redis's work between two `RedisServer.stats()`: commands by name, their total, CPU seconds."""
    by_name = {name: calls - before["calls"].get(name, 0) for name, calls in after["calls"].items()
               if name not in BENCH_COMMANDS}
    by_name = {name: n for name, n in sorted(by_name.items(), key=lambda item: -item[1]) if n}
    return {"commands": sum(by_name.values()), "by_command": by_name, "cpu_s": after["cpu_s"] - before["cpu_s"]}
