"""What real clients do to a stream, against two real instances on a real redis-server: a POST
retried with the Last-Event-ID it last saw (fetch-event-source does this after every drop) resumes
that run on any instance and never starts a second one; a reader that comes back within the
disconnect grace period keeps the run; heartbeats never reach httpx-sse, sseclient-py or
requests-sse as messages."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import httpx_sse
import redis
import requests
import requests_sse
import sseclient

from tests.aura_process import AuraProcess
from tests.e2e.test_cluster import COMMIT, stage
from tests.sse_client import open_run
from tests.support import bearer


def run_keys(store: redis.Redis) -> list[bytes]:
    return sorted(store.keys("aura:run:*:meta"))  # type: ignore[arg-type]


async def test_a_post_retried_with_its_last_event_id_resumes_that_run_on_the_other_instance(
        cluster: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path,
        clean_redis: redis.Redis) -> None:
    a, b = cluster()
    stage(e2e_workspace)
    body = {"prompt": COMMIT}  # no Idempotency-Key: what fetch-event-source sends
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        async with open_run(on_a, body, bearer()) as first:
            hitl = await first.until("hitl")
            seen = list(first.events)
            run_id = hitl["runId"]
        # the connection dropped; the library sends the same POST again, with the last id it saw
        last_id = f"{run_id}:{seen[-1]['seq']}"
        async with open_run(on_b, body, {**bearer(), "Last-Event-ID": last_id}) as retry:
            assert retry.response.headers["x-aura-run-id"] == run_id
            assert (await on_b.post(f"/aura/hitl/approve/{hitl['data']['requestId']}",
                                    headers=bearer())).status_code == 200
            rest = await retry.rest()
        seqs = [e["seq"] for e in seen + rest]
        assert seqs == list(range(1, len(seqs) + 1))
        assert [e["type"] for e in seen + rest].count("end") == 1 and rest[-1]["data"]["status"] == "completed"
        assert run_keys(clean_redis) == [f"aura:run:{{{run_id}}}:meta".encode()]  # exactly one run
        # after the end, the same retry is answered with [DONE] and nothing else
        done = await on_a.post("/aura/test/stream", json=body,
                               headers={**bearer(), "Last-Event-ID": f"{run_id}:{seqs[-1]}"})
        assert (done.status_code, done.text) == (200, "data: [DONE]\n\n")
        changed = await on_a.post("/aura/test/stream", json={"prompt": "something else"},
                                  headers={**bearer(), "Last-Event-ID": last_id})
        assert changed.status_code == 409 and changed.json()["code"] == "resume_request_mismatch"
        stranger = await on_b.post("/aura/test/stream", json=body, headers={**bearer("bob"), "Last-Event-ID": last_id})
        assert stranger.status_code == 404 and stranger.json()["code"] == "run_not_found"
        elsewhere = await on_b.get(f"/aura/runs/{run_id}/events",
                                   headers={**bearer(), "Last-Event-ID": "run_other:3"})
        assert elsewhere.status_code == 422 and elsewhere.json()["code"] == "invalid_last_event_id"
        assert run_keys(clean_redis) == [f"aura:run:{{{run_id}}}:meta".encode()]


async def test_a_reader_back_within_the_grace_period_keeps_the_run_and_none_cancels_it(
        cluster: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path) -> None:
    a, b = cluster(AURA_STREAM__DISCONNECT_GRACE_SECONDS="2")
    stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as on_a, \
            httpx.AsyncClient(base_url=b.url, timeout=10) as on_b:
        async with open_run(on_a, {"prompt": COMMIT}, bearer()) as first:  # onDisconnect: cancel
            hitl = await first.until("hitl")
        run_id = hitl["runId"]
        # the tab was hidden: the reader comes back through the other instance
        async with open_run(on_b, {"prompt": COMMIT},
                            {**bearer(), "Last-Event-ID": f"{run_id}:{hitl['seq']}"}) as back:
            await asyncio.sleep(3)  # longer than the grace period, with a reader on B only
            assert (await on_a.get(f"/aura/hitl/requests/{hitl['data']['requestId']}",
                                   headers=bearer())).json()["status"] == "pending"
            assert (await on_b.post(f"/aura/hitl/approve/{hitl['data']['requestId']}",
                                    headers=bearer())).status_code == 200
            rest = await back.rest()
        assert rest[-1]["type"] == "end" and rest[-1]["data"]["status"] == "completed"
        # nobody comes back: cancelled once the grace period is over
        async with open_run(on_a, {"prompt": COMMIT}, bearer()) as gone:
            dropped = await gone.until("hitl")
        async with asyncio.timeout(10):
            while (snapshot := (await on_a.get(f"/aura/runs/{dropped['runId']}",  # noqa: ASYNC110
                                               headers=bearer())).json())["end"] is None:
                await asyncio.sleep(0.1)
        assert (snapshot["status"], snapshot["end"]["reason"]) == ("cancelled", "client_disconnected")


def heartbeats_sent(url: str) -> int:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(r"^aura_heartbeats_sent_total (\S+)$", text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def approve_after_heartbeats(url: str, request_id: str, at_least: int) -> None:
    """Approve once the server has sent `at_least` more heartbeats (counted by its metrics)."""
    start = heartbeats_sent(url)
    done = threading.Event()
    while heartbeats_sent(url) < start + at_least:
        done.wait(0.05)
    assert httpx.post(f"{url}/aura/hitl/approve/{request_id}", headers=bearer()).status_code == 200


def read_with(library: str, url: str, body: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(event type, data) of every message the library hands to its application, until [DONE];
    approves the run's approval after several heartbeats on the way."""
    messages: list[tuple[str | None, str]] = []
    approver: threading.Thread | None = None

    def seen(event: str | None, data: str) -> bool:
        nonlocal approver
        messages.append((event, data))
        if event == "hitl" and approver is None:
            request_id = json.loads(data)["data"]["requestId"]
            approver = threading.Thread(target=approve_after_heartbeats, args=(url, request_id, 3))
            approver.start()
        return data == "[DONE]"

    headers = {**bearer(), "Accept": "text/event-stream"}
    if library == "httpx-sse":
        with httpx.Client(base_url=url, timeout=10) as client, \
                httpx_sse.connect_sse(client, "POST", "/aura/test/stream", json=body, headers=headers) as source:
            for sse in source.iter_sse():
                if seen(sse.event, sse.data):
                    break
    elif library == "sseclient-py":
        with requests.post(f"{url}/aura/test/stream", json=body, headers=headers, stream=True, timeout=10) as response:
            for sse in sseclient.SSEClient(response).events():
                if seen(sse.event, sse.data):
                    break
    else:
        with requests_sse.EventSource(f"{url}/aura/test/stream", method="POST", json=body, headers=headers,
                                      timeout=10) as source:
            for sse in source:
                if seen(sse.type, sse.data):
                    break
    assert approver is not None
    approver.join(10)
    return messages


