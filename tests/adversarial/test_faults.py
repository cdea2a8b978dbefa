"""Faults, each against the real service (hypercorn subprocess) and a redis-server of the test's own:
Redis down at start, stopped mid-run, restarted during an approval wait; the model server failing,
slow or cutting its stream; a tool timing out."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from tests.adversarial.conftest import RawStream, raw_stream
from tests.aura_process import AuraProcess, free_port
from tests.contract.chat_server import ChatServer, Reply, Stream, content_frames
from tests.fake_dwp import FakeDwp, FakeResponse
from tests.redis_server import RedisServer, start_redis_server, stop_redis_server
from tests.support import bearer, git

COMMIT = '@git_commit {"repo_path": "repo", "message": "Add feature"}'
PROBLEM_KEYS = {"type", "title", "status", "code"}


def stage(workspace: Path) -> None:
    repo = workspace / "repo"
    (repo / "feature.txt").write_text("x\n")
    git(repo, "add", "feature.txt")


def tail_is_error_end_done(stream: RawStream, error_type: str | None = None) -> dict:
    events = stream.events
    assert [e["type"] for e in events[-2:]] == ["error", "end"], [e["type"] for e in events]
    if error_type is not None:
        assert events[-2]["data"]["errorType"] == error_type, events[-2]
    assert stream.body.endswith("data: [DONE]\n\n")
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    return events[-2]


async def test_redis_unavailable_at_start_is_not_ready_and_refuses_streams_without_hanging(
        start_aura: Callable[..., AuraProcess]) -> None:
    aura = start_aura(redis_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    async with httpx.AsyncClient(base_url=aura.url, timeout=10) as client:
        started = time.monotonic()
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.headers["content-type"] == "application/problem+json"
        assert ready.json()["code"] == "not_ready" and PROBLEM_KEYS <= ready.json().keys()
        refused = await client.post("/aura/test/stream", json={"prompt": "hello"}, headers=bearer())
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        problem = refused.json()
        assert problem["code"] == "store_unavailable" and problem["status"] == 503
        assert PROBLEM_KEYS <= problem.keys() and refused.headers["retry-after"] == "5"
        assert time.monotonic() - started < 5  # refused promptly, no hang on the dead store
        assert (await client.get("/health")).status_code == 200  # liveness is not readiness


async def test_redis_stopped_mid_run_ends_the_stream_with_a_typed_error(
        start_aura: Callable[..., AuraProcess], own_redis: list[RedisServer], e2e_workspace: Path) -> None:
    # The run is writing when Redis stops: an answer of 300 chunks, one every 10 ms. (A run parked
    # on an approval writes nothing while it waits; it survives an outage, see the restart test.)
    # An event the log refused reaches no client (a resume could not find it), so the connection
    # ends with a reconnect hint; the resume is refused, typed and retryable: the store is gone.
    aura = start_aura(redis_url=own_redis[0].url, env={"AURA_HITL__RECHECK_SECONDS": "0.5"})
    body = {"prompt": '@answer {"text": "' + "x" * 300 + '", "chunks": 300, "intervalMs": 10}'}
    async with httpx.AsyncClient(base_url=aura.url, timeout=30) as client:
        async with raw_stream(client, body, bearer()) as stream:
            await stream.until("event: content", 10)
            stop_redis_server(own_redis[0])
            started = time.monotonic()
            await stream.until("retry: 1000\n", 15)  # the reconnect hint
        assert "reconnect with Last-Event-ID" in stream.body and "data: [DONE]" not in stream.body
        seqs = [e["seq"] for e in stream.events]
        assert seqs == list(range(1, len(seqs) + 1))  # what reached the client is gapless
        chunks = [e for e in stream.events if e["type"] == "content" and e["data"]["chunk"]]
        assert 0 < len(chunks) < 300  # it stopped mid-answer
        last_id = f"{stream.events[-1]['runId']}:{seqs[-1]}"
        resumed = await client.post("/aura/test/stream", json=body, headers={**bearer(), "Last-Event-ID": last_id})
        elapsed = time.monotonic() - started
        assert resumed.status_code == 503 and resumed.json()["code"] == "store_unavailable"
        assert elapsed < 15
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["code"] == "not_ready"


async def test_redis_restarted_during_an_approval_wait_the_wait_survives_and_approval_resumes(
        start_aura: Callable[..., AuraProcess], own_redis: list[RedisServer], e2e_workspace: Path) -> None:
    """A restart of a persistent Redis (the keys come back, as with AOF/RDB): the run keeps waiting,
    its subscription reconnects, and an approval through Aura's API afterwards runs the tool."""
    stage(e2e_workspace)
    aura = start_aura(redis_url=own_redis[0].url, env={"AURA_HITL__RECHECK_SECONDS": "0.5"})
    async with httpx.AsyncClient(base_url=aura.url, timeout=30) as client:
        async with raw_stream(client, {"prompt": COMMIT}, bearer()) as stream:
            await stream.until("event: hitl", 10)
            hitl = next(e for e in stream.events if e["type"] == "hitl")
            request_id = hitl["data"]["requestId"]
            before = redis.Redis.from_url(own_redis[0].url)
            saved = {key: (before.dump(key), max(before.pttl(key), 0)) for key in before.keys("*")}
            before.close()
            stop_redis_server(own_redis[0])
            own_redis[0] = start_redis_server(own_redis[0].directory, own_redis[0].port)
            after = redis.Redis.from_url(own_redis[0].url)
            for key, (value, ttl) in saved.items():
                if value is not None:
                    after.restore(key, ttl, value, replace=True)
            deadline = time.monotonic() + 15
            while (await client.get("/ready")).status_code != 200:
                assert time.monotonic() < deadline, "Aura did not become ready after the restart"
                await stream_idle()
            pending = await client.get(f"/aura/hitl/requests/{request_id}", headers=bearer())
            assert pending.status_code == 200 and pending.json()["status"] == "pending"
            approved = await client.post(f"/aura/hitl/approve/{request_id}", headers=bearer())
            assert approved.status_code == 200, approved.text
            events = await stream.done(20)
        assert [e["data"]["status"] for e in events if e["type"] == "tool_execution"] == \
            ["pending", "running", "success"]
        assert events[-1]["type"] == "end" and events[-1]["data"]["status"] == "completed"
        assert git(e2e_workspace / "repo", "log", "-1", "--format=%s") == "Add feature"
        assert json.loads(after.get(f"hitl:request:{request_id}"))["status"] == "approved"
        after.close()


