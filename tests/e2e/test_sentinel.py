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
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis

from tests.aura_process import AuraProcess
from tests.conftest import Store
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
def store(sentinel_group: SentinelGroup, clean_redis: redis.Redis) -> Store:
    """The scenarios' view of the store: the group's URL, and a client of its master now."""
    return Store("redis-sentinel", sentinel_group.url, clean_redis)


@pytest.fixture
def instances(start_aura: Callable[..., AuraProcess], sentinel_group: SentinelGroup,
              clean_redis: redis.Redis) -> Callable[..., tuple[AuraProcess, AuraProcess]]:
    def start(**env: str) -> tuple[AuraProcess, AuraProcess]:
        a = start_aura(redis_url=sentinel_group.url, env={"AURA_RUNS__INSTANCE_ID": "aura-a", **env})
        b = start_aura(redis_url=sentinel_group.url, env={"AURA_RUNS__INSTANCE_ID": "aura-b", **env})
        return a, b
    return start


async def test_ready_names_the_master_and_new_runs_follow_it(
        instances: Callable[..., tuple[AuraProcess, AuraProcess]]) -> None:
    a, _b = instances()
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as client:
        assert (await client.get("/ready")).json() == {"status": "ready"}


# --- a failover under load --------------------------------------------------------------------

CONCURRENCY = 8
APPROVED_BEFORE_FAILOVER = 12
COMPLETED_AFTER_FAILOVER = 12
RUN_TIMEOUT_SECONDS = 30.0
# Notices (seq 0) the clients received, by run: how a run ended for its client when the log could not say.
NOTICES: dict[str, list[dict[str, Any]]] = {}
RESUMES = 60  # with the reconnect delay, longer than a failover takes
LOAD_TIMEOUT_SECONDS = 120.0


@dataclass
class Load:
    """What the clients saw: every event's bytes by (run, seq), every decision answered 200."""

    received: dict[tuple[str, int], bytes] = field(default_factory=dict)
    followed: dict[tuple[str, int], bytes] = field(default_factory=dict)  # read from the other instance
    approved: list[str] = field(default_factory=list)
    approval_answers: Counter[int] = field(default_factory=Counter)
    runs_completed: int = 0
    runs_completed_after_failover: int = 0
    runs_failed: list[str] = field(default_factory=list)
    failover_done: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def runs_failed_why(self) -> list[str]:
        return [why.split(": ", 1)[1][:90] for why in self.runs_failed]

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


