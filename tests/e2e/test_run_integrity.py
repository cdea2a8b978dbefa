"""Two real instances on a real redis-server: a finished run is never rewritten by a resume, an
owner frozen past its lease never acts after it was declared lost, and a killed owner leaves no
pending approval, taken slot or running record behind."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.aura_process import AuraProcess
from tests.e2e.test_cluster import COMMIT, frames_to_events, stage
from tests.sse_client import open_run
from tests.support import bearer, git


def log_entries(clean_redis: redis.Redis, run_id: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return clean_redis.xrange(f"aura:run:{{{run_id}}}:events")  # type: ignore[return-value]


def meta(clean_redis: redis.Redis, run_id: str) -> dict[str, Any]:
    raw = clean_redis.get(f"aura:run:{{{run_id}}}:meta")
    assert isinstance(raw, bytes)
    return json.loads(raw)  # type: ignore[no-any-return]


async def wait_for(condition: Callable[[], Any], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_resume_at_or_after_the_end_on_either_instance_replays_at_most_the_end_and_changes_nothing(
        cluster: Callable[..., tuple[AuraProcess, AuraProcess]], clean_redis: redis.Redis) -> None:
    a, b = cluster(AURA_RUNS__LEASE_SECONDS="1", AURA_STREAM__HEARTBEAT_SECONDS="0.2")
    body = {"prompt": '@answer {"text": "one two three", "chunks": 3}'}
    headers = {**bearer(), "Idempotency-Key": "finished-1"}
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        first = await on_a.post("/aura/test/stream", json=body, headers=headers)
        run_id = first.headers["x-aura-run-id"]
        events = frames_to_events(first.text)
        end_seq = events[-1]["seq"]
        assert events[-1]["type"] == "end" and events[-1]["data"]["status"] == "completed"
        logged = log_entries(clean_redis, run_id)
        record = meta(clean_redis, run_id)
        end_frame = first.text.removesuffix("data: [DONE]\n\n")
        end_frame = end_frame[end_frame.rindex(f"id: {run_id}:{end_seq}\n"):]
        for client in (on_a, on_b):
            # At the end's id the client has it: [DONE] alone. Beyond the log (events a killed
            # master took along, or a client's bookkeeping) it cannot have it: the end again.
            for after, replay in ((end_seq, ""), (end_seq + 1, end_frame), (end_seq + 50, end_frame)):
                resumed = await client.get(f"/aura/runs/{run_id}/events",
                                           headers={**bearer(), "Last-Event-ID": str(after)})
                assert (resumed.status_code, resumed.text) == (200, replay + "data: [DONE]\n\n")
                retried = await client.post("/aura/test/stream", json=body,
                                            headers={**headers, "Last-Event-ID": str(after)})
                assert (retried.status_code, retried.text) == (200, replay + "data: [DONE]\n\n")
            before_end = await client.get(f"/aura/runs/{run_id}/events",
                                          headers={**bearer(), "Last-Event-ID": str(end_seq - 1)})
            assert [e["seq"] for e in frames_to_events(before_end.text)] == [end_seq]
            assert before_end.text.endswith("data: [DONE]\n\n")
        await asyncio.sleep(2.5)  # two lease lengths: the sweepers of both instances have looked
        assert log_entries(clean_redis, run_id) == logged
        assert meta(clean_redis, run_id) == record and record["status"] == "completed"
        snapshot = (await on_b.get(f"/aura/runs/{run_id}", headers=bearer())).json()
        assert snapshot["status"] == "completed" and snapshot["lastSeq"] == end_seq


async def test_an_id_beyond_a_live_runs_log_still_gets_its_end(
        cluster: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path, clean_redis: redis.Redis) -> None:
    a, b = cluster(AURA_STREAM__HEARTBEAT_SECONDS="0.2")
    repo = stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        for client in (on_a, on_b):  # on the owner (a local watcher) and elsewhere (a remote follow)
            (repo / f"{id(client)}.txt").write_text("x\n")
            git(repo, "add", ".")
            async with open_run(on_a, {"prompt": COMMIT, "onDisconnect": "continue"}, bearer()) as run:
                hitl = await run.until("hitl")
            run_id = hitl["runId"]
            async with client.stream("GET", f"/aura/runs/{run_id}/events",
                                     headers={**bearer(), "Last-Event-ID": str(hitl["seq"] + 40)}) as resumed:
                body = ""
                approved = False
                async for text in resumed.aiter_text():
                    body += text
                    if not approved:  # the stream is open (a heartbeat came): now the run goes on
                        approved = True
                        assert (await on_a.post(f"/aura/hitl/approve/{hitl['data']['requestId']}",
                                                headers=bearer())).status_code == 200
                    if body.endswith("data: [DONE]\n\n"):
                        break
            events = frames_to_events(body)
            assert events[-1]["type"] == "end" and events[-1]["data"]["status"] == "completed"
            # clamped to the log's last event when the resume began (the run logged a few after hitl)
            assert events[0]["seq"] > hitl["seq"]
            assert [e["seq"] for e in events] == list(range(events[0]["seq"], events[-1]["seq"] + 1))
            assert [json.loads(f[b"e"])["type"] for _, f in log_entries(clean_redis, run_id)].count("end") == 1


async def test_an_owner_frozen_past_its_lease_never_acts_after_it_was_declared_lost(
        cluster: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path, clean_redis: redis.Redis) -> None:
    a, b = cluster(AURA_RUNS__LEASE_SECONDS="1", AURA_STREAM__HEARTBEAT_SECONDS="0.2")
    repo = stage(e2e_workspace)
    head = git(repo, "rev-parse", "HEAD")
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        async with open_run(on_a, {"prompt": COMMIT, "onDisconnect": "continue"}, bearer()) as run:
            hitl = await run.until("hitl")
        run_id, request_id = hitl["runId"], hitl["data"]["requestId"]
        assert a.process is not None
        a.process.send_signal(signal.SIGSTOP)
        try:
            await wait_for(lambda: meta(clean_redis, run_id)["status"] == "failed", 10)  # B's sweeper declared it
            declared = log_entries(clean_redis, run_id)
            assert [json.loads(f[b"e"])["type"] for _, f in declared[-2:]] == ["error", "end"]
            refused = await on_b.post(f"/aura/hitl/approve/{request_id}", headers=bearer())
            assert refused.status_code == 409 and refused.json()["requestStatus"] == "cancelled"
            # the DWP backend's way of approving, straight into Redis, while A is frozen: A's
            # subscription will read it when it wakes
            session = hitl["data"]["sessionId"]
            signal_json = json.dumps({"type": "approval", "requestId": request_id, "status": "approved",
                                      "userId": "alice", "timestamp": int(time.time())})
            clean_redis.set(f"hitl:signal:{session}", signal_json, ex=300)
            clean_redis.publish(f"hitl:channel:{session}", signal_json)
        finally:
            a.process.send_signal(signal.SIGCONT)
        # A wakes: it learns it lost its lease (renewal) or is refused at its next write
        await wait_for(lambda: "lost its lease" in a.logs() or "refused" in a.logs(), 10)
        await asyncio.sleep(1.5)  # what A would do next has had time to happen
        assert log_entries(clean_redis, run_id) == declared
        assert git(repo, "rev-parse", "HEAD") == head  # the approved commit never ran
        assert meta(clean_redis, run_id)["status"] == "failed"
        replay = frames_to_events((await on_a.get(f"/aura/runs/{run_id}/events", headers=bearer())).text)
        assert [e["type"] for e in replay].count("end") == 1
        assert replay[-1]["data"]["reason"] == "run_lost"
        assert [e["seq"] for e in replay] == list(range(1, len(replay) + 1))


async def test_a_killed_owner_leaves_no_pending_approval_no_taken_slot_and_no_running_record(
        cluster: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path, clean_redis: redis.Redis) -> None:
    a, b = cluster(AURA_RUNS__LEASE_SECONDS="1", AURA_RUNS__MAX_PER_USER="1")
    stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        async with open_run(on_a, {"prompt": COMMIT, "onDisconnect": "continue"}, bearer()) as run:
            hitl = await run.until("hitl")
        run_id, request_id = hitl["runId"], hitl["data"]["requestId"]
        a.stop(signal.SIGKILL)  # nobody follows the run: only the sweeper can find it
        await wait_for(lambda: meta(clean_redis, run_id)["status"] == "failed", 10)
        assert (await on_b.get(f"/aura/hitl/requests/{request_id}", headers=bearer())).json()["status"] == \
            "cancelled"
        assert (await on_b.get("/aura/hitl/requests", headers=bearer())).json() == {"requests": []}
        refused = await on_b.post(f"/aura/hitl/approve/{request_id}", headers=bearer())
        assert refused.status_code == 409
        assert clean_redis.zcard("aura:slots:{acme}:user:alice") == 0
        assert clean_redis.zcard("aura:slots:{acme}:tenant") == 0
        assert clean_redis.zcard("aura:runs:active") == 0 and clean_redis.exists(f"aura:run:{{{run_id}}}:lease") == 0
        snapshot = (await on_b.get(f"/aura/runs/{run_id}", headers=bearer())).json()
        assert (snapshot["status"], snapshot["pendingApproval"], snapshot["end"]["reason"]) == (
            "failed", None, "run_lost")
        again = await on_b.post("/aura/test/stream", json={"prompt": "hi"}, headers=bearer())
        assert again.status_code == 200  # the one slot is free at once, not after 15 minutes


async def test_an_approval_no_run_heard_still_reaches_the_session_record(
        cluster: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path, clean_redis: redis.Redis) -> None:
    # The run's instance dies while the run waits; the user approves on the other instance (200:
    # the decision stands). Nobody will run the action, but the contract's session record must not
    # say pending for its hour: the sweep that declares the run lost writes the decision into it.
    a, b = cluster(AURA_RUNS__LEASE_SECONDS="1")
    stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        async with open_run(on_a, {"prompt": COMMIT, "onDisconnect": "continue"}, bearer()) as run:
            hitl = await run.until("hitl")
        run_id, request_id, session = hitl["runId"], hitl["data"]["requestId"], hitl["data"]["sessionId"]
        a.stop(signal.SIGKILL)
        approved = await on_b.post(f"/aura/hitl/approve/{request_id}", headers=bearer())
        assert approved.status_code == 200 and approved.json()["status"] == "approved"
        await wait_for(lambda: meta(clean_redis, run_id)["status"] == "failed", 10)
        record = json.loads(clean_redis.get(f"hitl:session:{session}"))  # type: ignore[arg-type]
        assert (record["requestId"], record["status"]) == (request_id, "approved")
        assert clean_redis.ttl(f"hitl:session:{session}") > 3500  # the TTL its creation gave it
        request = (await on_b.get(f"/aura/hitl/requests/{request_id}", headers=bearer())).json()
        assert (request["status"], request["decidedBy"]) == ("approved", "alice")  # the decision stands
