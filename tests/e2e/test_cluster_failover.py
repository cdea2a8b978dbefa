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
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis

from tests.aura_process import AuraProcess
from tests.e2e.failover_load import NOTICES, Load, LoadDriver, is_store_failure_notice
from tests.fake_dwp import FakeDwp, FakeResponse
from tests.redis_nodes import CLUSTER_MASTERS
from tests.redis_server import RedisCluster, start_redis_cluster, stop_redis_cluster
from tests.sentinel_group import wait_for

pytestmark = pytest.mark.redis_server

CONCURRENCY = 8
APPROVED_BEFORE_FAILOVER = 12
COMPLETED_AFTER_FAILOVER = 12
LEASE_SECONDS = 6  # a run cut short by a failover is declared lost this long after, by the sweep


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
    """The port of the master's replica, once the master lists it as connected and in sync."""
    found: list[int] = []

    def listed() -> bool:
        with node(master_port) as client:
            info = client.info("replication")
        replica = info.get("slave0")
        if info["role"] != "master" or not replica or replica["state"] != "online":
            return False
        found.append(int(replica["port"]))
        return True
    wait_for(listed, f"the master on {master_port} to list its replica")
    return found[-1]


def took_over(cluster: RedisCluster, replica: int) -> bool:
    """The replica on `replica` is a master and every node of the cluster says it is ok."""
    with node(replica) as promoted:
        if promoted.execute_command("ROLE")[0] != b"master":
            return False
    for port in cluster.ports:
        with node(port) as client:
            if client.cluster("info")["cluster_state"] != "ok":
                return False
    return True


def cluster_failover(cluster: RedisCluster, master_port: int) -> int:
    """`CLUSTER FAILOVER` on the master's replica; returns once the replica is the master, the old
    master replicates from it and every node says the cluster is ok."""
    replica = replica_of(master_port)
    with node(replica) as client:
        client.execute_command("CLUSTER", "FAILOVER")

    def switched() -> bool:
        with node(master_port) as demoted:
            info = demoted.info("replication")
            if info["role"] != "slave" or int(info["master_port"]) != replica or info["master_link_status"] != "up":
                return False
        return took_over(cluster, replica)
    wait_for(switched, f"the failover of the master on {master_port}")
    return replica


@dataclass
class Outcome:
    load: Load
    failed_over: list[tuple[int, int, int]]  # (old master, run keys it held, new master)
    lost: list[tuple[str, int]]  # received events not in the log
    reverted: list[str]  # decisions answered 200 no longer approved
    running: list[bytes]  # runs still recorded running after the load
    holes: list[str]  # runs whose log misses an event it has a later one of (but its closing pair)
    calls: Counter[str]  # the DWP calls made, by marker