async def read_events(response: httpx.Response, into: dict[tuple[str, int], bytes]) -> AsyncIterator[bytes]:
    """Each frame's data as it arrives, noted by (run, seq) in `into` (the [DONE] too, unnoted)."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        got, buffer = frames(buffer + chunk)
        for frame_id, data in got:
            if data != b"[DONE]":
                if not frame_id:  # a notice (seq 0: no resume point), not an event of the log
                    assert json.loads(data)["seq"] == 0, data
                    NOTICES.setdefault(json.loads(data)["runId"], []).append(json.loads(data))
                    yield data
                    continue
                run_id, seq = frame_id.decode().rsplit(":", 1)
                into[(run_id, int(seq))] = data
            yield data


async def follow(client: httpx.AsyncClient, run_id: str, user: str, load: Load) -> None:
    """Read the run from the instance that does not own it, from its first event to its end."""
    try:
        async with asyncio.timeout(RUN_TIMEOUT_SECONDS):
            async with client.stream("GET", f"/aura/runs/{run_id}/events", headers=bearer(user)) as response:
                if response.status_code == 200:
                    async for _ in read_events(response, load.followed):
                        pass
    except (httpx.TransportError, TimeoutError):
        pass  # a cut follow is a client's retry, not a loss: what it received is checked all the same


async def one_run(i: int, clients: list[httpx.AsyncClient], load: Load) -> None:
    """One run as a client drives it: started on one instance, approved on the other, resumed
    with Last-Event-ID (on either) when its connection ends before [DONE]; every third run is
    also read from the other instance from its first event."""
    home, other = clients[i % 2], clients[(i + 1) % 2]
    user = f"user{i % 20}"
    prompt = "@dwp_request " + json.dumps({"method": "POST", "path": "/api/items", "body": {"marker": f"m{i}"}})
    after_failover = load.failover_done
    last, last_seq, run_id = b"", 0, ""
    decided: set[str] = set()
    retry = False
    follower: asyncio.Task[None] | None = None

    async def consume(response: httpx.Response) -> None:
        nonlocal last, last_seq, retry
        retry = False
        async for data in read_events(response, load.received):
            last = data
            if data == b"[DONE]":
                continue
            envelope = json.loads(data)
            if envelope["seq"] == 0:
                if envelope["type"] == "error" and envelope["data"]["retryable"]:
                    retry = True  # "reconnect with Last-Event-ID": the client does
                continue
            last_seq = max(last_seq, envelope["seq"])
            if envelope["type"] == "hitl" and envelope["data"]["requestId"] not in decided:
                decided.add(envelope["data"]["requestId"])
                await approve(other, envelope["data"]["requestId"], user, load)

    try:
        async with asyncio.timeout(RUN_TIMEOUT_SECONDS):
            async with home.stream("POST", "/aura/test/stream", json={"prompt": prompt},
                                   headers=bearer(user)) as response:
                if response.status_code != 200:
                    load.runs_failed.append(f"{i}: HTTP {response.status_code}")
                    return
                run_id = response.headers["x-aura-run-id"]
                if i % 3 == 0:
                    follower = asyncio.create_task(follow(other, run_id, user, load))
                try:
                    await consume(response)
                except httpx.TransportError:
                    pass
            for attempt in range(1, RESUMES + 1):
                if last == b"[DONE]" and not retry:
                    break
                resume_on = clients[(i + attempt) % 2]
                headers = {**bearer(user), "Last-Event-ID": f"{run_id}:{last_seq}"} if last_seq else bearer(user)
                try:
                    async with resume_on.stream("GET", f"/aura/runs/{run_id}/events", headers=headers) as response:
                        if response.status_code == 200:
                            await consume(response)
                except httpx.TransportError:
                    pass
                if last != b"[DONE]" or retry:
                    await asyncio.sleep(0.2)  # the client's reconnect delay (the stream's retry: hint)
    except TimeoutError:
        load.runs_failed.append(f"{i}: run {run_id} after seq {last_seq} timed out")
        return
    finally:
        if follower is not None:
            await follower
        load.note()
    ends = [json.loads(d) for (r, _), d in load.received.items() if r == run_id and b'"type":"end"' in d]
    ends += [notice for notice in NOTICES.get(run_id, []) if notice["type"] == "end" and not retry]
    if ends and ends[-1]["data"]["status"] == "completed":
        load.runs_completed += 1
        load.runs_completed_after_failover += after_failover
    else:
        load.runs_failed.append(f"{i}: ended {ends[-1]['data'] if ends else last[:200]!r}")


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
          f"events received {len(load.received)} (followers {len(load.followed)}); "
          f"approvals answered {dict(load.approval_answers)}; failed runs: {Counter(load.runs_failed_why())}")

    with redis.Redis(host="127.0.0.1", port=new_master) as master:
        assert master.execute_command("ROLE")[0] == b"master"
        lost, notices = [], 0
        for (run_id, seq), data in [*load.received.items(), *load.followed.items()]:
            entries = master.xrange(f"aura:run:{{{run_id}}}:events", min=f"{seq}-1", max=f"{seq}-1")
            if entries and entries[0][1].get(b"e") == data:
                continue
            if is_store_failure_notice(data):
                notices += 1  # "the store failed, retry": the error a failover may cost, not a lost event
            else:
                lost.append((run_id, seq))
        print(f"store failure notices (error/end store_unavailable) not in the log: {notices}")
        assert lost == [], (f"{len(lost)} of {len(load.received) + len(load.followed)} received events are not "
                            "in the log: "
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

