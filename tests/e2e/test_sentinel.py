"""Two Aura instances on a real Sentinel group (1 master, 1 replica, 3 sentinels), by
`AURA_REDIS__URL=redis+sentinel://...` alone: the two-instance scenarios of test_cluster.py, and a
`SENTINEL FAILOVER` in the middle of a load of streams and approvals that loses no event a client
received and reverts no decision answered 200."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import redis

from tests.aura_process import AuraProcess
from tests.e2e.test_cluster import (  # the scenarios, run here against the Sentinel group
    test_cancel_through_the_api_ends_the_run_for_every_watcher,
    test_follower_reports_run_lost_when_the_owner_is_killed,
    test_resume_on_another_instance_has_no_gap_and_no_duplicate,
    test_run_on_a_is_approved_through_b_and_another_by_a_raw_publish,
)
from tests.fake_dwp import FakeDwp, FakeResponse
from tests.sentinel_group import SentinelGroup, start_sentinel_group
from tests.support import bearer

SCENARIOS = (test_run_on_a_is_approved_through_b_and_another_by_a_raw_publish,
             test_resume_on_another_instance_has_no_gap_and_no_duplicate,
             test_cancel_through_the_api_ends_the_run_for_every_watcher,
             test_follower_reports_run_lost_when_the_owner_is_killed)


@pytest.fixture(scope="module")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    group = start_sentinel_group(tmp_path_factory.mktemp("sentinel"))
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture
def clean_redis(sentinel_group: SentinelGroup) -> Iterator[redis.Redis]:
    """A client of the master the sentinels name now, emptied first (the scenarios read it)."""
    sentinel_group.wait_until_healthy()
    client = sentinel_group.master()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def cluster(start_aura: Callable[..., AuraProcess], sentinel_group: SentinelGroup,
            clean_redis: redis.Redis) -> Callable[..., tuple[AuraProcess, AuraProcess]]:
    def start(**env: str) -> tuple[AuraProcess, AuraProcess]:
        a = start_aura(redis_url=sentinel_group.url, env={"AURA_RUNS__INSTANCE_ID": "aura-a", **env})
        b = start_aura(redis_url=sentinel_group.url, env={"AURA_RUNS__INSTANCE_ID": "aura-b", **env})
        return a, b
    return start


async def test_ready_names_the_master_and_new_runs_follow_it(
        cluster: Callable[..., tuple[AuraProcess, AuraProcess]]) -> None:
    a, _b = cluster()
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as client:
        assert (await client.get("/ready")).json() == {"status": "ready"}


# --- a failover under load --------------------------------------------------------------------

CONCURRENCY = 8
APPROVED_BEFORE_FAILOVER = 12
COMPLETED_AFTER_FAILOVER = 12
RUN_TIMEOUT_SECONDS = 30.0
LOAD_TIMEOUT_SECONDS = 120.0


@dataclass
class Load:
    """What the clients saw: every event's bytes by (run, seq), every decision answered 200."""

    received: dict[tuple[str, int], bytes] = field(default_factory=dict)
    approved: list[str] = field(default_factory=list)
    approval_answers: Counter[int] = field(default_factory=Counter)
    runs_completed: int = 0
    runs_completed_after_failover: int = 0
    runs_failed: list[str] = field(default_factory=list)
    failover_done: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def note(self) -> None:
        self.changed.set()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(LOAD_TIMEOUT_SECONDS):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            pytest.fail(f"no {what} within {LOAD_TIMEOUT_SECONDS} s: completed {self.runs_completed}, "
                        f"failed {self.runs_failed[-5:]}")


