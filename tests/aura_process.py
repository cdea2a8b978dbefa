"""Start the real service (`aura serve`, hypercorn) in a subprocess for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.redis_server import free_port
from tests.support import SECRET

START_TIMEOUT_SECONDS = 20.0
SOURCE_ROOT = Path(__file__).resolve().parents[1] / "src"


@dataclass
class AuraProcess:
    workspace: Path
    log_path: Path
    redis_url: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> AuraProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AURA_")}
        env.update({
            "AURA_AUTH__JWT_SECRET": SECRET,
            "AURA_TOOLS__WORKSPACE_ROOT": str(self.workspace),
            "AURA_SERVER__HOST": "127.0.0.1",
            "AURA_SERVER__PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
            # The per-user rate limit of run starts counts in Redis, which tests share, and they
            # start many runs as one user within a window; a test of the limit sets its own.
            "AURA_RUNS__MAX_STARTS_PER_WINDOW": "1000000",
            # the service under test is this checkout's, whichever checkout pip installed last
            "PYTHONPATH": os.pathsep.join([str(SOURCE_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        })
        if self.redis_url:
            env["AURA_REDIS__URL"] = self.redis_url
        env.update(self.env)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"aura exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # start-up poll with a deadline, not a test's wait for an outcome
        self.stop()
        raise RuntimeError(f"aura did not answer /health in time:\n{self.log_path.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")
