"""The real service under hypercorn, over real HTTP: headers, incremental delivery, disconnects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.aura_process import AuraProcess
from tests.sse_client import open_run
from tests.support import bearer, git

COMMIT = '@git_commit {"repo_path": "repo", "message": "Add feature"}'


def stage(workspace: Path) -> Path:
    repo = workspace / "repo"
    (repo / "feature.txt").write_text("x\n")
    git(repo, "add", "feature.txt")
    return repo


async def wait_for_status(client: httpx.AsyncClient, request_id: str, status: str, within: float = 3.0) -> dict:
    deadline = time.monotonic() + within
    while True:
        record = (await client.get(f"/aura/hitl/requests/{request_id}", headers=bearer())).json()
        if record.get("status") == status or time.monotonic() > deadline:
            return record
        await asyncio.sleep(0.05)


async def test_stream_over_real_http(start_aura: Callable[..., AuraProcess], e2e_workspace: Path) -> None:
    aura = start_aura()
    repo = stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=aura.url, timeout=10) as client:
        async with open_run(client, {"prompt": COMMIT}, bearer()) as run:
            headers = run.response.headers
            assert headers["content-type"] == "text/event-stream; charset=utf-8"
            assert headers["cache-control"] == "no-cache"
            assert headers["x-accel-buffering"] == "no"
            assert headers["connection"] == "keep-alive"
            assert run.response.http_version == "HTTP/1.1"
            start = await run.next()
            assert start is not None and start["type"] == "start"
            # the run is parked at the approval: these events arrived while it was still running
            hitl = await run.until("hitl")
            approved = await client.post(f"/aura/hitl/approve/{hitl['data']['requestId']}", headers=bearer())
            assert approved.status_code == 200
            events = await run.rest()
            assert run.done and events[-1]["type"] == "end" and events[-1]["data"]["status"] == "completed"
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert git(repo, "log", "-1", "--format=%s") == "Add feature"


async def test_client_disconnect_cancels_the_run_and_its_approval(start_aura: Callable[..., AuraProcess],
                                                                  e2e_workspace: Path) -> None:
    aura = start_aura(env={"AURA_STREAM__DISCONNECT_GRACE_SECONDS": "0.3"})  # nobody comes back
    stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=aura.url, timeout=10) as client:
        async with open_run(client, {"prompt": COMMIT}, bearer()) as run:
            hitl = await run.until("hitl")
        # leaving the block closed the connection
        started = time.monotonic()
        record = await wait_for_status(client, hitl["data"]["requestId"], "cancelled")
        assert record["status"] == "cancelled"
        assert time.monotonic() - started < 1.8


async def test_heartbeats_flow_while_a_run_waits(start_aura: Callable[..., AuraProcess], e2e_workspace: Path) -> None:
    aura = start_aura(env={"AURA_STREAM__HEARTBEAT_SECONDS": "0.2"})
    stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=aura.url, timeout=10) as client, \
            client.stream("POST", "/aura/test/stream", json={"prompt": COMMIT}, headers=bearer()) as response:
        seen = ""
        async for text in response.aiter_text():
            seen += text
            if seen.count(": ping\n") >= 3:
                break
        assert "event: hitl\n" in seen


def test_dev_mode_starts_without_a_secret_and_prints_a_token(e2e_workspace: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.aura_process import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AURA_")}
    env.update({"AURA_TOOLS__WORKSPACE_ROOT": str(e2e_workspace), "PYTHONUNBUFFERED": "1"})
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--dev", "--port", str(port),
                                "--host", "127.0.0.1"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               text=True, start_new_session=True)
    try:
        assert process.stderr is not None
        token = None
        deadline = time.monotonic() + 20
        for line in process.stderr:
            if line.startswith("eyJ"):
                token = line.strip()
                break
            assert time.monotonic() < deadline
        assert token
        while True:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/aura/test/stream", json={"prompt": "hello"},
                                      headers={"Authorization": f"Bearer {token}"}, timeout=10)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    finally:
        process.terminate()
        process.wait(10)


def test_start_up_refuses_a_missing_secret(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AURA_")}
    result = subprocess.run([sys.executable, "-m", "app.cli", "serve"], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "AURA_AUTH__JWT_SECRET is missing or shorter than 32 bytes" in result.stderr
