"""The docs stay true: the settings table of docs/operators.md is the one the settings model
generates, and the Redis commands of docs/backend.md, run as written against a real Aura on a real
Redis, read, approve and reject an approval request."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import redis

from tests.aura_process import AuraProcess
from tests.redis_server import RedisServer
from tests.sse_client import open_run
from tests.support import bearer, git, make_repo

REPO = Path(__file__).resolve().parents[2]
BACKEND_DOC = REPO / "docs" / "backend.md"
REQUEST_FIELDS = ["requestId", "sessionId", "runId", "actionType", "toolName", "message", "context", "status",
                  "userId", "tenantId", "createdAt", "expiresAt", "decidedAt", "decidedBy", "reason"]
SESSION_FIELDS = ["sessionId", "runId", "requestId", "userId", "tenantId", "status"]


def load_settings_table() -> ModuleType:
    spec = importlib.util.spec_from_file_location("settings_table", REPO / "scripts" / "settings_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_settings_table_in_operators_md_is_generated_from_the_settings_model() -> None:
    module = load_settings_table()
    current = module.DOC.read_text(encoding="utf-8")
    assert module.render(current) == current, \
        "docs/operators.md is out of date: run python3 scripts/settings_table.py --write"


def test_the_settings_table_names_every_setting_once() -> None:
    from app.settings import Settings

    module = load_settings_table()
    expected = {f"AURA_{section.upper()}__{key.upper()}"
                for section, field in Settings.model_fields.items()
                for key in field.annotation.model_fields}  # type: ignore[union-attr]
    names = [row[0].strip("`") for row in module.rows()]
    assert sorted(names) == sorted(expected)
    table = module.table()
    assert all(table.count(f"`{name}`") == 1 for name in names)


def redis_block(name: str) -> list[list[str]]:
    """The commands of the fenced block after `<!-- redis:NAME -->` in docs/backend.md, split as
    redis-cli would split them."""
    match = re.search(rf"<!-- redis:{name} -->\n```\n(.*?)```", BACKEND_DOC.read_text(encoding="utf-8"), re.S)
    assert match, f"docs/backend.md has no <!-- redis:{name} --> block"
    return [shlex.split(line) for line in match.group(1).splitlines() if line.strip()]


def run_block(client: redis.Redis, name: str, **ids: str) -> list[Any]:
    results = []
    for command in redis_block(name):
        filled = [arg.replace("{sessionId}", ids["session_id"]).replace("{requestId}", ids["request_id"])
                  for arg in command]
        results.append(client.execute_command(*filled))  # type: ignore[no-untyped-call]
    return results


def stored_json(client: redis.Redis, key: str) -> dict[str, Any]:
    raw = client.get(key)
    assert isinstance(raw, bytes), f"{key} is missing"
    value: dict[str, Any] = json.loads(raw)
    return value


@pytest.fixture
def aura_on_redis(redis_server: RedisServer, tmp_path: Path) -> Iterator[AuraProcess]:
    workspace = tmp_path / "workspace"
    make_repo(workspace / "repo")
    aura = AuraProcess(workspace=workspace, log_path=tmp_path / "aura.log", redis_url=redis_server.url).start()
    try:
        yield aura
    finally:
        aura.stop()


def stage(workspace: Path, name: str) -> None:
    (workspace / "repo" / name).write_text("x\n")
    git(workspace / "repo", "add", name)


def test_the_documented_signals_have_the_contract_shape() -> None:
    approve_set, approve_publish = redis_block("approve")
    reject_set, reject_publish = redis_block("reject")
    assert approve_set[:2] == ["SET", "hitl:signal:{sessionId}"] and approve_set[3:] == ["EX", "300"]
    assert approve_publish[:2] == ["PUBLISH", "hitl:channel:{sessionId}"] and approve_publish[2] == approve_set[2]
    assert reject_set[:2] == ["SET", "hitl:signal:{sessionId}"] and reject_set[3:] == ["EX", "300"]
    assert reject_publish[:2] == ["PUBLISH", "hitl:channel:{sessionId}"] and reject_publish[2] == reject_set[2]
    approval, rejection = json.loads(approve_set[2]), json.loads(reject_set[2])
    assert approval == {"type": "approval", "requestId": "{requestId}", "status": "approved", "userId": "u1",
                        "timestamp": 1767000000}
    assert rejection == {"type": "rejection", "requestId": "{requestId}", "status": "rejected",
                         "reason": "not now", "userId": "u1", "timestamp": 1767000000}
    assert type(approval["timestamp"]) is int and type(rejection["timestamp"]) is int


async def test_the_documented_redis_commands_read_and_approve(aura_on_redis: AuraProcess,
                                                               redis_server: RedisServer) -> None:
    stage(aura_on_redis.workspace, "approved.txt")
    client = redis.Redis.from_url(redis_server.url)
    async with httpx.AsyncClient(base_url=aura_on_redis.url, timeout=10) as http, \
            open_run(http, {"prompt": '@git_commit {"repo_path": "repo", "message": "Approved from Java"}'},
                     bearer()) as run:
        hitl = await run.until("hitl")
        ids = {"session_id": hitl["sessionId"], "request_id": hitl["data"]["requestId"]}
        session_raw, request_raw = run_block(client, "read", **ids)
        session, request = json.loads(session_raw), json.loads(request_raw)
        assert list(session) == SESSION_FIELDS and list(request) == REQUEST_FIELDS
        assert session["requestId"] == ids["request_id"] and session["status"] == "pending"
        assert request["status"] == "pending" and request["tenantId"] == "acme" and request["userId"] == "alice"
        stored, receivers = run_block(client, "approve", **ids)
        assert stored is True and receivers == 1  # one Aura instance waits on the session
        events = await run.rest()
    assert events[-1]["type"] == "end" and events[-1]["data"]["status"] == "completed"
    assert [e["data"]["status"] for e in events if e["type"] == "tool_execution"
            and e["data"]["toolName"] == "git_commit"][-1] == "success"
    decided = stored_json(client, f"hitl:request:{ids['request_id']}")
    # The documented signal names "u1", not the request's own user: Aura records no unchecked decider.
    assert (decided["status"], decided["decidedBy"]) == ("approved", None)
    assert git(aura_on_redis.workspace / "repo", "log", "-1", "--format=%s") == "Approved from Java"


async def test_the_documented_redis_commands_reject(aura_on_redis: AuraProcess, redis_server: RedisServer) -> None:
    stage(aura_on_redis.workspace, "rejected.txt")
    client = redis.Redis.from_url(redis_server.url)
    async with httpx.AsyncClient(base_url=aura_on_redis.url, timeout=10) as http, \
            open_run(http, {"prompt": '@git_commit {"repo_path": "repo", "message": "Rejected from Java"}'},
                     bearer()) as run:
        hitl = await run.until("hitl")
        ids = {"session_id": hitl["sessionId"], "request_id": hitl["data"]["requestId"]}
        stored, receivers = run_block(client, "reject", **ids)
        assert stored is True and receivers == 1
        events = await run.rest()
    assert events[-1]["type"] == "end" and events[-1]["data"]["status"] == "completed"
    assert [e["data"]["status"] for e in events if e["type"] == "tool_execution"
            and e["data"]["toolName"] == "git_commit"][-1] == "rejected"
    decided = stored_json(client, f"hitl:request:{ids['request_id']}")
    assert (decided["status"], decided["decidedBy"], decided["reason"]) == ("rejected", None, "not now")
    assert git(aura_on_redis.workspace / "repo", "log", "-1", "--format=%s") == "Initial commit"