async def test_third_party_python_parsers_never_see_a_heartbeat(
        start_aura: Callable[..., AuraProcess], e2e_workspace: Path) -> None:
    aura = start_aura(env={"AURA_STREAM__HEARTBEAT_SECONDS": "0.05"})
    for library in ("httpx-sse", "sseclient-py", "requests-sse"):
        stage(e2e_workspace)
        messages = await asyncio.to_thread(read_with, library, aura.url, {"prompt": COMMIT})
        assert messages[-1] == ("message", "[DONE]"), library
        envelopes = [json.loads(data) for _, data in messages[:-1]]  # every message is an event: no empty ones
        assert [event for event, _ in messages[:-1]] == [e["type"] for e in envelopes], library
        assert [e["seq"] for e in envelopes] == list(range(1, len(envelopes) + 1)), library
        assert envelopes[-1]["type"] == "end" and envelopes[-1]["data"]["status"] == "completed", library
    assert heartbeats_sent(aura.url) >= 9  # three approvals, each after three heartbeats


async def test_open_streams_are_capped_per_run_and_per_user_with_429_and_retry_after(
        start_aura: Callable[..., AuraProcess], e2e_workspace: Path) -> None:
    aura = start_aura(env={"AURA_STREAM__MAX_PER_RUN": "2", "AURA_STREAM__MAX_PER_USER": "3",
                           "AURA_STREAM__HEARTBEAT_SECONDS": "0.2"})
    stage(e2e_workspace)
    async with httpx.AsyncClient(base_url=aura.url, timeout=10) as client:
        async with open_run(client, {"prompt": COMMIT, "onDisconnect": "continue"}, bearer()) as run:
            hitl = await run.until("hitl")
        events = f"/aura/runs/{hitl['runId']}/events"
        resume = {**bearer(), "Last-Event-ID": f"{hitl['runId']}:{hitl['seq']}"}
        async with client.stream("GET", events, headers=resume) as first, \
                client.stream("GET", events, headers=resume) as second:
            assert (first.status_code, second.status_code) == (200, 200)
            third = await client.get(events, headers=resume)
            assert (third.status_code, third.headers["retry-after"], third.json()["code"]) == (
                429, "5", "too_many_streams")
            assert "this run (limit 2)" in third.json()["detail"]
            other_run = await client.post("/aura/test/stream", headers=bearer(),
                                          json={"prompt": '@answer {"text": "x"}'})
            assert other_run.status_code == 200  # the user's third stream
            async with client.stream("POST", "/aura/test/stream", headers=bearer(),
                                     json={"prompt": COMMIT, "onDisconnect": "continue"}) as held:
                assert held.status_code == 200  # the user's third open stream
                fourth = await client.post("/aura/test/stream", headers=bearer(), json={"prompt": "hi"})
                assert (fourth.status_code, fourth.headers["retry-after"], fourth.json()["code"]) == (
                    429, "5", "too_many_streams")
                assert "this user (limit 3)" in fourth.json()["detail"]
                assert (await client.post("/aura/test/stream", headers=bearer("bob"),
                                          json={"prompt": '@answer {"text": "x"}'})).status_code == 200
        async with client.stream("GET", events, headers=resume) as again:  # the slots were given back
            assert again.status_code == 200
