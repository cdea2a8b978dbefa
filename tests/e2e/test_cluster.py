"""Two Aura instances on one real Redis (a redis-server, and a 3-master Redis Cluster): approvals,
resume, idempotency, cancel, leases, limits."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from adapters.redis import approvals
from tests.aura_process import AuraProcess
from tests.conftest import Store
from tests.redis_server import RedisServer
from tests.sse_client import open_run
from tests.support import bearer, check_event, git

COMMIT = '@git_commit {"repo_path": "repo", "message": "Add feature"}'


def stage(workspace: Path) -> Path:
    repo = workspace / "repo"
    (repo / "feature.txt").write_text("x\n")
    git(repo, "add", "feature.txt")
    return repo


def frames_to_events(body: str) -> list[dict[str, Any]]:
    events = []
    for block in body.split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data and data[0] != "[DONE]":
            envelope = json.loads("\n".join(data))
            check_event(envelope)
            events.append(envelope)
    return events


async def test_run_on_a_is_approved_through_b_and_another_by_a_raw_publish(
        instances: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path, store: Store) -> None:
    clean_redis = store.client
    a, b = instances()
    repo = stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        async with open_run(on_a, {"prompt": COMMIT}, bearer()) as run:
            hitl = await run.until("hitl")
            request_id = hitl["data"]["requestId"]
            assert (await on_b.post(f"/aura/hitl/approve/{request_id}", headers=bearer("alice", "globex"))
                    ).status_code == 404
            assert (await on_b.post(f"/aura/hitl/approve/{request_id}", headers=bearer("carol"))).status_code == 404
            approve_a, approve_b = await asyncio.gather(
                on_a.post(f"/aura/hitl/approve/{request_id}", headers=bearer()),
                on_b.post(f"/aura/hitl/approve/{request_id}", headers=bearer("mgr", role="manager")))
            assert sorted([approve_a.status_code, approve_b.status_code]) == [200, 409]
            events = await run.rest()
        assert [e["data"]["status"] for e in events if e["type"] == "tool_execution"] == \
            ["pending", "running", "success"]
        assert git(repo, "log", "-1", "--format=%s") == "Add feature"
        stored = json.loads(clean_redis.get(f"hitl:request:{request_id}"))
        assert stored["status"] == "approved" and 1700 <= clean_redis.ttl(f"hitl:request:{request_id}") <= 1800

        # the Java service's way: SET the signal, then PUBLISH it
        (repo / "second.txt").write_text("y\n")
        git(repo, "add", "second.txt")
        async with open_run(on_a, {"prompt": '@git_commit {"repo_path": "repo", "message": "Second"}'},
                            bearer()) as run:
            hitl = await run.until("hitl")
            session = hitl["data"]["sessionId"]
            signal_json = json.dumps({"type": "rejection", "requestId": hitl["data"]["requestId"],
                                      "status": "rejected", "reason": "not now", "userId": "u1",
                                      "timestamp": int(time.time())})
            clean_redis.set(f"hitl:signal:{session}", signal_json, ex=300)
            # every instance listens to every session's channel, through one pattern subscription
            # each: A and B (on a cluster PUBLISH counts the listeners of its node only)
            assert clean_redis.publish(f"hitl:channel:{session}", signal_json) in (
                {0, 1, 2} if store.kind == "redis-cluster" else {2})
            events = await run.rest()
        assert [e["data"]["status"] for e in events if e["type"] == "tool_execution"] == ["pending", "rejected"]
        assert git(repo, "log", "-1", "--format=%s") == "Add feature"  # the rejected commit does not exist
        decided = json.loads(clean_redis.get(f"hitl:request:{hitl['data']['requestId']}"))
        # "u1" is not the request's own user: Aura cannot check that name, so decidedBy stays null.
        assert (decided["status"], decided["decidedBy"], decided["reason"]) == ("rejected", None, "not now")


APPROVAL_SCRIPTS = {hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest()
                    for body in (approvals._SWAP, approvals._DECIDE_IN_PLACE)}


class ScriptCalls:
    """Counts the approval scripts clients run on the server (MONITOR, in a thread) until stopped
    (the event log's appends and the lease renewals are scripts too: not counted)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.calls: list[str] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        client = redis.Redis.from_url(self._url)
        with client.monitor() as monitor:
            self._ready.set()
            for command in monitor.listen():
                name = command["command"].split(" ", 1)[0].upper()
                if name == "ECHO" and "stop-counting" in command["command"]:
                    break
                if command["client_type"] != "lua" and name in {"EVAL", "EVALSHA", "FCALL"} and \
                        command["command"].split(" ", 2)[1] in APPROVAL_SCRIPTS:
                    self.calls.append(name)
        client.close()

    def __enter__(self) -> ScriptCalls:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *_: object) -> None:
        stopper = redis.Redis.from_url(self._url)
        stopper.echo("stop-counting")
        stopper.close()
        self._thread.join(5)


