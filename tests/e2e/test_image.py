"""The image starts: deploy/Dockerfile's stages, replayed outside Docker (no engine runs here), install
the locked versions offline and the installed `aura` answers /health and streams a run."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.dockerfile_replay import Replay
from tests.redis_server import free_port
from tests.support import SECRET, token

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)
def test_the_replayed_image_installs_the_lock_and_serves_a_run(tmp_path: Path) -> None:
    replay = Replay(REPO / "deploy" / "Dockerfile", REPO, tmp_path / "image",
                    ignore_file=REPO / "deploy" / "Dockerfile.dockerignore")
    stages = replay.run()
    runtime = stages["runtime"]
    assert list(stages) == ["build", "runtime"]

    # what only a root filesystem does was asked for, and this machine provides its part (git)
    assert replay.system_calls_made() == [
        "apt-get update",
        "apt-get install -y --no-install-recommends git",
        "groupadd --system --gid 10001 aura",
        f"useradd --system --uid 10001 --gid aura --home-dir {runtime.root}/app --no-create-home "
        "--shell /usr/sbin/nologin aura",
        f"chown aura:aura {runtime.root}/workspace",
    ]
    assert runtime.user == "10001:10001"

    # the image holds exactly the lock's versions, and Aura
    def normal(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    freeze = subprocess.run([str(runtime.root / "opt/aura/bin/pip"), "freeze"], env=runtime.env,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    installed = {normal(n) + "==" + v for n, _, v in (line.partition("==") for line in freeze if "==" in line)}
    locked_text = (stages["build"].root / "src/wheels/requirements.txt").read_text()
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s;]+)( ;)?", locked_text, re.M)
    assert installed <= {normal(n) + "==" + v for n, v, _ in pins}
    # every pin without an environment marker is installed (a marked pin is for another Python or platform)
    assert {normal(n) + "==" + v for n, v, marked in pins if not marked} <= installed
    assert [line.partition(" @ ")[0] for line in freeze if " @ " in line] == ["aura"]

    port = free_port()
    env = {**runtime.env, "AURA_AUTH__JWT_SECRET": SECRET, "AURA_SERVER__PORT": str(port)}
    (runtime.root / "workspace").mkdir(exist_ok=True)
    process = subprocess.Popen(runtime.command, env=env, cwd=runtime.root / "app", stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the image's aura never answered /health"
            time.sleep(0.1)  # start-up poll with a deadline
        health = subprocess.run(runtime.healthcheck, env=env, timeout=10, check=False)
        assert health.returncode == 0
        response = httpx.post(f"http://127.0.0.1:{port}/aura/test/stream",
                              json={"prompt": '@answer {"text": "from the image", "chunks": 2}'},
                              headers={"Authorization": f"Bearer {token()}"}, timeout=30)
        assert response.status_code == 200
        assert '"status":"completed"' in response.text and response.text.endswith("data: [DONE]\n\n")
    finally:
        process.terminate()
        process.wait(15)
