"""Two Aura instances on a real Redis Cluster (3 masters, 3 replicas) by `AURA_REDIS__URL=
redis+cluster://...` alone: a coordinated `CLUSTER FAILOVER` of every master that holds run keys,
one after the other, in the middle of a load of streams and approvals (the load of
test_sentinel.py) loses no event a client received, reverts no decision answered 200, ends every
run, and shows the clients only errors they may retry.

A manual `CLUSTER FAILOVER` is what operators run for maintenance: the replica catches up with its
master (which holds its clients meanwhile) before it takes over, so nothing the master
acknowledged is lost. A master that dies can lose what it acknowledged and had not yet sent to its
replica (Redis replicates asynchronously, and Aura sends no `WAIT` on a cluster): docs/operators.md
says so, and this test holds Aura to the case the docs promise."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis

from tests.aura_process import AuraProcess
from tests.e2e.test_sentinel import NOTICES, Load, is_store_failure_notice, one_run
from tests.fake_dwp import FakeDwp, FakeResponse
from tests.redis_server import RedisCluster, start_redis_cluster, stop_redis_cluster
from tests.sentinel_group import wait_for

pytestmark = pytest.mark.redis_server

CONCURRENCY = 8
APPROVED_BEFORE_FAILOVER = 12
COMPLETED_AFTER_FAILOVER = 12


@pytest.fixture(scope="module")
def failover_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A cluster of its own: the failovers swap its masters and replicas."""
    cluster = start_redis_cluster(tmp_path_factory.mktemp("failover-cluster"))
    try:
        yield cluster
    finally:
        stop_redis_cluster(cluster)


def node(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


def masters(cluster: RedisCluster) -> list[int]:
    ports = []
    for port in cluster.ports:
        with node(port) as client:
            if client.execute_command("ROLE")[0] == b"master":
                ports.append(port)
    return ports


def run_keys(port: int) -> int:
    with node(port) as client:
        return sum(1 for _ in client.scan_iter(match="aura:run:*", count=1000))


def replica_of(master_port: int) -> int:
    with node(master_port) as client:
        role = client.execute_command("ROLE")
    assert role[0] == b"master" and role[2], f"the master on {master_port} has no replica: {role}"
    return int(role[2][0][1])


def cluster_failover(cluster: RedisCluster, master_port: int) -> int:
    """`CLUSTER FAILOVER` on the master's replica; returns once the replica is the master, the old
    master replicates from it and every node says the cluster is ok."""
    replica = replica_of(master_port)
    with node(replica) as client:
        client.execute_command("CLUSTER", "FAILOVER")

    def switched() -> bool:
        with node(replica) as promoted, node(master_port) as demoted:
            if promoted.execute_command("ROLE")[0] != b"master":
                return False
            info = demoted.info("replication")
            if info["role"] != "slave" or int(info["master_port"]) != replica or info["master_link_status"] != "up":
                return False
        for port in cluster.ports:
            with node(port) as client:
                if client.cluster("info")["cluster_state"] != "ok":
                    return False
        return True
    wait_for(switched, f"the failover of the master on {master_port}")
    return replica


async def test_cluster_failovers_under_load_lose_no_received_event_and_revert_no_decision(
        failover_cluster: RedisCluster, start_aura: Callable[..., AuraProcess]) -> None:
    dwp = FakeDwp().start()
    dwp.respond("POST", "/api/items", FakeResponse.of_json({"ok": True}, status=201))
    env = {"AURA_TOOLS__DWP_BASE_URL": dwp.base_url, "AURA_RUNS__MAX_PER_USER": "1000",
           "AURA_RUNS__MAX_PER_TENANT": "1000", "AURA_STREAM__MAX_PER_USER": "1000",
           "AURA_HITL__RECHECK_SECONDS": "1", "AURA_LOG__LEVEL": "WARNING"}
    auras = [start_aura(redis_url=failover_cluster.url, env={**env, "AURA_RUNS__INSTANCE_ID": f"aura-{n}"})
             for n in ("a", "b")]
    load = Load()
    stop = False
    counter = itertools.count()
    clients = [httpx.AsyncClient(base_url=aura.url, timeout=30) for aura in auras]

    async def worker() -> None:
        while not stop:
            await one_run(next(counter), clients, load)

    workers = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
    failed_over: list[tuple[int, int, int]] = []  # (old master, run keys it held, new master)
    try:
        await load.until(lambda: len(load.approved) >= APPROVED_BEFORE_FAILOVER, "approvals before the failover")
        started = time.monotonic()
        for master in await asyncio.to_thread(masters, failover_cluster):
            held = await asyncio.to_thread(run_keys, master)
            if held:
                failed_over.append((master, held, await asyncio.to_thread(cluster_failover, failover_cluster, master)))
        failover_seconds = time.monotonic() - started
        load.failover_done = True
        await load.until(lambda: load.runs_completed_after_failover >= COMPLETED_AFTER_FAILOVER,
                         "runs completed after the failovers")
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
    print(f"failovers {failed_over} in {failover_seconds:.1f} s; runs completed {load.runs_completed}, "
          f"failed {len(load.runs_failed)}; events received {len(load.received)} (followers {len(load.followed)}); "
          f"approvals answered {dict(load.approval_answers)}; failed runs: {Counter(load.runs_failed_why())}")
    assert failed_over, "no master held run keys"

    store = redis.RedisCluster(host="127.0.0.1", port=failover_cluster.ports[0])
    try:
        lost, notices = [], 0
        for (run_id, seq), data in [*load.received.items(), *load.followed.items()]:
            entries = store.xrange(f"aura:run:{{{run_id}}}:events", min=f"{seq}-1", max=f"{seq}-1")
            if entries and entries[0][1].get(b"e") == data:
                continue
            if is_store_failure_notice(data):
                notices += 1
            else:
                lost.append((run_id, seq))
        assert lost == [], (f"{len(lost)} of {len(load.received) + len(load.followed)} received events are not "
                            f"in the log: {lost[:5]}")
        reverted = [request_id for request_id in load.approved
                    if json.loads(store.get(f"hitl:request:{request_id}") or b"{}").get("status") != "approved"]
        assert reverted == [], f"{len(reverted)} of {len(load.approved)} decisions answered 200 are not approved"
        # every run ended: none is still recorded running, none left its client waiting
        running = [key for key in store.keys("aura:run:*:meta", target_nodes=redis.RedisCluster.PRIMARIES)
                   if json.loads(store.get(key))["status"] == "running"]
        assert running == []
    finally:
        store.close()
    assert not [why for why in load.runs_failed if why.endswith("timed out")], load.runs_failed
    # what the clients saw go wrong is what a client retries: a 503 (never a 500 or a 4xx), a
    # retryable `error` and an end that says "the store failed" (or a run whose owner lost it)
    assert set(load.approval_answers) <= {200, 409, 503}, load.approval_answers
    not_retryable = [why for why in load.runs_failed
                     if not (why.split(": ", 1)[1] == "HTTP 503" or "store_unavailable" in why or "run_lost" in why)]
    assert not_retryable == [], not_retryable
    for run_id, notices_of_run in NOTICES.items():
        for notice in notices_of_run:
            if notice["type"] == "error":
                assert notice["data"]["retryable"], (run_id, notice)
    markers = Counter(r.json["marker"] for r in dwp.requests if r.method == "POST")
    assert markers and max(markers.values()) == 1
    for aura in auras:
        async with httpx.AsyncClient(base_url=aura.url, timeout=10) as client:
            assert (await client.get("/ready")).json() == {"status": "ready"}