def frames(buffer: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The whole SSE frames in `buffer` as (id, data) and the incomplete rest."""
    out = []
    *blocks, rest = buffer.split(b"\n\n")
    for block in blocks:
        lines = [line for line in block.split(b"\n") if b": " in line and not line.startswith(b":")]
        fields = dict(line.split(b": ", 1) for line in lines)
        if b"data" in fields:
            out.append((fields.get(b"id", b""), fields[b"data"]))
    return out, rest


def is_store_failure_notice(data: bytes) -> bool:
    """The closing pair a run sends when the store failed under it (`error` store_unavailable,
    retryable, then `end` failed store_unavailable): sent even when the log cannot take it."""
    envelope = json.loads(data)
    if envelope["type"] == "error":
        return bool(envelope["data"]["errorType"] == "store_unavailable" and envelope["data"]["retryable"])
    return bool(envelope["type"] == "end" and envelope["data"]["reason"] == "store_unavailable")


async def approve(client: httpx.AsyncClient, request_id: str, user: str, load: Load) -> None:
    """Approve as a client does: retry what is retryable until the decision is answered."""
    while True:
        try:
            answer = await client.post(f"/aura/hitl/approve/{request_id}", headers=bearer(user))
        except httpx.TransportError:
            continue
        load.approval_answers[answer.status_code] += 1
        if answer.status_code == 200:
            load.approved.append(request_id)
            load.note()
            return
        if answer.status_code != 503:  # 409: decided already (a retry of one that was applied)
            return
        await asyncio.sleep(0.1)  # the client's retry back-off (Retry-After), not a wait for an outcome


async def one_run(i: int, clients: list[httpx.AsyncClient], load: Load) -> None:
    home, other = clients[i % 2], clients[(i + 1) % 2]
    user = f"user{i % 20}"
    prompt = "@dwp_request " + json.dumps({"method": "POST", "path": "/api/items", "body": {"marker": f"m{i}"}})
    after_failover = load.failover_done
    buffer, last = b"", b""
    try:
        async with asyncio.timeout(RUN_TIMEOUT_SECONDS):
            async with home.stream("POST", "/aura/test/stream", json={"prompt": prompt},
                                   headers=bearer(user)) as response:
                if response.status_code != 200:
                    load.runs_failed.append(f"{i}: HTTP {response.status_code}")
                    return
                async for chunk in response.aiter_bytes():
                    got, buffer = frames(buffer + chunk)
                    for frame_id, data in got:
                        last = data
                        if data == b"[DONE]":
                            continue
                        run_id, seq = frame_id.decode().rsplit(":", 1)
                        load.received[(run_id, int(seq))] = data
                        envelope = json.loads(data)
                        if envelope["type"] == "hitl":
                            await approve(other, envelope["data"]["requestId"], user, load)
    except (httpx.TransportError, TimeoutError) as exc:
        load.runs_failed.append(f"{i}: {type(exc).__name__}")
        return
    finally:
        load.note()
    if last == b"[DONE]":
        envelopes = [json.loads(d) for (r, _), d in load.received.items() if r == response.headers["x-aura-run-id"]]
        end = max(envelopes, key=lambda e: e["seq"])
        if end["type"] == "end" and end["data"]["status"] == "completed":
            load.runs_completed += 1
            load.runs_completed_after_failover += after_failover
            return
        load.runs_failed.append(f"{i}: ended {end['data']}")
    else:
        load.runs_failed.append(f"{i}: stream cut")


async def test_a_failover_under_load_loses_no_received_event_and_reverts_no_decision(
        sentinel_group: SentinelGroup, clean_redis: redis.Redis, start_aura: Callable[..., AuraProcess]) -> None:
    dwp = FakeDwp().start()
    dwp.respond("POST", "/api/items", FakeResponse.of_json({"ok": True}, status=201))
    env = {"AURA_TOOLS__DWP_BASE_URL": dwp.base_url, "AURA_RUNS__MAX_PER_USER": "1000",
           "AURA_RUNS__MAX_PER_TENANT": "1000", "AURA_STREAM__MAX_PER_USER": "1000",
           "AURA_HITL__RECHECK_SECONDS": "1", "AURA_LOG__LEVEL": "WARNING"}
    auras = [start_aura(redis_url=sentinel_group.url, env={**env, "AURA_RUNS__INSTANCE_ID": f"aura-{n}"})
             for n in ("a", "b")]
    load = Load()
    stop = False
    counter = itertools.count()
    clients = [httpx.AsyncClient(base_url=aura.url, timeout=RUN_TIMEOUT_SECONDS) for aura in auras]

    async def worker() -> None:
        while not stop:
            await one_run(next(counter), clients, load)

    workers = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
    try:
        await load.until(lambda: len(load.approved) >= APPROVED_BEFORE_FAILOVER, "approvals before the failover")
        old_master = sentinel_group.master_port()
        started = time.monotonic()
        new_master = await asyncio.to_thread(sentinel_group.failover)
        failover_seconds = time.monotonic() - started
        load.failover_done = True
        await load.until(lambda: load.runs_completed_after_failover >= COMPLETED_AFTER_FAILOVER,
                         "runs completed after the failover")
        stop = True
        await asyncio.gather(*workers)
    finally:
        stop = True
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for client in clients:
            await client.aclose()
        dwp.stop()
    assert new_master != old_master
    print(f"failover {failover_seconds:.1f} s; runs completed {load.runs_completed}, failed {len(load.runs_failed)}; "
          f"events received {len(load.received)}; approvals answered {dict(load.approval_answers)}")

    with redis.Redis(host="127.0.0.1", port=new_master) as master:
        assert master.execute_command("ROLE")[0] == b"master"
        lost, notices = [], 0
        for (run_id, seq), data in load.received.items():
            entries = master.xrange(f"aura:run:{run_id}:events", min=f"{seq}-1", max=f"{seq}-1")
            if entries and entries[0][1].get(b"e") == data:
                continue
            if is_store_failure_notice(data):
                notices += 1  # "the store failed, retry": the error a failover may cost, not a lost event
            else:
                lost.append((run_id, seq))
        print(f"store failure notices (error/end store_unavailable) not in the log: {notices}")
        assert lost == [], (f"{len(lost)} of {len(load.received)} received events are not in the log: "
                            f"{[(key, load.received[key][:300]) for key in lost[:5]]}")
        reverted = [request_id for request_id in load.approved
                    if json.loads(master.get(f"hitl:request:{request_id}") or b"{}").get("status") != "approved"]
        assert reverted == [], f"{len(reverted)} of {len(load.approved)} decisions answered 200 are not approved"
    # every approved call was made once at most, whatever the failover cut
    markers = Counter(r.json["marker"] for r in dwp.requests if r.method == "POST")
    assert markers and max(markers.values()) == 1
    for aura in auras:
        async with httpx.AsyncClient(base_url=aura.url, timeout=10) as client:
            assert (await client.get("/ready")).json() == {"status": "ready"}