async def failover_under_load(cluster: RedisCluster, start_aura: Callable[..., AuraProcess],
                              fail_over: Callable[[RedisCluster, int], int], limit: int = CLUSTER_MASTERS) -> Outcome:
    """The Sentinel test's load on two instances; once enough approvals went through, `fail_over`
    each master that holds run keys (`limit` of them at most); the load goes on until enough runs
    completed after; then
    what the clients received and were answered, against what the cluster holds."""
    dwp = FakeDwp().start()
    dwp.respond("POST", "/api/items", FakeResponse.of_json({"ok": True}, status=201))
    env = {"AURA_TOOLS__DWP_BASE_URL": dwp.base_url, "AURA_RUNS__MAX_PER_USER": "1000",
           "AURA_RUNS__MAX_PER_TENANT": "1000", "AURA_STREAM__MAX_PER_USER": "1000",
           "AURA_HITL__RECHECK_SECONDS": "1", "AURA_LOG__LEVEL": "WARNING",
           "AURA_RUNS__LEASE_SECONDS": str(LEASE_SECONDS)}
    auras = [start_aura(redis_url=cluster.url, env={**env, "AURA_RUNS__INSTANCE_ID": f"aura-{n}"})
             for n in ("a", "b")]
    driver = LoadDriver(auras, CONCURRENCY)
    load = driver.load
    failed_over: list[tuple[int, int, int]] = []
    try:
        await load.until(lambda: len(load.approved) >= APPROVED_BEFORE_FAILOVER, "approvals before the failover")
        started = time.monotonic()
        for master in await asyncio.to_thread(masters, cluster):
            held = await asyncio.to_thread(run_keys, master)
            if held and len(failed_over) < limit:
                failed_over.append((master, held, await asyncio.to_thread(fail_over, cluster, master)))
        driver.outcome = f"failovers {failed_over} in {time.monotonic() - started:.1f} s"
        load.failover_done = True
        await load.until(lambda: load.runs_completed_after_failover >= COMPLETED_AFTER_FAILOVER,
                         "runs completed after the failovers")
        await driver.drain()
        for aura in auras:
            async with httpx.AsyncClient(base_url=aura.url, timeout=10) as client:
                assert (await client.get("/ready")).json() == {"status": "ready"}
    finally:
        await driver.finish()
        dwp.stop()

    store = redis.RedisCluster(host="127.0.0.1", port=failed_over[0][2] if failed_over else cluster.ports[0])
    try:
        lost = []
        for (run_id, seq), data in [*load.received.items(), *load.followed.items()]:
            entries = store.xrange(f"aura:run:{{{run_id}}}:events", min=f"{seq}-1", max=f"{seq}-1")
            if not (entries and entries[0][1].get(b"e") == data) and not is_store_failure_notice(data):
                lost.append((run_id, seq))
        reverted = [request_id for request_id in load.approved
                    if json.loads(store.get(f"hitl:request:{request_id}") or b"{}").get("status") != "approved"]

        def running() -> list[bytes]:
            return [key for key in store.keys("aura:run:*:meta", target_nodes=redis.RedisCluster.PRIMARIES)
                    if json.loads(store.get(key) or b"{}").get("status") == "running"]
        # A run an instance could not finish (its admission or its close cut short by the failover)
        # ends by the lost-run sweep, once its lease lapsed: every run ends.
        deadline = time.monotonic() + 3 * LEASE_SECONDS
        while (still_running := running()) and time.monotonic() < deadline:  # noqa: ASYNC110 - the sweep of another process
            await asyncio.sleep(0.5)
        for key in still_running:  # what the store holds of a run that did not end, to tell why
            run_id = key.decode().split("{", 1)[1].split("}", 1)[0]
            tail = [json.loads(fields[b"e"]) for _, fields in store.xrevrange(
                f"aura:run:{{{run_id}}}:events", count=3)]
            print(f"still running: {run_id}; record {store.get(key)!r}; lease "
                  f"{store.get(f'aura:run:{{{run_id}}}:lease')!r} (pttl "
                  f"{store.pttl(f'aura:run:{{{run_id}}}:lease')}); active index "
                  f"{store.zscore('aura:runs:active', run_id)}; log ends "
                  f"{[(e['seq'], e['type'], e['data'].get('status')) for e in reversed(tail)]}")
        holes = [run_id for run_id in {run_id for run_id, _ in load.received} if has_hole(store, run_id)]
        for why in load.runs_failed:  # what the store holds of a run a client gave up waiting for
            if why.endswith("timed out") and why.split()[2].startswith("run_"):
                run_id = why.split()[2]
                tail = [json.loads(fields[b"e"]) for _, fields in store.xrevrange(
                    f"aura:run:{{{run_id}}}:events", count=3)]
                print(f"timed out: {why}; record {store.get(f'aura:run:{{{run_id}}}:meta')!r}; "
                      f"log ends {[(e['seq'], e['type'], e['data'].get('status')) for e in reversed(tail)]}")
    finally:
        store.close()
    return Outcome(load, failed_over, lost, reverted, still_running, holes,
                   Counter(r.json["marker"] for r in dwp.requests if r.method == "POST"))


def has_hole(store: redis.RedisCluster, run_id: str) -> bool:
    """The run's log misses a seq before its last entry, other than before the closing pair a run
    whose log refused an event writes (`error` and `end` store_unavailable: a hole a resume sees)."""
    entries = store.xrange(f"aura:run:{{{run_id}}}:events")
    seqs = [int(entry_id.split(b"-")[0]) for entry_id, _ in entries]
    if not seqs:
        return False
    missing_before = [index for index, seq in enumerate(seqs) if seq != seqs[0] + index]
    if not missing_before:
        return False
    after = [json.loads(fields[b"e"]) for _, fields in entries[missing_before[0]:]]
    return not (len(after) == 2 and [e["type"] for e in after] == ["error", "end"]
                and after[1]["data"]["reason"] == "store_unavailable")


