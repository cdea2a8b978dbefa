"""The short version of the soak (tests/adversarial/soak.py): 200 runs across two instances, each with
one approval decided half through Aura's API on the other instance, half by raw SET + PUBLISH.
Zero lost approvals, zero gaps in any event sequence, every tool call made exactly once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.adversarial.soak import Cluster, drive

RUNS, CONCURRENCY = 200, 40


async def test_200_runs_across_two_instances_lose_nothing(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        report = await drive(cluster.urls, cluster.redis.url, cluster.pids, runs=RUNS, concurrency=CONCURRENCY,
                             duration=None, run_timeout=60)
        posts = [r.json["marker"] for r in cluster.dwp.requests if r.method == "POST"]
    print("load:", report.summary())
    assert report.errors == []
    assert (report.runs_started, report.runs_completed) == (RUNS, RUNS)
    assert (report.approvals_sent_api, report.approvals_sent_raw) == (RUNS // 2, RUNS // 2)
    assert report.approvals_honoured == RUNS
    assert report.sequence_gaps == 0 and report.events_received == report.events_expected > 0
    assert sorted(posts) == sorted(f"soak-{i}" for i in range(RUNS))  # each approved call made exactly once
    assert max(Counter(posts).values()) == 1