@pytest.mark.parametrize("shared_key", [True, False], ids=["shared-seal-key", "own-keys"])
async def test_an_approval_on_b_is_one_script_call_and_a_with_the_shared_key_writes_only_its_session(
        cluster: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path, redis_server: RedisServer,
        clean_redis: redis.Redis, shared_key: bool) -> None:
    a, b = cluster(**({"AURA_HITL__SEAL_KEY": "one-key-every-instance-shares-01"} if shared_key else {}))
    stage(e2e_workspace)
    for body in (approvals._SWAP, approvals._DECIDE_IN_PLACE):  # known to the server: each call is one EVALSHA
        clean_redis.script_load(body)
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        async with open_run(on_a, {"prompt": COMMIT}, bearer()) as run:
            hitl = (await run.until("hitl"))["data"]
            request_id, session_id = hitl["requestId"], hitl["sessionId"]
            with ScriptCalls(redis_server.url) as scripts:
                approved = await on_b.post(f"/aura/hitl/approve/{request_id}", headers=bearer())
                assert approved.status_code == 200
                while (event := await run.next()) is not None and not (
                        event["type"] == "tool_execution" and event["data"]["status"] == "running"):
                    pass
                assert event is not None
            events = await run.rest()
    # B: one script checks who may decide and decides, writes the session's record, then stores and
    # publishes the signal. A: with the shared key, the signal's seal says the decision and the
    # session's record are stored, and A writes nothing; with keys of their own, A records it (it
    # finds it decided and updates the session by compare-and-set: two more).
    assert scripts.calls == ["EVALSHA"] * (1 if shared_key else 3)
    assert [e["data"]["status"] for e in events if e["type"] == "tool_execution"] == ["pending", "running", "success"]
    stored = json.loads(clean_redis.get(f"hitl:request:{request_id}"))
    assert (stored["status"], stored["decidedBy"]) == ("approved", "alice")
    # the session record says so too: A wrote it before the run went on
    assert json.loads(clean_redis.get(f"hitl:session:{session_id}")) == {
        "sessionId": session_id, "runId": stored["runId"], "requestId": request_id, "userId": "alice",
        "tenantId": stored["tenantId"], "status": "approved"}