def assert_only_retryable_errors(load: Load, *, lost_logs: bool = False) -> int:
    """Every run ended for its client (none stalled until it gave up), and what went wrong is what
    a client retries: a 503 (never a 500 or a 4xx), a retryable `error`, an end saying the store
    failed or the run was lost. With `lost_logs` (a killed master), a resume may also find the
    run's events gone with the master (`events_lost`, then the run's snapshot: the contract's
    answer to a log that is not there); returns how many such notices came."""
    timed_out = [why for why in load.runs_failed if why.endswith("timed out")]
    assert not timed_out, load.runs_failed
    assert set(load.approval_answers) <= {200, 409, 503}, load.approval_answers
    # (a run whose `end` the store refused while its record was closed ends, for a resume, with the
    # `end` its record keeps: store_unavailable or run_lost here)
    not_retryable = [why for why in load.runs_failed
                     if not (why.split(": ", 1)[1] == "HTTP 503" or "store_unavailable" in why or "run_lost" in why)]
    assert not_retryable == [], not_retryable
    assert load.done_without_end == []  # every stream's last events: an `end` then [DONE], or `retry:`
    events_lost = 0
    for run_id, notices_of_run in NOTICES.items():
        for notice in notices_of_run:
            if notice["type"] == "error":
                if lost_logs and notice["data"]["errorType"] == "events_lost":
                    events_lost += 1
                    continue
                assert notice["data"]["retryable"], (run_id, notice["data"])
    return events_lost


async def test_cluster_failovers_under_load_lose_no_received_event_and_revert_no_decision(
        failover_cluster: RedisCluster, start_aura: Callable[..., AuraProcess]) -> None:
    outcome = await failover_under_load(failover_cluster, start_aura, cluster_failover)
    assert outcome.failed_over, "no master held run keys"
    assert outcome.lost == [], f"{len(outcome.lost)} received events are not in the log: {outcome.lost[:5]}"
    assert outcome.reverted == [], f"{len(outcome.reverted)} decisions answered 200 are not approved"
    assert outcome.running == []  # every run ended
    assert outcome.holes == []  # every run's log is whole
    assert_only_retryable_errors(outcome.load)
    assert outcome.load.not_found == []  # every run a client was given the id of is known after
    assert outcome.calls and max(outcome.calls.values()) == 1  # every approved call made once at most


def kill_master(cluster: RedisCluster, master_port: int) -> int:
    """SIGKILL the master; returns once its replica took over (after the cluster node timeout)
    and every live node says the cluster is ok."""
    replica = replica_of(master_port)
    dead = next(node for node in cluster.nodes if node.port == master_port)
    dead.process.kill()
    dead.process.wait(timeout=10)
    cluster.nodes.remove(dead)

    wait_for(lambda: took_over(cluster, replica), f"the replica of the killed master on {master_port} to take over")
    return replica


async def test_a_killed_master_costs_retryable_errors_and_every_run_still_ends(
        failover_cluster: RedisCluster, start_aura: Callable[..., AuraProcess]) -> None:
    """Not a promise of no loss: what a dying master acknowledged and had not sent to its replica
    is gone (asynchronous replication, no `WAIT` on a cluster; docs/operators.md). What holds is
    that every run ends, no stream stalls (a run's reader set lost with the master: its owner,
    meeting the move, tells the run's followers to note their entries again) and the clients see
    only errors they retry."""
    outcome = await failover_under_load(failover_cluster, start_aura, kill_master, limit=1)
    # (a hole in a run's log is what such a loss looks like: the owner went on after the events the
    # dying master had taken and not sent on)
    print(f"killed master: {len(outcome.lost)} received events not in the log, "
          f"{len(outcome.reverted)} decisions reverted, {len(outcome.holes)} runs' logs with a hole")
    assert outcome.failed_over
    assert outcome.running == []
    events_lost = assert_only_retryable_errors(outcome.load, lost_logs=True)
    print(f"killed master: {events_lost} resumes found their run's events gone (events_lost + snapshot)")
