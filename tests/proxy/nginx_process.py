"""Debian's nginx in the foreground, with a generated config in a temp directory, for tests that put
a real proxy in front of Aura.

The config comes from config/nginx-test.conf.template (its own pid, logs and temp paths, a free
loopback port, nginx's default buffering on). Extra site files, such as a rewritten copy of the
shipped deploy/nginx/aura.conf, are included from the temp directory's `sites/`. A missing nginx
binary fails the test: these tests exist to prove Aura behind the real thing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.aura_process import free_port

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "config" / "nginx-test.conf.template"
SHIPPED_SITE = REPO / "deploy" / "nginx" / "aura.conf"
START_TIMEOUT_SECONDS = 10.0


def nginx_binary() -> str:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):  # sbin is not on every user's PATH
        found = "/usr/sbin/nginx"
    if found is None:
        pytest.fail("nginx is not installed: the proxy tests run Debian's nginx in front of Aura "
                    "(the README's test command installs it: apt-get install nginx-light)", pytrace=False)
    return found


def shipped_site(listen_port: int, aura_ports: Sequence[int]) -> str:
    """deploy/nginx/aura.conf with its `listen` on a loopback port and its upstream servers
    pointed at local Aura instances; everything else exactly as shipped."""
    text = SHIPPED_SITE.read_text()
    text, listens = re.subn(r"^(\s*)listen 8080;$", rf"\1listen 127.0.0.1:{listen_port};", text, flags=re.M)
    ports = iter(aura_ports)
    text, servers = re.subn(r"\bserver aura-\d+:9000;", lambda _: f"server 127.0.0.1:{next(ports)};", text)
    assert (listens, servers) == (1, len(aura_ports)), \
        f"{SHIPPED_SITE} changed shape: {listens} listen and {servers} upstream server lines rewritten"
    return text


@dataclass
class NginxProcess:
    directory: Path
    aura_port: int
    port: int = field(default_factory=free_port)
    impatient_timeout: str = "250ms"
    sites: Mapping[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "nginx.conf"

    def config_text(self) -> str:
        text = TEMPLATE.read_text()
        for name, value in {"DIR": str(self.directory), "PORT": str(self.port), "AURA_PORT": str(self.aura_port),
                            "IMPATIENT_TIMEOUT": self.impatient_timeout}.items():
            text = text.replace(f"@{name}@", value)
        leftover = [name for line in text.splitlines() if not line.lstrip().startswith("#")
                    for name in re.findall(r"@[A-Z_]+@", line)]
        assert not leftover, f"unfilled placeholders in {TEMPLATE}: {leftover}"
        return text

    def _command(self, *extra: str) -> list[str]:
        # -p: prefix for relative paths; -e: the error log nginx uses before it has read the config
        return [nginx_binary(), "-p", f"{self.directory}/", "-e", str(self.directory / "error.log"),
                "-c", str(self.config_path), *extra]

    def start(self) -> NginxProcess:
        (self.directory / "sites").mkdir(parents=True, exist_ok=True)
        for name, text in self.sites.items():
            (self.directory / "sites" / name).write_text(text)
        self.config_path.write_text(self.config_text())
        checked = subprocess.run(self._command("-t"), capture_output=True, text=True, timeout=30)
        if checked.returncode != 0:
            pytest.fail(f"nginx -t refused the generated config:\n{checked.stderr}", pytrace=False)
        log = (self.directory / "nginx.out").open("ab")
        self.process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"nginx exited with {self.process.returncode}:\n{self.error_log()}", pytrace=False)
            try:
                if httpx.get(f"{self.url}/_nginx_ready", timeout=0.5).status_code == 204:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # start-up poll with a deadline, not a test's wait for an outcome
        self.stop()
        pytest.fail(f"nginx did not answer in time:\n{self.error_log()}", pytrace=False)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # fast shutdown: open streams are closed
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""
