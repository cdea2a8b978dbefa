"""POST /aura/test/stream through Quart's test client: events, validation and limits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from quart.typing import TestClientProtocol

from tests.support import bearer, events_of, git, parse_sse

STREAM = "/aura/test/stream"


async def stream(client: TestClientProtocol, body: Any, headers: dict[str, str] | None = None) -> Any:
    return await client.post(STREAM, json=body, headers={**bearer(), **(headers or {})})


async def run_events(client: TestClientProtocol, body: Any, **kw: Any) -> list[dict[str, Any]]:
    response = await stream(client, body, **kw)
    assert response.status_code == 200, await response.get_data(as_text=True)
    return events_of(parse_sse(await response.get_data(as_text=True)))


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


async def test_plain_prompt_streams_a_complete_run_with_the_contract_headers(client: TestClientProtocol) -> None:
    response = await stream(client, {"prompt": "Summarise this page", "context": {"title": "Orders"}},
                            {"X-DWP-Source": "frontend", "X-Request-ID": "req-42"})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["X-Request-ID"] == "req-42"
    body = await response.get_data(as_text=True)
    assert body.endswith("\n\ndata: [DONE]\n\n")
    events = events_of(parse_sse(body))
    assert kinds(events)[:2] == ["start", "timeline_step_update"]
    assert kinds(events)[-3:] == ["timeline_step_update", "thought", "end"]
    run_id = response.headers["X-Aura-Run-ID"]
    for e in events:
        assert set(e) == {"type", "version", "seq", "runId", "sessionId", "threadId", "traceId", "timestamp", "data"}
        assert e["runId"] == run_id and e["version"] == "1.0" and isinstance(e["timestamp"], int)
    assert events[0]["data"] == {"message": "Aura started working on your request.",
                                 "resumeUrl": f"/aura/runs/{run_id}/events"}
    plan = [e["data"]["description"] for e in events if e["type"] == "plan_step"]
    assert plan == ["Read the request and the page context", "Summarise the findings for the user"]
    final = [e["data"] for e in events if e["type"] == "content" and not e["data"]["chunk"]]
    chunks = "".join(e["data"]["content"] for e in events if e["type"] == "content" and e["data"]["chunk"])
    assert len(final) == 1 and final[0]["content"] == chunks and "Summarise this page" in chunks
    assert events[-1]["data"] == {"status": "completed", "reason": "completed", "message": "The run completed."}


async def test_trace_id_comes_from_traceparent(client: TestClientProtocol) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    events = await run_events(client, {"prompt": "hi"},
                              headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    assert {e["traceId"] for e in events} == {trace}


async def test_directives_run_real_git_tools_on_the_workspace(client: TestClientProtocol, workspace: Path) -> None:
    (workspace / "repo" / "new.txt").write_text("x\n")
    prompt = '@git_status {"repo_path": "repo"}\n@git_log {"repo_path": "repo", "limit": 1}'
    events = await run_events(client, {"prompt": prompt})
    tools = [(e["data"]["toolName"], e["data"]["status"]) for e in events if e["type"] == "tool_execution"]
    assert tools == [("git_status", "pending"), ("git_status", "running"), ("git_status", "success"),
                     ("git_log", "pending"), ("git_log", "running"), ("git_log", "success")]
    status = next(e["data"] for e in events if e["type"] == "tool_execution" and e["data"]["status"] == "success")
    assert status["toolArgs"] == {"repo_path": "repo"} and status["requiresApproval"] is False
    assert status["result"]["branch"] == "main" and status["result"]["clean"] is False
    assert {"path": "new.txt"}.items() <= status["result"]["entries"][0].items()
    log = [e["data"] for e in events if e["type"] == "tool_execution" and e["data"]["status"] == "success"][1]
    assert log["result"]["commits"][0]["subject"] == "Initial commit"
    answer = next(e["data"]["content"] for e in events if e["type"] == "content" and not e["data"]["chunk"])
    assert "git_status:" in answer and "git_log:" in answer
    assert [e["data"]["status"] for e in events if e["type"] == "plan_step_update"][-1] == "completed"
    assert events[-1]["data"]["status"] == "completed"


async def test_unknown_tool_directive_ends_with_a_clear_error(client: TestClientProtocol) -> None:
    events = await run_events(client, {"prompt": '@drop_database {"name": "prod"}'})
    assert kinds(events)[-2:] == ["error", "end"]
    assert events[-2]["data"]["errorType"] == "unknown_tool" and "drop_database" in events[-2]["data"]["message"]
    assert events[-1]["data"]["status"] == "failed"


async def test_bad_directive_json_ends_with_a_clear_error(client: TestClientProtocol) -> None:
    events = await run_events(client, {"prompt": "hello\n@git_status {repo_path: nope}"})
    assert events[-2]["data"] == {"errorType": "invalid_directive",
                                  "message": "Line 2: the arguments of @git_status are not valid JSON.",
                                  "retryable": False}


@pytest.mark.parametrize("repo_path", ["..", "../..", "/etc", "repo/../../outside"])
async def test_paths_outside_the_workspace_are_refused(client: TestClientProtocol, repo_path: str) -> None:
    events = await run_events(client, {"prompt": f'@git_status {{"repo_path": "{repo_path}"}}'})
    failed = [e["data"] for e in events if e["type"] == "tool_execution" and e["data"]["status"] == "failed"]
    assert len(failed) == 1 and "workspace" in failed[0]["error"]


async def test_symlink_escaping_the_workspace_is_refused(client: TestClientProtocol, workspace: Path,
                                                         tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    git(outside, "init", "-q")
    (workspace / "sneaky").symlink_to(outside)
    events = await run_events(client, {"prompt": '@git_status {"repo_path": "sneaky"}'})
    failed = [e["data"] for e in events if e["type"] == "tool_execution" and e["data"]["status"] == "failed"]
    assert len(failed) == 1 and "workspace" in failed[0]["error"]


@pytest.mark.parametrize(("body", "code", "loc"), [
    ({}, "validation_error", ["prompt"]),
    ({"prompt": ""}, "validation_error", ["prompt"]),
    ({"prompt": "   "}, "validation_error", ["prompt"]),
    ({"prompt": 5}, "validation_error", ["prompt"]),
    ({"prompt": "x", "context": []}, "validation_error", ["context"]),
    ({"prompt": "x", "context": {"selectedItemIds": "a,b"}}, "validation_error", ["context", "selectedItemIds"]),
    ({"prompt": "x", "context": {"metadata": 3}}, "validation_error", ["context", "metadata"]),
    ({"prompt": "x", "thread_id": "has spaces"}, "validation_error", ["thread_id"]),
    ({"prompt": "x", "onDisconnect": "explode"}, "validation_error", ["onDisconnect"]),
    (["prompt"], "validation_error", []),
])
async def test_each_body_rule_answers_422_with_a_problem(client: TestClientProtocol, body: Any, code: str,
                                                         loc: list[str]) -> None:
    response = await stream(client, body)
    assert response.status_code == 422
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = await response.get_json()
    assert problem["code"] == code and problem["status"] == 422 and problem["traceId"]
    if loc:
        assert loc in [e["loc"] for e in problem["errors"]]
    assert "input" not in json.dumps(problem["errors"])


async def test_prompt_longer_than_the_setting_is_422(make_settings: Any) -> None:
    from app.factory import create_app

    app = create_app(make_settings(stream={"max_prompt_chars": 10}))
    response = await app.test_client().post(STREAM, json={"prompt": "x" * 11}, headers=bearer())
    assert response.status_code == 422 and (await response.get_json())["code"] == "prompt_too_long"


async def test_context_limit_counts_real_utf8_bytes(make_settings: Any) -> None:
    from app.factory import create_app

    app = create_app(make_settings(stream={"max_context_bytes": 100}))
    client = app.test_client()
    # 30 three-byte characters: 30 characters but 90 bytes, plus the JSON around them
    fits = {"title": "€" * 25}  # {"title":"…"} = 12 + 75 bytes
    too_big = {"title": "€" * 30}  # 12 + 90 bytes
    ok = await client.post(STREAM, json={"prompt": "x", "context": fits}, headers=bearer())
    assert ok.status_code == 200
    await ok.get_data()
    refused = await client.post(STREAM, json={"prompt": "x", "context": too_big}, headers=bearer())
    assert refused.status_code == 422
    problem = await refused.get_json()
    assert problem["code"] == "context_too_large" and "102 bytes" in problem["detail"]


async def test_context_integers_beyond_64_bits_are_a_typed_422_not_a_500(client: Any) -> None:
    """Found by schemathesis: orjson, which encodes every event, refuses such integers."""
    body = '{"prompt": "x", "context": {"itemId": 18446744073709551616}}'
    refused = await client.post(STREAM, data=body, headers={**bearer(), "Content-Type": "application/json"})
    assert refused.status_code == 422
    assert (await refused.get_json())["code"] == "invalid_context"
    fits = await client.post(STREAM, json={"prompt": "x", "context": {"itemId": 2**63 - 1}}, headers=bearer())
    assert fits.status_code == 200
    await fits.get_data()


async def test_body_larger_than_the_limit_is_413(make_settings: Any) -> None:
    from app.factory import create_app

    app = create_app(make_settings(server={"max_body_bytes": 2048}))
    response = await app.test_client().post(STREAM, data=json.dumps({"prompt": "x" * 5000}),
                                            headers={**bearer(), "Content-Type": "application/json"})
    assert response.status_code == 413
    problem = await response.get_json()
    assert problem["code"] == "payload_too_large" and "xxxx" not in json.dumps(problem)


async def test_body_that_is_not_json_is_a_problem(client: TestClientProtocol) -> None:
    response = await client.post(STREAM, data="{not json", headers={**bearer(), "Content-Type": "application/json"})
    assert response.status_code == 400
    assert (await response.get_json())["code"] == "bad_request"


async def test_invalid_source_header_is_422(client: TestClientProtocol) -> None:
    response = await stream(client, {"prompt": "x"}, {"X-DWP-Source": "SPACESHIP"})
    assert response.status_code == 422 and (await response.get_json())["code"] == "invalid_header"


async def test_source_and_caller_type_reach_the_run_context(client: TestClientProtocol) -> None:
    events = await run_events(client, {"prompt": "x", "context": {"title": "T"}},
                              headers={"X-DWP-Source": "BATCH", "X-DWP-Caller-Type": "scheduler"})
    analysis = next(e["data"] for e in events if e["type"] == "thought")
    assert {"type": "context", "key": "source", "value": "BATCH"} in analysis["sources"]
    assert {"type": "context", "key": "caller_type", "value": "scheduler"} in analysis["sources"]


async def test_health_and_readiness_need_no_token(client: TestClientProtocol) -> None:
    health = await client.get("/health")
    assert health.status_code == 200 and await health.get_json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200 and await ready.get_json() == {"status": "ready"}


async def test_cors_preflight_is_answered_without_authentication(client: TestClientProtocol) -> None:
    response = await client.options(STREAM, headers={"Origin": "http://localhost:4200",
                                                     "Access-Control-Request-Method": "POST"})
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:4200"
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    refused = await client.options(STREAM, headers={"Origin": "https://evil.example",
                                                    "Access-Control-Request-Method": "POST"})
    assert refused.status_code == 403 and "Access-Control-Allow-Origin" not in refused.headers
