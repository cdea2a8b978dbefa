"""Identity attacks the shared auth table (tests/http/test_auth.py) leaves out, and tenant isolation
against the real service: another tenant's (or user's) run, event log, approval and signal answer
the same 404 as an id that never existed — same status, same code, same body but the trace id —
and in time you cannot tell apart."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from jose import jwt

from app.factory import create_app
from app.settings import Settings
from tests.adversarial.conftest import raw_stream
from tests.aura_process import AuraProcess
from tests.redis_server import RedisServer
from tests.support import SECRET, bearer, git, make_repo

NOW = int(time.time())


def claims(**over: Any) -> dict[str, Any]:
    # valid for hours, so a slow suite (collection to this test) never sees it expire
    base = {"sub": "alice", "tenant_id": "acme", "exp": NOW + 4 * 3600, "iat": NOW}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def signed(headers: dict[str, Any] | None = None, **over: Any) -> str:
    return "Bearer " + jwt.encode(claims(**over), SECRET, algorithm="HS256", headers=headers)


# (case, Authorization, extra headers, status, code) against a verifier configured with key_id "k1"
CASES = [
    ("unknown kid with key_id configured", signed({"kid": "k2"}), {}, 401, "unknown_key"),
    ("empty kid with key_id configured", signed({"kid": ""}), {}, 401, "unknown_key"),
    ("not yet valid beyond the leeway", signed(nbf=NOW + 3600), {}, 401, "token_not_yet_valid"),
    ("expired beyond the leeway", signed(exp=NOW - 120), {}, 401, "token_expired"),
    ("oversized token", signed(pad="x" * 20000), {}, 401, "malformed_token"),
    ("oversized garbage", "Bearer " + "A" * 9000, {}, 401, "malformed_token"),
    ("list tenant_id", signed(tenant_id=["acme"]), {}, 401, "invalid_claim"),
    ("null byte in sub header", signed(), {"X-User-ID": "alice\x00"}, 403, "user_mismatch"),
]


@pytest.fixture
async def kid_app(tmp_path: Path) -> Any:
    make_repo(tmp_path / "ws" / "repo")
    app = create_app(Settings(auth={"jwt_secret": SECRET, "key_id": "k1"},
                              tools={"workspace_root": str(tmp_path / "ws")}))
    async with app.test_app() as test_app:
        yield test_app.app


@pytest.mark.parametrize(("authorization", "headers", "status", "code"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
async def test_refused_with_exact_problem(kid_app: Any, authorization: str, headers: dict[str, str],
                                          status: int, code: str) -> None:
    response = await kid_app.test_client().get("/aura/hitl/requests",
                                               headers={"Authorization": authorization, **headers})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body = await response.get_json()
    assert (body["status"], body["code"]) == (status, code)
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_matching_kid_is_accepted(kid_app: Any) -> None:
    response = await kid_app.test_client().get("/aura/hitl/requests",
                                               headers={"Authorization": signed({"kid": "k1"})})
    assert response.status_code == 200


def without_trace(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "traceId"}


async def test_another_tenants_resources_are_indistinguishable_from_missing_ones(
        start_aura: Callable[..., AuraProcess], own_redis: list[RedisServer], e2e_workspace: Path) -> None:
    repo = e2e_workspace / "repo"
    (repo / "f.txt").write_text("x\n")
    git(repo, "add", "f.txt")
    aura = start_aura(redis_url=own_redis[0].url)
    async with httpx.AsyncClient(base_url=aura.url, timeout=20) as client:
        async with raw_stream(client, {"prompt": '@git_commit {"repo_path": "repo", "message": "m"}',
                                       "onDisconnect": "continue", "thread_id": "secret-thread"},
                              bearer()) as stream:
            await stream.until("event: hitl", 10)
            hitl = next(e for e in stream.events if e["type"] == "hitl")
        run_id = stream.response.headers["x-aura-run-id"]
        request_id, session = hitl["data"]["requestId"], hitl["data"]["sessionId"]
        fake = {"run": "run_" + "0" * 32, "req": "req_" + "0" * 32, "ses": "ses_" + "0" * 32}
        probes = [  # (method, real path, never-existing path, code)
            ("GET", f"/aura/runs/{run_id}", f"/aura/runs/{fake['run']}", "run_not_found"),
            ("GET", f"/aura/runs/{run_id}/events", f"/aura/runs/{fake['run']}/events", "run_not_found"),
            ("POST", f"/aura/runs/{run_id}/cancel", f"/aura/runs/{fake['run']}/cancel", "run_not_found"),
            ("GET", f"/aura/hitl/requests/{request_id}", f"/aura/hitl/requests/{fake['req']}", "approval_not_found"),
            ("POST", f"/aura/hitl/approve/{request_id}", f"/aura/hitl/approve/{fake['req']}", "approval_not_found"),
            ("POST", f"/aura/hitl/reject/{request_id}", f"/aura/hitl/reject/{fake['req']}", "approval_not_found"),
        ]
        intruders = {"other tenant, same user name": bearer("alice", "globex"),
                     "other tenant, admin role": bearer("root", "globex", role="admin")}
        secrets = [run_id, request_id, session, "secret-thread", "git_commit", "alice@", "acme"]
        timings: dict[str, list[float]] = {"real": [], "missing": []}
        for who, headers in intruders.items():
            for method, real, missing, code in probes:
                answers = []
                for kind, path in (("real", real), ("missing", missing)):
                    started = time.perf_counter()
                    response = await client.request(method, path, headers=headers)
                    timings[kind].append(time.perf_counter() - started)
                    assert response.status_code == 404, (who, path, response.text)
                    assert response.headers["content-type"] == "application/problem+json"
                    body = response.json()
                    assert body["code"] == code, (who, path, body)
                    text = response.text
                    assert not any(s in text for s in secrets), (who, path, text)
                    answers.append(without_trace(body))
                assert answers[0] == answers[1], (who, real)
            listed = await client.get("/aura/hitl/requests", headers=headers)
            assert listed.status_code == 200 and request_id not in listed.text
            signal = await client.get(f"/aura/hitl/signals/{session}", headers=headers)
            assert signal.status_code == 404 and signal.json()["code"] == "signal_not_found"
        # the owner still sees everything, and the run is still waiting: nothing was decided or cancelled
        snapshot = await client.get(f"/aura/runs/{run_id}", headers=bearer())
        assert snapshot.status_code == 200 and snapshot.json()["status"] == "waiting_approval"
        assert (await client.get(f"/aura/hitl/requests/{request_id}", headers=bearer())).json()["status"] == "pending"
        # timing: the medians of real-but-foreign and never-existing ids differ by less than 5 ms
        assert abs(statistics.median(timings["real"]) - statistics.median(timings["missing"])) < 0.005, timings
        await client.post(f"/aura/runs/{run_id}/cancel", headers=bearer())