async def stream_idle() -> None:
    import asyncio
    await asyncio.sleep(0.1)  # bounded by the deadline of the caller's poll


def model_env(chat: ChatServer, **extra: str) -> dict[str, str]:
    return {"AURA_MODEL__PROVIDER": "openai", "AURA_MODEL__BASE_URL": f"{chat.url}/v1",
            "AURA_MODEL__API_KEY": "sk-test", "AURA_MODEL__NAME": "gpt-test", "AURA_MODEL__MAX_RETRIES": "1",
            **extra}


async def run_against_model(start_aura: Callable[..., AuraProcess], redis_url: str, chat: ChatServer,
                            timeout: float, **env: str) -> tuple[RawStream, float]:  # noqa: ASYNC109
    aura = start_aura(redis_url=redis_url, env=model_env(chat, **env))
    async with httpx.AsyncClient(base_url=aura.url, timeout=30) as client:
        started = time.monotonic()
        async with raw_stream(client, {"prompt": "Say hello"}, bearer()) as stream:
            await stream.done(timeout)
        return stream, time.monotonic() - started


async def test_model_server_failing_ends_with_a_typed_model_error(
        start_aura: Callable[..., AuraProcess], own_redis: list[RedisServer]) -> None:
    async with ChatServer() as chat:
        chat.enqueue(*[Reply.error(500, "The server had an error") for _ in range(4)])
        stream, elapsed = await run_against_model(start_aura, own_redis[0].url, chat, 20)
        error = tail_is_error_end_done(stream, "llm_unavailable")
        assert error["data"] == {"errorType": "llm_unavailable", "message": "The model is unavailable (HTTP 500).",
                                 "retryable": True}
        assert stream.events[-1]["data"]["status"] == "failed"
        assert 1 <= len(chat.requests) <= 4 and elapsed < 20


async def test_model_server_cutting_its_stream_ends_with_a_typed_error(
        start_aura: Callable[..., AuraProcess], own_redis: list[RedisServer]) -> None:
    async with ChatServer() as chat:
        frames = content_frames(["Hel", "lo ", "there"])
        chat.enqueue(*[Stream(frames, cut_after=2) for _ in range(4)])
        stream, elapsed = await run_against_model(start_aura, own_redis[0].url, chat, 20)
        error = tail_is_error_end_done(stream, "llm_unavailable")
        assert error["data"]["message"] == "The model's answer stream was cut off."
        assert elapsed < 20


async def test_a_slow_model_server_is_timed_out(
        start_aura: Callable[..., AuraProcess], own_redis: list[RedisServer]) -> None:
    async with ChatServer() as chat:
        frames = content_frames(["Hel", "lo"])
        chat.enqueue(*[Stream(frames, stall_after=1) for _ in range(4)])
        stream, elapsed = await run_against_model(start_aura, own_redis[0].url, chat, 20,
                                                  AURA_MODEL__TIMEOUT_SECONDS="1")
        error = tail_is_error_end_done(stream, "llm_timeout")
        assert error["data"]["message"] == "The model did not answer in time."
        assert elapsed < 15


async def test_a_tool_timing_out_fails_the_call_not_the_service(
        start_aura: Callable[..., AuraProcess], own_redis: list[RedisServer]) -> None:
    with FakeDwp() as dwp:
        dwp.respond("GET", "/api/slow", FakeResponse.hanging())
        aura = start_aura(redis_url=own_redis[0].url, env={
            "AURA_TOOLS__DWP_BASE_URL": dwp.base_url, "AURA_TOOLS__DWP_TIMEOUT_SECONDS": "30",
            "AURA_AGENT__TOOL_TIMEOUT_SECONDS": "1"})
        async with httpx.AsyncClient(base_url=aura.url, timeout=30) as client:
            started = time.monotonic()
            async with raw_stream(client, {"prompt": '@dwp_request {"method": "GET", "path": "/api/slow"}'},
                                  bearer()) as stream:
                events = await stream.done(15)
            elapsed = time.monotonic() - started
            tools = [e["data"] for e in events if e["type"] == "tool_execution"]
            assert (tools[-1]["status"], tools[-1]["error"]) == ("failed", "dwp_request took longer than 1 s.")
            assert elapsed < 10
            assert len(dwp.requests) == 1
            ok = await client.post("/aura/test/stream", json={"prompt": "hello"}, headers=bearer())
            assert ok.status_code == 200 and ok.text.endswith("data: [DONE]\n\n")
