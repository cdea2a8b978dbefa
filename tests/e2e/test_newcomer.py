"""What a newcomer types first, and gets wrong: each mistake ends in one clear line and a non-zero exit,
never a traceback; the client commands survive a real approval wait with heartbeats."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.aura_process import SOURCE_ROOT, AuraProcess
from tests.redis_server import free_port
from tests.sse_client import open_run
from tests.support import SECRET, bearer, git, token


def cli_environment(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AURA_")}
    env["PYTHONPATH"] = os.pathsep.join([str(SOURCE_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(variables)
    return env


def run_cli(*args: str, timeout: float = 30, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=cli_environment(**variables),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_port_already_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--host", "127.0.0.1", "--port", str(port), AURA_AUTH__JWT_SECRET=SECRET)
    assert result.returncode == 2
    assert one_line(result.stderr) == f"aura: cannot start: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_a_host_that_does_not_resolve_is_one_line() -> None:
    result = run_cli("serve", "--host", "no-such-host.invalid", "--port", str(free_port()),
                     AURA_AUTH__JWT_SECRET=SECRET)
    assert result.returncode == 2
    assert re.fullmatch(r"aura: cannot start: cannot listen on no-such-host\.invalid:\d+: .+", one_line(result.stderr))


def test_a_bad_log_level_is_one_line() -> None:
    result = run_cli("serve", AURA_AUTH__JWT_SECRET=SECRET, AURA_LOG__LEVEL="LOUD")
    assert result.returncode == 2
    assert one_line(result.stderr) == ("aura: cannot start: AURA_LOG__LEVEL: Input should be 'DEBUG', 'INFO', "
                                       "'WARNING', 'ERROR' or 'CRITICAL'")


def test_a_lower_case_log_level_is_taken() -> None:
    from app.settings import load_settings

    assert load_settings(log={"level": "debug"}).log.level == "DEBUG"


def test_a_settings_file_that_is_missing_or_broken_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    result = run_cli("serve", AURA_AUTH__JWT_SECRET=SECRET, AURA_CONFIG_FILE=str(missing))
    assert result.returncode == 2
    assert one_line(result.stderr) == (f"aura: cannot start: the settings file {missing} (AURA_CONFIG_FILE) "
                                       "does not exist or is not a file")
    broken = tmp_path / "broken.yaml"
    broken.write_text("server:\n  port: [9000\n")
    result = run_cli("serve", AURA_AUTH__JWT_SECRET=SECRET, AURA_CONFIG_FILE=str(broken))
    assert result.returncode == 2
    assert one_line(result.stderr) == f"aura: cannot start: the settings file {broken} is not valid YAML (line 3)"


def test_an_invalid_setting_names_its_variable() -> None:
    result = run_cli("serve", AURA_AUTH__JWT_SECRET=SECRET, AURA_SERVER__PORT="ninety")
    assert result.returncode == 2
    assert one_line(result.stderr) == ("aura: cannot start: AURA_SERVER__PORT: Input should be a valid integer, "
                                       "unable to parse string as an integer")


def test_unknown_aura_variables_are_reported_at_start_up(start_aura: Callable[..., AuraProcess]) -> None:
    aura = start_aura(env={"AURA_SERVER__PROT": "9001", "AURA_SOMETHING_ELSE": "x"})
    aura.stop()
    log = aura.logs()
    assert "aura: warning: AURA_SERVER__PROT is not a setting (did you mean AURA_SERVER__PORT?); it is ignored\n" in log
    assert "aura: warning: AURA_SOMETHING_ELSE is not a setting; it is ignored\n" in log


def test_stream_against_a_stopped_server_is_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli("stream", "hello", AURA_URL=url, AURA_TOKEN=token())
    assert result.returncode == 1
    assert one_line(result.stderr) == f"aura: cannot reach {url}: is the service running? (Connection refused)"
    result = run_cli("requests", AURA_URL=url, AURA_TOKEN=token())
    assert result.returncode == 1
    assert one_line(result.stderr) == f"aura: cannot reach {url}: is the service running? (Connection refused)"


def test_ctrl_c_in_stream_is_one_line(start_aura: Callable[..., AuraProcess], e2e_workspace: Path) -> None:
    aura = start_aura()
    (e2e_workspace / "repo" / "f.txt").write_text("x\n")
    git(e2e_workspace / "repo", "add", "f.txt")
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "stream",
                                '@git_commit {"repo_path": "repo", "message": "m"}'],
                               env=cli_environment(AURA_URL=aura.url, AURA_TOKEN=token(), PYTHONUNBUFFERED="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if "WAITING FOR APPROVAL" in line:
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert re.fullmatch(r"aura: interrupted: stopped reading run run_[0-9a-f]{32}", one_line(err))


async def test_stream_survives_heartbeats_through_an_approval_wait(start_aura: Callable[..., AuraProcess],
                                                                   e2e_workspace: Path) -> None:
    aura = start_aura(env={"AURA_STREAM__HEARTBEAT_SECONDS": "0.05"})
    repo = e2e_workspace / "repo"
    (repo / "f.txt").write_text("x\n")
    git(repo, "add", "f.txt")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "stream", '@git_commit {"repo_path": "repo", "message": "heartbeats"}',
        env=cli_environment(AURA_URL=aura.url, AURA_TOKEN=token(), PYTHONUNBUFFERED="1"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    run_id = request_id = None
    while request_id is None:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert line, "aura stream ended before the approval"
        run_id = run_id or (re.search(r"/aura/runs/(run_\w+)/events", line) or [None, None])[1]
        found = re.search(r"WAITING FOR APPROVAL (req_\w+)", line)
        request_id = found.group(1) if found else None
    headers = {"Authorization": f"Bearer {token()}"}
    async with httpx.AsyncClient(base_url=aura.url, timeout=10) as client:
        # a second reader of the same run: once it has had three heartbeats, the command line's older
        # connection, on the same interval, has had them too
        async with client.stream("GET", f"/aura/runs/{run_id}/events", headers=headers) as follower:
            pings = 0
            async for text in follower.aiter_text():
                pings += text.count(": ping")
                if pings >= 3:
                    break
        assert process.returncode is None, "aura stream stopped at a heartbeat"
        approved = await client.post(f"/aura/hitl/approve/{request_id}", headers=headers)
        assert approved.status_code == 200
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()
    assert "[DONE]" not in out.decode() and '"status": "completed"' in out.decode()
    assert git(repo, "log", "-1", "--format=%s") == "heartbeats"


async def test_requests_prints_readable_expiry_times(start_aura: Callable[..., AuraProcess],
                                                     e2e_workspace: Path) -> None:
    aura = start_aura()
    repo = e2e_workspace / "repo"
    (repo / "f.txt").write_text("x\n")
    git(repo, "add", "f.txt")
    async with httpx.AsyncClient(base_url=aura.url, timeout=10) as client:
        async with open_run(client, {"prompt": '@git_commit {"repo_path": "repo", "message": "m"}'}, bearer()) as run:
            request_id = (await run.until("hitl"))["data"]["requestId"]
            result = await asyncio.to_thread(run_cli, "requests", AURA_URL=aura.url, AURA_TOKEN=token())
            assert result.returncode == 0
            assert re.fullmatch(rf"{request_id}  git_commit  expires \d\d:\d\d:\d\d \(in [45]m \d+s\)  .+\n",
                                result.stdout)


@pytest.mark.parametrize("host", ["127.0.0.1"])
def test_dev_mode_listens_on_loopback_unless_told(host: str) -> None:
    import argparse

    from app.cli import _settings_for_serve

    saved = {k: v for k, v in os.environ.items() if k.startswith("AURA_")}
    try:
        for name in saved:
            del os.environ[name]
        settings = _settings_for_serve(argparse.Namespace(dev=True, host=None, port=None))
        assert settings.server.host == host
        os.environ["AURA_SERVER__HOST"] = "0.0.0.0"
        assert _settings_for_serve(argparse.Namespace(dev=True, host=None, port=None)).server.host == "0.0.0.0"
        assert _settings_for_serve(argparse.Namespace(dev=True, host="::1", port=None)).server.host == "::1"
    finally:
        for name in [k for k in os.environ if k.startswith("AURA_")]:
            del os.environ[name]
        os.environ.update(saved)


def test_dev_mode_brings_the_demo_repository_the_readme_uses() -> None:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--dev", "--port", str(port)],
                               env=cli_environment(PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert process.stderr is not None
        banner = []
        for line in process.stderr:
            banner.append(line)
            if "open http://" in line:
                break
        text = "".join(banner)
        workspace = Path(re.search(r"workspace=(\S+) \(throw-away, with a repository demo\)", text)[1])
        dev_token = re.search(r"export AURA_TOKEN=(\S+)", text)[1]
        assert f"Aura dev mode on 127.0.0.1:{port}" in text
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)  # start-up poll with a deadline
        demo = run_cli("stream", '@git_status {"repo_path": "demo"}', AURA_URL=url, AURA_TOKEN=dev_token)
        assert demo.returncode == 0, demo.stderr
        assert "tool git_status success" in demo.stdout
        assert "On branch main; 1 unstaged, 1 untracked." in demo.stdout
        keywords = run_cli("stream", "What changed in this repo?", AURA_URL=url, AURA_TOKEN=dev_token)
        assert keywords.returncode == 0, keywords.stdout + keywords.stderr
        assert workspace.is_dir()
    finally:
        process.terminate()
        process.wait(15)
    assert not workspace.exists()  # thrown away with the process
