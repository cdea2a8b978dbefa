"""1,000 rapid connect/disconnects against the real service: afterwards nothing is left behind —
no runs, streams or approval waits in Aura's gauges, no run slots, no Pub/Sub subscriptions, no
extra Redis connections, every abandoned approval cancelled, and memory within a bound."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from tests.aura_process import AuraProcess
from tests.redis_server import RedisServer
from tests.support import bearer, git

COMMIT = '@git_commit {"repo_path": "repo", "message": "Never"}'
TOTAL, CONCURRENCY = 1000, 25
RSS_GROWTH_LIMIT_KIB = 64 * 1024
POOL_SIZE = 40


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def gauge(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


async def churn(client: httpx.AsyncClient, count: int, headers: dict[str, str]) -> dict[str, int]:
    outcomes = {"headers_only": 0, "after_hitl": 0, "mid_body": 0}
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        async with gate:
            async with client.stream("POST", "/aura/test/stream", json={"prompt": COMMIT}, headers=headers) as r:
                assert r.status_code == 200, (await r.aread()).decode()
                if i % 3 == 0:
                    outcomes["headers_only"] += 1
                    return  # hang up right after the headers
                body = ""
                async for text in r.aiter_text():
                    body += text
                    if i % 3 == 1 and "event: start" in body:
                        outcomes["mid_body"] += 1
                        return
                    if "event: hitl" in body:
                        outcomes["after_hitl"] += 1
                        return
                raise AssertionError(f"stream ended without hitl: {body}")

    await asyncio.gather(*(one(i) for i in range(count)))
    return outcomes


async def test_a_thousand_rapid_connect_disconnects_leak_nothing(
        start_aura: Callable[..., AuraProcess], own_redis: list[RedisServer], e2e_workspace: Path) -> None:
    repo = e2e_workspace / "repo"
    (repo / "f.txt").write_text("x\n")
    git(repo, "add", "f.txt")
    aura = start_aura(redis_url=own_redis[0].url, env={
        "AURA_RUNS__MAX_PER_USER": "5000", "AURA_RUNS__MAX_PER_TENANT": "5000",
        "AURA_STREAM__MAX_PER_USER": "5000", "AURA_LOG__LEVEL": "WARNING",
        # every hang-up is final here: the grace period for a returning reader is tested elsewhere
        "AURA_STREAM__DISCONNECT_GRACE_SECONDS": "0.05",
        "AURA_REDIS__MAX_CONNECTIONS": str(POOL_SIZE)})
    assert aura.process is not None
    store = redis.Redis.from_url(own_redis[0].url)
    headers = bearer()
    async with httpx.AsyncClient(base_url=aura.url, timeout=20,
                                 limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
        await churn(client, 100, headers)  # warm-up: imports, pools, caches
        baseline_clients = len(store.client_list())
        rss_start = rss_kib(aura.process.pid)
        outcomes = await churn(client, TOTAL, headers)
        assert sum(outcomes.values()) == TOTAL and min(outcomes.values()) > 0, outcomes

        deadline = time.monotonic() + 20
        while True:  # bounded poll: cancellations finish asynchronously after each hang-up
            metrics = (await client.get("/metrics")).text
            left = {name: gauge(metrics, name) for name in
                    ("aura_runs_active", "aura_open_streams", "aura_approval_waits_open")}
            slots = store.zcard("aura:slots:{acme}:user:alice") + store.zcard("aura:slots:{acme}:tenant")
            channels = store.pubsub_channels("hitl:channel:*")
            if not any(left.values()) and slots == 0 and not channels:
                break
            assert time.monotonic() < deadline, (left, slots, len(channels))
            await asyncio.sleep(0.2)
        rss_end = rss_kib(aura.process.pid)
    # the pool may keep up to POOL_SIZE idle connections; anything beyond that would be a leak
    assert len(store.client_list()) <= max(baseline_clients, POOL_SIZE) + 3
    requests = [json.loads(store.get(k)) for k in store.scan_iter("hitl:request:*", count=1000)]
    assert len(requests) >= outcomes["after_hitl"]
    assert {r["status"] for r in requests} == {"cancelled"}  # no abandoned approval stays pending
    assert git(repo, "log", "-1", "--format=%s") == "Initial commit"  # nothing was committed
    assert rss_end - rss_start < RSS_GROWTH_LIMIT_KIB, (rss_start, rss_end)
    print(f"churn: {outcomes}, RSS {rss_start} -> {rss_end} KiB, redis clients {baseline_clients} -> "
          f"{len(store.client_list())}, approvals cancelled {len(requests)}")
    store.close()
