"""The approval API next to a live stream, through Quart's test client."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from quart import Quart

from app.factory import create_app
from app.settings import Settings
from tests.http.live import open_stream
from tests.support import bearer, git


def staged_change(workspace: Path) -> Path:
    repo = workspace / "repo"
    (repo / "feature.txt").write_text("new feature\n")
    git(repo, "add", "feature.txt")
    return repo


COMMIT = '@git_commit {"repo_path": "repo", "message": "Add feature"}'


async def test_approve_through_the_api_runs_the_commit(app: Quart, workspace: Path) -> None:
    repo = staged_change(workspace)
    context, live = await open_stream(app, COMMIT)
    hitl = await live.until("hitl")
    request_id, session_id = hitl["data"]["requestId"], hitl["data"]["sessionId"]
    assert hitl["data"]["actionType"] == "git_commit"
    client = app.test_client()

    fetched = await client.get(f"/aura/hitl/requests/{request_id}", headers=bearer())
    record = await fetched.get_json()
    assert fetched.status_code == 200 and isinstance(record, dict)
    assert (record["status"], record["userId"], record["tenantId"], record["toolName"]) == \
        ("pending", "alice", "acme", "git_commit")
    assert record["context"] == {"repo_path": "repo", "message": "Add feature"}

    other_tenant = await client.post(f"/aura/hitl/approve/{request_id}", headers=bearer("alice", "globex"))
    assert other_tenant.status_code == 404 and (await other_tenant.get_json())["code"] == "approval_not_found"
    # A colleague who is not an approver cannot tell this request from an id that does not exist.
    for method, path in (("GET", f"/aura/hitl/requests/{request_id}"), ("POST", f"/aura/hitl/approve/{request_id}"),
                         ("POST", f"/aura/hitl/reject/{request_id}"), ("GET", f"/aura/hitl/signals/{session_id}")):
        colleague = await client.open(path, method=method, headers=bearer("carol"))
        unknown = await client.open(path.replace(request_id, "hitl_unknown").replace(session_id, "ses_unknown"),
                                    method=method, headers=bearer("carol"))
        assert colleague.status_code == unknown.status_code == 404
        assert {**await colleague.get_json(), "traceId": None} == {**await unknown.get_json(), "traceId": None}
    assert git(repo, "log", "--format=%s") == "Initial commit"

    approved = await client.post(f"/aura/hitl/approve/{request_id}", headers=bearer("mgr", role="manager"))
    assert approved.status_code == 200
    decided = await approved.get_json()
    assert (decided["status"], decided["decidedBy"], decided["reason"]) == ("approved", "mgr", None)
    assert isinstance(decided["decidedAt"], int)
    again = await client.post(f"/aura/hitl/approve/{request_id}", headers=bearer())
    assert again.status_code == 409
    assert (await client.get(f"/aura/hitl/signals/{session_id}", headers=bearer())).status_code == 200
    colleague_signal = await client.get(f"/aura/hitl/signals/{session_id}", headers=bearer("carol"))
    unknown_signal = await client.get("/aura/hitl/signals/ses_unknown", headers=bearer("carol"))
    assert colleague_signal.status_code == unknown_signal.status_code == 404
    assert {**await colleague_signal.get_json(), "traceId": None} == \
        {**await unknown_signal.get_json(), "traceId": None}
    assert {k: v for k, v in (await again.get_json()).items() if k in ("code", "requestStatus", "decidedBy")} == \
        {"code": "already_decided", "requestStatus": "approved", "decidedBy": "mgr"}

    events = await live.rest()
    await context.__aexit__(None, None, None)
    statuses = [e["data"]["status"] for e in events if e["type"] == "tool_execution"]
    assert statuses == ["pending", "running", "success"]
    assert git(repo, "log", "--format=%s") == "Add feature\nInitial commit"
    signal = await client.get(f"/aura/hitl/signals/{session_id}", headers=bearer())
    assert await signal.get_json() == {"type": "approval", "requestId": request_id, "status": "approved",
                                       "userId": "mgr", "timestamp": decided["decidedAt"]}
    assert events[-1]["data"]["status"] == "completed"


async def test_reject_through_the_api_leaves_the_repository_untouched(app: Quart, workspace: Path) -> None:
    repo = staged_change(workspace)
    context, live = await open_stream(app, COMMIT)
    hitl = await live.until("hitl")
    request_id = hitl["data"]["requestId"]
    client = app.test_client()
    rejected = await client.post(f"/aura/hitl/reject/{request_id}", json={"reason": "not on Fridays"},
                                 headers=bearer())
    assert rejected.status_code == 200 and (await rejected.get_json())["reason"] == "not on Fridays"
    events = await live.rest()
    await context.__aexit__(None, None, None)
    tools = [e["data"] for e in events if e["type"] == "tool_execution"]
    assert [t["status"] for t in tools] == ["pending", "rejected"]
    assert tools[-1]["error"] == "Rejected: not on Fridays"
    assert git(repo, "log", "--format=%s") == "Initial commit"
    assert events[-1]["data"]["status"] == "completed"
    approve_after = await client.post(f"/aura/hitl/approve/{request_id}", headers=bearer())
    assert approve_after.status_code == 409


async def test_expired_request_answers_410(make_settings: Callable[..., Settings], workspace: Path) -> None:
    staged_change(workspace)
    app = create_app(make_settings(hitl={"timeout_seconds": 1, "recheck_seconds": 0.05}))
    async with app.test_app():
        context, live = await open_stream(app, COMMIT)
        hitl = await live.until("hitl")
        events = await live.rest()
        await context.__aexit__(None, None, None)
        assert [e["type"] for e in events][-2:] == ["error", "end"]
        assert events[-2]["data"]["errorType"] == "hitl_timeout" and events[-1]["data"]["status"] == "timeout"
        response = await app.test_client().post(f"/aura/hitl/approve/{hitl['data']['requestId']}", headers=bearer())
        assert response.status_code == 410 and (await response.get_json())["code"] == "approval_expired"


async def test_unknown_ids_and_bodies(app: Quart) -> None:
    client = app.test_client()
    assert (await client.get("/aura/hitl/requests/req_nope", headers=bearer())).status_code == 404
    assert (await client.get("/aura/hitl/signals/ses_nope", headers=bearer())).status_code == 404
    assert (await client.post("/aura/hitl/approve/req_nope", headers=bearer())).status_code == 404
    # an empty body (Content-Length: 0, as HTTP clients send for a POST without one) is no body
    empty = await client.post("/aura/hitl/reject/req_nope", headers={**bearer(), "Content-Length": "0"})
    assert empty.status_code == 404
    bad = await client.post("/aura/hitl/reject/req_nope", data="{oops", headers=bearer())
    assert bad.status_code == 422 and (await bad.get_json())["code"] == "validation_error"
    no_token = await client.post("/aura/hitl/approve/req_nope")
    assert no_token.status_code == 401 and no_token.headers["WWW-Authenticate"].startswith("Bearer")


async def test_pending_requests_of_the_caller(app: Quart, workspace: Path) -> None:
    staged_change(workspace)
    context, live = await open_stream(app, COMMIT)
    hitl = await live.until("hitl")
    client = app.test_client()
    mine = await (await client.get("/aura/hitl/requests", headers=bearer())).get_json()
    assert [r["requestId"] for r in mine["requests"]] == [hitl["data"]["requestId"]]
    theirs = await (await client.get("/aura/hitl/requests", headers=bearer("bob"))).get_json()
    assert theirs == {"requests": []}
    await client.post(f"/aura/hitl/approve/{hitl['data']['requestId']}", headers=bearer())
    await live.rest()
    await context.__aexit__(None, None, None)