async def test_resume_on_another_instance_has_no_gap_and_no_duplicate(
        instances: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path) -> None:
    a, b = instances()
    stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        async with open_run(on_a, {"prompt": COMMIT, "onDisconnect": "continue"}, bearer()) as run:
            hitl = await run.until("hitl")
            first_part = list(run.events)
        run_id = run.response.headers["x-aura-run-id"]
        cut = first_part[len(first_part) // 2]["seq"]  # the client saw more, but resumes from the middle
        snapshot = (await on_b.get(f"/aura/runs/{run_id}", headers=bearer())).json()
        assert snapshot["status"] == "waiting_approval"
        assert snapshot["pendingApproval"]["requestId"] == hitl["data"]["requestId"]
        assert [s["status"] for s in snapshot["plan"]] == ["waiting_approval"]
        async with on_b.stream("GET", f"/aura/runs/{run_id}/events",
                               headers={**bearer(), "Last-Event-ID": str(cut)}) as resumed:
            assert resumed.status_code == 200
            body = ""
            async for text in resumed.aiter_text():
                body += text
                if "event: hitl" in body and "approved" not in body:
                    await on_b.post(f"/aura/hitl/approve/{hitl['data']['requestId']}", headers=bearer())
                    body = body.replace("event: hitl", "event: hitl-seen")
                if body.endswith("data: [DONE]\n\n"):
                    break
        second_part = frames_to_events(body)
        seqs = [e["seq"] for e in first_part if e["seq"] <= cut] + [e["seq"] for e in second_part]
        assert seqs == list(range(1, len(seqs) + 1))
        assert second_part[-1]["type"] == "end" and second_part[-1]["data"]["status"] == "completed"
        # after the end, a full replay on either instance is the same run
        for client in (on_a, on_b):
            replay = (await client.get(f"/aura/runs/{run_id}/events", headers=bearer())).text
            assert [e["seq"] for e in frames_to_events(replay)] == seqs
        other = await on_b.get(f"/aura/runs/{run_id}/events", headers=bearer("bob"))
        assert other.status_code == 404
        assert (await on_a.get(f"/aura/runs/{run_id}", headers=bearer("alice", "globex"))).status_code == 404


async def test_trimmed_log_says_events_were_lost(instances: Callable[..., tuple[AuraProcess, AuraProcess]],
                                                 store: Store) -> None:
    clean_redis = store.client
    a, b = instances()
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a:
        response = await on_a.post("/aura/test/stream", headers=bearer(),
                                   json={"prompt": '@answer {"text": "one two three four five", "chunks": 5}'})
        run_id = response.headers["x-aura-run-id"]
        total = len(frames_to_events(response.text))
    clean_redis.xtrim(f"aura:run:{{{run_id}}}:events", minid=f"{total - 2}-0", approximate=False)  # keep 3
    async with httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        body = (await on_b.get(f"/aura/runs/{run_id}/events", headers={**bearer(), "Last-Event-ID": "2"})).text
    blocks = body.split("\n\n")
    assert blocks[0].startswith("event: error\ndata: ") and "id:" not in blocks[0]
    events = frames_to_events(body)
    assert events[0]["data"]["errorType"] == "events_lost" and events[0]["seq"] == 0
    assert events[1]["type"] == "snapshot" and events[1]["data"]["status"] == "completed"
    assert events[1]["data"]["answer"] == "one two three four five"
    assert [e["seq"] for e in events[2:]] == [total - 2, total - 1, total]
    assert body.endswith("data: [DONE]\n\n")


async def test_retried_post_with_the_same_idempotency_key_runs_the_agent_once(
        instances: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path, store: Store) -> None:
    a, b = instances()
    stage(e2e_workspace)
    headers = {**bearer(), "Idempotency-Key": "click-42"}
    body = {"prompt": COMMIT, "onDisconnect": "continue"}
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        async with open_run(on_a, body, headers) as first:
            hitl = await first.until("hitl")
            run_id = first.response.headers["x-aura-run-id"]
        async with open_run(on_b, body, {**headers, "Last-Event-ID": "0"}) as retry:
            assert retry.response.headers["x-aura-run-id"] == run_id
            again = await retry.until("hitl")
            assert again["seq"] == hitl["seq"] and again["data"]["requestId"] == hitl["data"]["requestId"]
            await on_b.post(f"/aura/hitl/approve/{hitl['data']['requestId']}", headers=bearer())
            events = await retry.rest()
        assert sum(1 for e in events if e["type"] == "start") == 1
        assert sum(1 for e in events if e["type"] == "hitl") == 1
        assert len(store.keys("hitl:request:*")) == 1
        assert len(store.keys("aura:run:*:meta")) == 1
        changed = await on_a.post("/aura/test/stream", json={"prompt": "something else"}, headers=headers)
        assert changed.status_code == 422 and changed.json()["code"] == "idempotency_key_reused"


async def test_disconnect_policy_continue_keeps_the_approval_and_cancel_drops_it(
        instances: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path) -> None:
    a, _ = instances(AURA_STREAM__DISCONNECT_GRACE_SECONDS="0.2")
    stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as client:
        async with open_run(client, {"prompt": COMMIT, "onDisconnect": "continue"}, bearer()) as run:
            kept = await run.until("hitl")
        async with open_run(client, {"prompt": COMMIT, "onDisconnect": "cancel"}, bearer()) as run:
            dropped = await run.until("hitl")
        deadline = time.monotonic() + 2
        while True:
            dropped_state = (await client.get(f"/aura/hitl/requests/{dropped['data']['requestId']}",
                                              headers=bearer())).json()["status"]
            if dropped_state == "cancelled" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert dropped_state == "cancelled"
        assert (await client.get(f"/aura/hitl/requests/{kept['data']['requestId']}", headers=bearer())
                ).json()["status"] == "pending"
        await client.post(f"/aura/hitl/approve/{kept['data']['requestId']}", headers=bearer())
        replay = (await client.get(f"/aura/runs/{kept['runId']}/events", headers=bearer())).text
        assert frames_to_events(replay)[-1]["data"]["status"] == "completed"


GRACE_SECONDS = 3.0
RENEWAL_SECONDS = 0.5  # a third of the lease


@pytest.mark.parametrize("the_follower_leaves", ["its client closes", "its process is killed"])
async def test_a_run_whose_client_left_lives_while_followed_elsewhere_and_is_cancelled_a_grace_period_after(
        instances: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path,
        the_follower_leaves: str) -> None:
    """The run's own client leaves its owner (a) while another instance (b) follows it: through
    three grace periods the run is not cancelled. Then the follow ends: its client closes, or b
    is SIGKILLed (its presence lapses, 3 s after its last refresh). The run is cancelled a grace
    period after the follower was last known to read it, at most a renewal interval later than a
    grace period after it left (for a killed process the grace period counts from its last presence
    refresh, so never later than that either; it may come up to a refresh interval, 1 s, sooner)."""
    a, b = instances(AURA_STREAM__DISCONNECT_GRACE_SECONDS=str(GRACE_SECONDS), AURA_RUNS__LEASE_SECONDS="1.5",
                     AURA_RUNS__FOLLOWER_PRESENCE_SECONDS="3", AURA_STREAM__HEARTBEAT_SECONDS="0.5")
    stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:

        async def status() -> str:
            response = await on_a.get(f"/aura/hitl/requests/{hitl['data']['requestId']}", headers=bearer())
            return str(response.json()["status"])

        async with open_run(on_a, {"prompt": COMMIT, "onDisconnect": "cancel"}, bearer()) as run:
            hitl = await run.until("hitl")
            followed = asyncio.Event()
            body: list[str] = []

            async def follow() -> None:
                async with on_b.stream("GET", f"/aura/runs/{hitl['runId']}/events",
                                       headers={**bearer(), "Last-Event-ID": str(hitl["seq"])}) as response:
                    assert response.status_code == 200
                    async for text in response.aiter_text():
                        body.append(text)
                        followed.set()  # its first heartbeat: the follow is the run's reader

            follower = asyncio.create_task(follow())
            await asyncio.wait_for(followed.wait(), 5)
        left_at = time.monotonic()  # the run's own client left its owner
        try:
            while time.monotonic() < left_at + 3.2 * GRACE_SECONDS:  # three grace periods and a bit
                assert await status() == "pending"
                await asyncio.sleep(0.2)
            assert "event: end" not in "".join(body) and not follower.done()
            if the_follower_leaves == "its client closes":
                follower.cancel()
            else:
                b.stop(signal.SIGKILL)
            gone_at = time.monotonic()
            while True:  # the run's approval request is cancelled with the run
                if await status() != "pending" or time.monotonic() > gone_at + 15:
                    break
                await asyncio.sleep(0.05)
            cancelled_after = time.monotonic() - gone_at
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        assert await status() == "cancelled"
        replay = frames_to_events((await on_a.get(f"/aura/runs/{hitl['runId']}/events", headers=bearer())).text)
    assert replay[-1]["data"]["status"] == "cancelled" and replay[-1]["data"]["reason"] == "client_disconnected"
    earliest = GRACE_SECONDS - (0.1 if the_follower_leaves == "its client closes" else 1.5)
    assert earliest <= cancelled_after <= GRACE_SECONDS + RENEWAL_SECONDS + 1.0, cancelled_after


async def test_cancel_through_the_api_ends_the_run_for_every_watcher(
        instances: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path) -> None:
    a, b = instances()
    stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        async with open_run(on_a, {"prompt": COMMIT}, bearer()) as owner_watch:
            hitl = await owner_watch.until("hitl")
            run_id = hitl["runId"]
            async with on_b.stream("GET", f"/aura/runs/{run_id}/events",
                                   headers={**bearer(), "Last-Event-ID": str(hitl["seq"])}) as follower:
                cancelled = await on_b.post(f"/aura/runs/{run_id}/cancel", headers=bearer())
                assert cancelled.status_code == 202 and cancelled.json() == {"runId": run_id, "status": "cancelling"}
                follower_body = ""
                async for text in follower.aiter_text():
                    follower_body += text
                    if follower_body.endswith("data: [DONE]\n\n"):
                        break
            owner_events = await owner_watch.rest()
        for events in (owner_events, frames_to_events(follower_body)):
            assert events[-1]["type"] == "end"
            assert events[-1]["data"]["status"] == "cancelled" and events[-1]["data"]["reason"] == "user_cancelled"
        request = (await on_a.get(f"/aura/hitl/requests/{hitl['data']['requestId']}", headers=bearer())).json()
        assert request["status"] == "cancelled"
        again = await on_a.post(f"/aura/runs/{run_id}/cancel", headers=bearer())
        assert again.status_code == 200 and again.json()["status"] == "cancelled"


async def test_follower_reports_run_lost_when_the_owner_is_killed(
        instances: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path) -> None:
    a, b = instances(AURA_RUNS__LEASE_SECONDS="1", AURA_STREAM__HEARTBEAT_SECONDS="0.5")
    stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        async with open_run(on_a, {"prompt": COMMIT, "onDisconnect": "continue"}, bearer()) as run:
            hitl = await run.until("hitl")
        async with on_b.stream("GET", f"/aura/runs/{hitl['runId']}/events",
                               headers={**bearer(), "Last-Event-ID": str(hitl["seq"])}) as follower:
            a.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            body = ""
            async for text in follower.aiter_text():
                body += text
                if body.endswith("data: [DONE]\n\n"):
                    break
        elapsed = time.monotonic() - killed_at
    events = frames_to_events(body)
    assert [e["type"] for e in events[-2:]] == ["error", "end"]
    assert events[-2]["data"]["errorType"] == "run_lost"
    assert events[-1]["data"] == {"status": "failed", "reason": "run_lost", "message": events[-2]["data"]["message"]}
    assert events[-2]["seq"] == hitl["seq"] + 1 or events[-2]["seq"] > hitl["seq"]
    assert elapsed < 5  # lease 1 s + follower poll


async def test_per_user_limit_answers_429_with_retry_after(
        instances: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path) -> None:
    a, b = instances(AURA_RUNS__MAX_PER_USER="2")
    stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        async with open_run(on_a, {"prompt": COMMIT}, bearer()) as first, \
                open_run(on_b, {"prompt": COMMIT}, bearer()) as second:
            await first.until("hitl")
            await second.until("hitl")
            third = await on_a.post("/aura/test/stream", json={"prompt": "hi"}, headers=bearer())
            assert third.status_code == 429 and third.headers["retry-after"] == "5"
            assert third.json()["code"] == "too_many_runs"
            other_user = await on_b.post("/aura/test/stream", json={"prompt": "hi"}, headers=bearer("bob"))
            assert other_user.status_code == 200


async def test_a_client_that_never_reads_is_dropped_while_others_flow(
        cluster: Callable[..., tuple[AuraProcess, AuraProcess]]) -> None:
    a, _ = cluster(AURA_STREAM__SEND_TIMEOUT_SECONDS="1", AURA_STREAM__DISCONNECT_GRACE_SECONDS="0.2")
    # 30,000 events of ~300 bytes, one per millisecond: the run lasts over 30 s, and the ~4 MiB the
    # socket buffers of both ends hold fill up well before that, so the drop comes mid-run
    big = "x" * 30_000
    body = json.dumps({"prompt": f'@answer {{"text": "{big}", "chunks": 30000, "intervalMs": 1}}'}).encode()
    slow = socket.create_connection(("127.0.0.1", a.port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    headers = bearer()
    slow.sendall(b"POST /aura/test/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: {headers['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                 + body)
    head = ""
    while "\r\n\r\n" not in head:
        head += slow.recv(1).decode(errors="replace")  # the headers only; then this client stops reading
    run_id = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                  if line.lower().startswith("x-aura-run-id"))
    try:
        async with httpx.AsyncClient(base_url=a.url, timeout=10) as client:
            flowing = await client.post("/aura/test/stream", headers=bearer("bob"),
                                        json={"prompt": '@answer {"text": "still flowing", "chunks": 3}'})
            assert flowing.text.endswith("data: [DONE]\n\n")
            deadline = time.monotonic() + 30
            while True:
                snapshot = (await client.get(f"/aura/runs/{run_id}", headers=bearer())).json()
                if snapshot["status"] != "running" or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        assert snapshot["status"] == "cancelled" and snapshot["end"]["reason"] == "client_disconnected"
    finally:
        slow.close()


async def test_sigterm_ends_fifty_open_streams_within_the_grace_period(
        start_aura: Callable[..., AuraProcess], e2e_workspace: Path, redis_server: RedisServer,
        clean_redis: redis.Redis) -> None:
    aura = start_aura(redis_url=redis_server.url, env={"AURA_SERVER__GRACEFUL_TIMEOUT_SECONDS": "5",
                                                        "AURA_RUNS__MAX_PER_USER": "100"})
    stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=aura.url, timeout=20,
                                 limits=httpx.Limits(max_connections=100)) as client:
        async def one(i: int) -> list[dict[str, Any]]:
            async with open_run(client, {"prompt": COMMIT}, bearer(f"user{i}")) as run:
                await run.until("hitl")
                parked.append(i)
                if len(parked) == 50:
                    all_parked.set()
                return await run.rest()

        parked: list[int] = []
        all_parked = asyncio.Event()
        tasks = [asyncio.create_task(one(i)) for i in range(50)]
        await asyncio.wait_for(all_parked.wait(), 30)
        assert aura.process is not None
        aura.process.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        results = await asyncio.gather(*tasks)
        exit_code = await asyncio.to_thread(aura.process.wait, 10)
        elapsed = time.monotonic() - sent_at
    assert exit_code == 0 and elapsed < 5
    for events in results:
        assert events[-1]["type"] == "end"
        assert events[-1]["data"]["status"] == "cancelled" and events[-1]["data"]["reason"] == "server_shutdown"
    pending = [json.loads(v) for v in clean_redis.mget(clean_redis.keys("hitl:request:*"))]
    assert len(pending) == 50 and {p["status"] for p in pending} == {"cancelled"}
