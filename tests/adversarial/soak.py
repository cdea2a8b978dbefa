"""Load with nothing lost: concurrent runs across two Aura instances on one real redis-server, each
run parked on one approval that is decided through a mix of Aura's API (on the *other* instance)
and a raw Redis SET + PUBLISH (as the DWP backend does). Every run's event sequence is checked for
gaps, every approval for being honoured (the tool ran exactly once, after the decision).

    python -m tests.adversarial.soak --runs 2000 --concurrency 100 --duration 600

starts its own redis-server, fake DWP backend and two `aura serve` processes, and prints a report:
runs started/completed, approvals sent/honoured, events expected/received, errors, RSS start/end.
The test suite runs the short version (tests/adversarial/test_load.py: 200 runs).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aredis

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.aura_process import AuraProcess  # noqa: E402
from tests.fake_dwp import FakeDwp, FakeResponse  # noqa: E402
from tests.redis_server import start_redis_server, stop_redis_server  # noqa: E402
from tests.support import bearer, make_repo  # noqa: E402


@dataclass
class Report:
    runs_started: int = 0
    runs_completed: int = 0
    approvals_sent_api: int = 0
    approvals_sent_raw: int = 0
    approvals_honoured: int = 0  # the approved tool started (running) after the decision
    tool_failures: int = 0  # it started but failed (e.g. the fake DWP refused the connection)
    events_expected: int = 0
    events_received: int = 0
    sequence_gaps: int = 0
    errors: list[str] = field(default_factory=list)
    rss_start_kib: dict[str, int] = field(default_factory=dict)
    rss_end_kib: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def approvals_sent(self) -> int:
        return self.approvals_sent_api + self.approvals_sent_raw

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["approvals_sent"] = self.approvals_sent
        out["errors"] = len(self.errors)
        out["first_errors"] = self.errors[:5]
        return out


def rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1))  # type: ignore[union-attr]


def parse_frames(body: str) -> list[tuple[str | None, dict[str, Any] | str]]:
    """(id, envelope) per data frame; [DONE] as the string. Empty-data blocks (heartbeats) skipped."""
    out: list[tuple[str | None, dict[str, Any] | str]] = []
    for block in body.split("\n\n"):
        lines = block.split("\n")
        data = [line[6:] for line in lines if line.startswith("data: ")]
        if not data:
            continue
        ids = [line[4:] for line in lines if line.startswith("id: ")]
        joined = "\n".join(data)
        out.append((ids[0] if ids else None, joined if joined == "[DONE]" else json.loads(joined)))
    return out


async def one_run(i: int, clients: list[httpx.AsyncClient], store: aredis.Redis, report: Report,
                  decided_markers: set[str], timeout: float) -> None:  # noqa: ASYNC109
    marker = f"soak-{i}"
    home, other = clients[i % 2], clients[(i + 1) % 2]
    user = f"user{i % 50}"
    prompt = '@dwp_request ' + json.dumps({"method": "POST", "path": "/api/items", "body": {"marker": marker}})
    report.runs_started += 1
    body = ""
    try:
        async with asyncio.timeout(timeout):
            async with home.stream("POST", "/aura/test/stream", json={"prompt": prompt},
                                   headers=bearer(user)) as response:
                if response.status_code != 200:
                    report.errors.append(f"{marker}: HTTP {response.status_code} {(await response.aread())[:200]!r}")
                    return
                decided = False
                async for text in response.aiter_text():
                    body += text
                    if not decided and "event: hitl" in body:
                        complete = body[: body.rfind("\n\n") + 2]  # whole frames only
                        hitls = [e for _, e in parse_frames(complete) if isinstance(e, dict) and e["type"] == "hitl"]
                        if not hitls:
                            continue
                        hitl = hitls[0]
                        decided = True
                        request_id, session = hitl["data"]["requestId"], hitl["data"]["sessionId"]
                        if i % 2 == 0:
                            answer = await other.post(f"/aura/hitl/approve/{request_id}", headers=bearer(user))
                            if answer.status_code != 200:
                                report.errors.append(f"{marker}: approve HTTP {answer.status_code} {answer.text[:200]}")
                            report.approvals_sent_api += 1
                        else:
                            signal = json.dumps({"type": "approval", "requestId": request_id, "status": "approved",
                                                 "userId": user, "timestamp": int(time.time())})
                            await store.set(f"hitl:signal:{session}", signal, ex=300)
                            await store.publish(f"hitl:channel:{session}", signal)
                            report.approvals_sent_raw += 1
                        decided_markers.add(marker)
                    if body.endswith("data: [DONE]\n\n"):
                        break
    except Exception as exc:  # a soak counts every failure and goes on
        report.errors.append(f"{marker}: {type(exc).__name__}: {exc}")
        return
    frames = parse_frames(body)
    if not frames or frames[-1][1] != "[DONE]":
        report.errors.append(f"{marker}: no [DONE]")
        return
    envelopes = [e for _, e in frames[:-1] if isinstance(e, dict)]
    seqs = [e["seq"] for e in envelopes]
    report.events_expected += seqs[-1] if seqs else 0
    report.events_received += len(set(seqs))
    if seqs != list(range(1, len(seqs) + 1)) or any(fid != f"{e['runId']}:{e['seq']}" for (fid, e) in frames[:-1]
                                                     if isinstance(e, dict)):
        report.sequence_gaps += 1
        report.errors.append(f"{marker}: sequence {seqs}")
    tools = [e["data"] for e in envelopes if e["type"] == "tool_execution"]
    if envelopes and envelopes[-1]["type"] == "end" and envelopes[-1]["data"]["status"] == "completed":
        report.runs_completed += 1
    else:
        report.errors.append(f"{marker}: ended {envelopes[-1] if envelopes else None}")
    statuses = [t["status"] for t in tools]
    if statuses[:2] == ["pending", "running"]:
        report.approvals_honoured += 1
    if statuses != ["pending", "running", "success"]:
        if statuses[:2] == ["pending", "running"]:
            report.tool_failures += 1
        report.errors.append(f"{marker}: tool {statuses} {tools[-1].get('error') if tools else ''}")


async def drive(urls: list[str], redis_url: str, pids: list[int], *, runs: int, concurrency: int,
                duration: float | None, run_timeout: float = 60.0) -> Report:
    report = Report()
    report.rss_start_kib = {str(p): rss_kib(p) for p in pids}
    store = aredis.Redis.from_url(redis_url)
    decided: set[str] = set()
    started = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    clients = [httpx.AsyncClient(base_url=u, timeout=run_timeout, limits=limits) for u in urls]
    counter = itertools.count()

    async def worker() -> None:
        while True:
            i = next(counter)
            if i >= runs or (duration is not None and time.monotonic() - started > duration):
                return
            await one_run(i, clients, store, report, decided, run_timeout)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        for client in clients:
            await client.aclose()
        await store.aclose()
    report.seconds = round(time.monotonic() - started, 1)
    report.rss_end_kib = {str(p): rss_kib(p) for p in pids}
    return report


class Cluster:
    """redis-server + fake DWP + two Aura instances, for the CLI and the test."""

    def __init__(self, directory: Path, env: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.extra_env = env or {}

    def __enter__(self) -> Cluster:
        workspace = self.directory / "workspace"
        make_repo(workspace / "repo")
        self.redis = start_redis_server(self.directory)
        self.dwp = FakeDwp().start()
        self.dwp.respond("POST", "/api/items", FakeResponse.of_json({"ok": True}, status=201))
        env = {"AURA_TOOLS__DWP_BASE_URL": self.dwp.base_url, "AURA_RUNS__MAX_PER_USER": "10000",
               "AURA_STREAM__MAX_PER_USER": "10000",
               "AURA_RUNS__MAX_PER_TENANT": "10000", "AURA_LOG__LEVEL": "WARNING",
               "AURA_HITL__RECHECK_SECONDS": "5", "PYTHONPATH": os.environ.get("AURA_SOAK_SRC", str(ROOT / "src")),
               **self.extra_env}
        self.auras = [AuraProcess(workspace=workspace, log_path=self.directory / f"aura-{n}.log",
                                  redis_url=self.redis.url, env={**env, "AURA_RUNS__INSTANCE_ID": f"soak-{n}"}).start()
                      for n in ("a", "b")]
        return self

    @property
    def urls(self) -> list[str]:
        return [a.url for a in self.auras]

    @property
    def pids(self) -> list[int]:
        return [a.process.pid for a in self.auras if a.process is not None]

    def __exit__(self, *exc: object) -> None:
        for aura in self.auras:
            aura.stop()
        self.dwp.stop()
        stop_redis_server(self.redis)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000, help="at most this many runs (default 1000)")
    parser.add_argument("--concurrency", type=int, default=50, help="runs in flight at once (default 50)")
    parser.add_argument("--duration", type=float, default=None, help="stop starting runs after this many seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aura-soak-") as tmp, Cluster(Path(tmp)) as cluster:
        report = asyncio.run(drive(cluster.urls, cluster.redis.url, cluster.pids, runs=args.runs,
                                   concurrency=args.concurrency, duration=args.duration))
        dwp_posts = sum(1 for r in cluster.dwp.requests if r.method == "POST")
    summary = report.summary()
    summary["dwp_posts_received"] = dwp_posts
    print(json.dumps(summary, indent=2))
    sys.exit(0 if not report.errors and report.approvals_honoured == report.approvals_sent else 1)


if __name__ == "__main__":
    main()
