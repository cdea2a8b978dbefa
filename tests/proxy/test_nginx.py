"""Aura behind a real nginx with nginx's default buffering on.

- Events pass nginx one by one because Aura sends `X-Accel-Buffering: no`: the `start` and `hitl`
  events of a run parked at an approval are read through nginx while the run still waits, which
  a buffering proxy makes impossible. Control: a location that ignores that header holds every
  byte back until the run has ended.
- A long approval wait survives a `proxy_read_timeout` of 1 s because Aura sends a heartbeat every
  0.3 s. Control: a read timeout below the heartbeat interval cuts the waiting stream.
- The gateway's route `/api/aura/**` -> `/aura/**` and its 256 KiB body limit, and the shipped
  deploy/nginx/aura.conf in front of two instances on one Redis.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.aura_process import AuraProcess, free_port
from tests.proxy.nginx_process import SHIPPED_SITE, NginxProcess, shipped_site
from tests.redis_server import RedisServer
from tests.sse_client import RunReader
from tests.support import Frame, FrameParser, bearer, events_of, git, make_repo, parse_sse

HEARTBEAT_SECONDS = 0.3
READ_TIMEOUT_SECONDS = 1.0  # proxy_read_timeout of /api/aura/ in config/nginx-test.conf.template
STREAM = "/api/aura/test/stream"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("proxy") / "workspace"
    make_repo(root / "repo")
    return root


@pytest.fixture(scope="module")
def aura(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuraProcess]:
    process = AuraProcess(workspace=workspace, log_path=tmp_path_factory.mktemp("aura") / "aura.log",
                          env={"AURA_STREAM__HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS)})
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def nginx(aura: AuraProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxProcess]:
    proxy = NginxProcess(directory=tmp_path_factory.mktemp("nginx"), aura_port=aura.port).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def commit_prompt(message: str) -> str:
    return "@git_commit " + json.dumps({"repo_path": "repo", "message": message})


def stage(workspace: Path, name: str) -> Path:
    repo = workspace / "repo"
    (repo / name).write_text(f"{name}\n")
    git(repo, "add", name)
    return repo


@asynccontextmanager
async def run_through(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> AsyncIterator[RunReader]:
    async with aconnect_sse(client, "POST", path, json=body, headers=bearer()) as source:
        if source.response.status_code != 200:
            await source.response.aread()
            raise AssertionError(f"HTTP {source.response.status_code}: {source.response.text}")
        yield RunReader(source)


async def wait_for_pending(client: httpx.AsyncClient, user: str, within: float = 10.0) -> dict[str, Any]:
    """The user's one pending approval request, read directly from Aura's approval API."""
    deadline = time.monotonic() + within
    while True:
        listed = (await client.get("/aura/hitl/requests", headers=bearer(user))).json()["requests"]
        if listed or time.monotonic() > deadline:
            assert len(listed) == 1, listed
            record: dict[str, Any] = listed[0]
            return record
        await asyncio.sleep(0.05)  # a poll with a deadline for the run to park, not a wait for a result


class FrameReader:
    """Raw SSE frames of a response, heartbeat comments included, one at a time as they arrive."""

    def __init__(self, response: httpx.Response) -> None:
        self._pieces = response.aiter_text().__aiter__()
        self._buffer = ""
        self._parser = FrameParser()

    async def next(self) -> Frame:
        while True:
            while "\n" not in self._buffer:
                self._buffer += await self._pieces.__anext__()
            line, self._buffer = self._buffer.split("\n", 1)
            if (frame := self._parser.line(line)) is not None:
                return frame

    async def until_event(self, event_type: str) -> Frame:
        while (frame := await self.next()).event != event_type:
            assert frame.event != "end", f"the run ended before {event_type}: {frame.data}"
        return frame


async def test_events_pass_nginx_one_by_one_thanks_to_x_accel_buffering(aura: AuraProcess, nginx: NginxProcess,
                                                                          workspace: Path) -> None:
    repo = stage(workspace, "one-by-one.txt")
    async with httpx.AsyncClient(base_url=nginx.url, timeout=10) as client:
        async with run_through(client, STREAM, {"prompt": commit_prompt("One by one")}) as run:
            headers = run.response.headers
            assert headers["content-type"] == "text/event-stream; charset=utf-8"
            assert headers["cache-control"] == "no-cache"
            assert "x-accel-buffering" not in headers  # nginx acted on it and kept it to itself
            start = await run.next()
            assert start is not None and start["type"] == "start"
            hitl = await run.until("hitl")
            # Read through nginx while the run is parked at the approval that only this test can
            # give: with nginx buffering the response, neither event could have arrived yet.
            request_id = hitl["data"]["requestId"]
            record = await client.get(f"/api/aura/hitl/requests/{request_id}", headers=bearer())
            assert record.status_code == 200 and record.json()["status"] == "pending"
            approved = await client.post(f"/api/aura/hitl/approve/{request_id}", headers=bearer())
            assert approved.status_code == 200 and approved.json()["status"] == "approved"
            events = await run.rest()
    assert run.done
    assert events[0]["type"] == "start" and events[-1]["type"] == "end"
    assert events[-1]["data"]["status"] == "completed"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert git(repo, "log", "-1", "--format=%s") == "One by one"


async def test_without_x_accel_buffering_nginx_holds_everything_back_until_the_end(
        aura: AuraProcess, nginx: NginxProcess, workspace: Path) -> None:
    """The control: the same run through a location that ignores Aura's X-Accel-Buffering. nginx
    buffers the body, and its `postpone_output` holds even the response header until there is
    more to send, so nothing at all reaches the client while the run waits."""
    stage(workspace, "buffered.txt")
    user = "buffered-user"  # alone with its pending approval, so the direct lookup finds this run
    arrivals: list[tuple[float, bytes]] = []
    answered_at: list[float] = []

    async def through_nginx(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/buffered" + STREAM, json={"prompt": commit_prompt("Buffered")},
                                 headers=bearer(user)) as response:
            answered_at.append(time.monotonic())
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                arrivals.append((time.monotonic(), chunk))

    async with httpx.AsyncClient(base_url=nginx.url, timeout=30) as via_nginx, \
            httpx.AsyncClient(base_url=aura.url, timeout=10) as direct:
        client_task = asyncio.create_task(through_nginx(via_nginx))
        pending = await wait_for_pending(direct, user)
        # Follow the same run directly on Aura: it has written `start` ... `hitl` and keeps writing
        # heartbeats while it waits; none of it has come out of nginx.
        async with direct.stream("GET", f"/aura/runs/{pending['runId']}/events", headers=bearer(user)) as live:
            reader = FrameReader(live)
            hitl = (await reader.until_event("hitl")).payload
            pings = 0
            while pings < 3:
                pings += (await reader.next()).comment
        assert (answered_at, arrivals) == ([], [])
        approved_at = time.monotonic()
        approved = await direct.post(f"/aura/hitl/approve/{hitl['data']['requestId']}", headers=bearer(user))
        assert approved.status_code == 200
        await client_task
    assert answered_at[0] > approved_at and arrivals[0][0] > approved_at
    events = events_of(parse_sse(b"".join(chunk for _, chunk in arrivals).decode("utf-8")))
    assert events[0]["type"] == "start" and hitl["seq"] in [e["seq"] for e in events if e["type"] == "hitl"]
    assert events[-1]["data"]["status"] == "completed"


async def test_a_long_approval_wait_survives_a_short_proxy_read_timeout(aura: AuraProcess, nginx: NginxProcess,
                                                                       workspace: Path) -> None:
    repo = stage(workspace, "long-wait.txt")
    async with httpx.AsyncClient(base_url=nginx.url, timeout=10) as client, \
            client.stream("POST", STREAM, json={"prompt": commit_prompt("Long wait")}, headers=bearer()) as response:
        assert response.status_code == 200
        reader = FrameReader(response)
        hitl = (await reader.until_event("hitl")).payload
        parked_at = time.monotonic()
        pings = 0
        while pings < 10:
            frame = await reader.next()
            assert frame.event != "end", frame.data
            pings += frame.comment
        waited = time.monotonic() - parked_at
        # Ten heartbeats at least 0.3 s apart: the stream stayed open for well over twice nginx's
        # 1 s read timeout, with nothing but heartbeats from Aura.
        assert waited > 2 * READ_TIMEOUT_SECONDS
        approved = await client.post(f"/api/aura/hitl/approve/{hitl['data']['requestId']}", headers=bearer())
        assert approved.status_code == 200
        rest = []
        while (frame := await reader.next()).data != "[DONE]":
            if not frame.comment:
                rest.append(frame.payload)
    assert rest[-1]["type"] == "end" and rest[-1]["data"]["status"] == "completed"
    assert "upstream timed out" not in nginx.error_log()
    assert git(repo, "log", "-1", "--format=%s") == "Long wait"


async def test_a_read_timeout_below_the_heartbeat_interval_cuts_the_waiting_stream(
        aura: AuraProcess, nginx: NginxProcess, workspace: Path) -> None:
    stage(workspace, "impatient.txt")
    received = b""
    async with httpx.AsyncClient(base_url=nginx.url, timeout=10) as client, \
            client.stream("POST", "/impatient" + STREAM, json={"prompt": commit_prompt("Impatient")},
                          headers=bearer()) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):  # nginx dropped the connection mid-body
            async for chunk in response.aiter_raw():
                received += chunk
    assert b"data: [DONE]" not in received
    assert "upstream timed out (110: Connection timed out) while reading upstream" in nginx.error_log()


async def test_the_route_strips_the_prefix_and_keeps_the_gateway_body_limit(aura: AuraProcess,
                                                                            nginx: NginxProcess) -> None:
    async with httpx.AsyncClient(base_url=nginx.url, timeout=10) as client:
        # /api/aura/hitl/requests/x arrives as /aura/hitl/requests/x: Aura's own problem answers it
        missing = await client.get("/api/aura/hitl/requests/req_unknown", headers=bearer())
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        assert missing.json()["code"] == "approval_not_found"
        anonymous = await client.get("/api/aura/hitl/requests/req_unknown")
        assert anonymous.status_code == 401 and anonymous.json()["code"] == "missing_token"
        assert anonymous.headers["www-authenticate"].startswith("Bearer ")
        # nothing but /api/aura/ is routed to Aura
        unrouted = await client.get("/aura/hitl/requests/req_unknown", headers=bearer())
        assert unrouted.status_code == 404 and unrouted.headers["content-type"] == "text/html"
        # the gateway's 256 KiB limit: nginx answers 413 itself; a smaller body reaches Aura
        too_big = await client.post(STREAM, json={"prompt": "x" * (256 * 1024)}, headers=bearer())
        assert too_big.status_code == 413 and too_big.headers["content-type"] == "text/html"
        fits = await client.post(STREAM, json={"prompt": "x" * (200 * 1024)}, headers=bearer())
        assert fits.status_code == 422 and fits.json()["code"] == "prompt_too_long"


async def test_the_shipped_site_config_in_front_of_two_instances(redis_server: RedisServer,
                                                                 tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    repo = make_repo(workspace / "repo")
    instances = [AuraProcess(workspace=workspace, log_path=tmp_path / f"aura-{i}.log", redis_url=redis_server.url,
                             env={"AURA_RUNS__INSTANCE_ID": f"aura-{i}"}) for i in (1, 2)]
    site_port = free_port()
    proxy = NginxProcess(directory=tmp_path / "nginx", aura_port=instances[0].port,
                         sites={SHIPPED_SITE.name: shipped_site(site_port, [a.port for a in instances])})
    try:
        for instance in instances:
            instance.start()
        proxy.start()
        stage(workspace, "shipped.txt")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{site_port}", timeout=10) as client:
            async with run_through(client, STREAM, {"prompt": commit_prompt("Through the shipped config")}) as run:
                assert "x-accel-buffering" not in run.response.headers
                hitl = await run.until("hitl")
                request_id = hitl["data"]["requestId"]
                # round robin: these land on both instances, and both see the same pending request
                for _ in instances:
                    record = await client.get(f"/api/aura/hitl/requests/{request_id}", headers=bearer())
                    assert record.status_code == 200 and record.json()["status"] == "pending"
                approved = await client.post(f"/api/aura/hitl/approve/{request_id}", headers=bearer())
                assert approved.status_code == 200
                events = await run.rest()
            assert run.done and events[-1]["data"]["status"] == "completed"
            too_big = await client.post(STREAM, json={"prompt": "x" * (256 * 1024)}, headers=bearer())
            assert too_big.status_code == 413
    finally:
        proxy.stop()
        for instance in instances:
            instance.stop()
    assert git(repo, "log", "-1", "--format=%s") == "Through the shipped config"
