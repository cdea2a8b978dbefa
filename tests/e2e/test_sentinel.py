"""Two Aura instances on a real Sentinel group (1 master, 1 replica, 3 sentinels), by
`AURA_REDIS__URL=redis+sentinel://...` alone: the two-instance scenarios of test_cluster.py, and a
`SENTINEL FAILOVER` in the middle of a load of streams and approvals that loses no event a client
received and reverts no decision answered 200."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis

from tests.aura_process import AuraProcess
from tests.conftest import Store
from tests.e2e.failover_load import LoadDriver, is_store_failure_notice
from tests.e2e.test_cluster import (  # the scenarios, run here against the Sentinel group
    test_cancel_through_the_api_ends_the_run_for_every_watcher,
    test_follower_reports_run_lost_when_the_owner_is_killed,
    test_resume_on_another_instance_has_no_gap_and_no_duplicate,
    test_run_on_a_is_approved_through_b_and_another_by_a_raw_publish,
)
from tests.fake_dwp import FakeDwp, FakeResponse
from tests.sentinel_group import SentinelGroup, start_sentinel_group

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


async def test_a_failover_under_load_loses_no_received_event_and_reverts_no_decision(
        sentinel_group: SentinelGroup, clean_redis: redis.Redis, start_aura: Callable[..., AuraProcess]) -> None:
    dwp = FakeDwp().start()
    dwp.respond("POST", "/api/items", FakeResponse.of_json({"ok": True}, status=201))
    env = {"AURA_TOOLS__DWP_BASE_URL": dwp.base_url, "AURA_RUNS__MAX_PER_USER": "1000",
           "AURA_RUNS__MAX_PER_TENANT": "1000", "AURA_STREAM__MAX_PER_USER": "1000",
           "AURA_HITL__RECHECK_SECONDS": "1", "AURA_LOG__LEVEL": "WARNING"}
    auras = [start_aura(redis_url=sentinel_group.url, env={**env, "AURA_RUNS__INSTANCE_ID": f"aura-{n}"})
             for n in ("a", "b")]
    driver = LoadDriver(auras, CONCURRENCY)
    load = driver.load
    try:
        await load.until(lambda: len(load.approved) >= APPROVED_BEFORE_FAILOVER, "approvals before the failover")
        old_master = sentinel_group.master_port()
        started = time.monotonic()
        new_master = await asyncio.to_thread(sentinel_group.failover)
        driver.outcome = f"failover {time.monotonic() - started:.1f} s"
        load.failover_done = True
        await load.until(lambda: load.runs_completed_after_failover >= COMPLETED_AFTER_FAILOVER,
                         "runs completed after the failover")
        await driver.drain()
    finally:
        await driver.finish()
        dwp.stop()
    assert new_master != old_master

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
    # every stream ended with an `end` then [DONE] (or the reconnect frame), and no run a client was
    # given the id of was unknown afterwards
    assert load.done_without_end == []
    assert load.not_found == []
    # every approved call was made once at most, whatever the failover cut
    markers = Counter(r.json["marker"] for r in dwp.requests if r.method == "POST")
    assert markers and max(markers.values()) == 1
    for aura in auras:
        async with httpx.AsyncClient(base_url=aura.url, timeout=10) as client:
            assert (await client.get("/ready")).json() == {"status": "ready"}

