"""The approval commands of the command line against the real service."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.aura_process import AuraProcess
from tests.defaults import DEFAULTS
from tests.sse_client import open_run
from tests.support import bearer, git, token


async def aura_cli(aura: AuraProcess, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AURA_")}
    env.update({"AURA_URL": aura.url, "AURA_TOKEN": token()})
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "app.cli", *args, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_requests_approve_and_reject_from_the_command_line(start_aura: Callable[..., AuraProcess],
                                                                 e2e_workspace: Path) -> None:
    aura = start_aura()
    repo = e2e_workspace / "repo"
    (repo / "f.txt").write_text("x\n")
    git(repo, "add", "f.txt")
    assert (await aura_cli(aura, "requests"))[:2] == (0, "No pending approvals.\n")
    async with httpx.AsyncClient(base_url=aura.url, timeout=10) as client:
        async with open_run(client, {"prompt": '@git_commit {"repo_path": "repo", "message": "cli"}'},
                            bearer()) as run:
            hitl = await run.until("hitl")
            request_id = hitl["data"]["requestId"]
            code, out, _ = await aura_cli(aura, "requests")
            assert code == 0 and out.startswith(f"{request_id}  git_commit  expires ")
            code, out, _ = await aura_cli(aura, "approve", request_id)
            assert (code, out) == (0, f"{request_id} approved by alice\n")
            code, _, err = await aura_cli(aura, "reject", request_id, "--reason", "late")
            assert code == 4 and "already_decided" in err and "(already approved)" in err
            events = await run.rest()
    assert events[-1]["data"]["status"] == "completed"
    assert git(repo, "log", "-1", "--format=%s") == "cli"
    code, _, err = await aura_cli(aura, "approve", "req_unknown")
    assert code == 3 and "approval_not_found" in err


def test_aura_serve_listens_with_the_configured_backlog(start_aura: Callable[..., AuraProcess]) -> None:
    """A burst of new streams (a gateway reconnecting its clients at once) waits in the listening
    socket's queue instead of being reset: `aura serve` listens with the settings' backlog, not
    hypercorn's 100. `ss` shows a listening socket's backlog as its Send-Q."""
    aura = start_aura()
    configured = start_aura(env={"AURA_SERVER__LISTEN_BACKLOG": "1500"})
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())

    def backlog(port: int) -> int:
        listed = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True)
        [line] = listed.stdout.splitlines()
        return int(line.split()[2])

    assert backlog(aura.port) == min(DEFAULTS.server.listen_backlog, somaxconn)
    assert backlog(configured.port) == min(1500, somaxconn)
