"""Redis cost per run, per event and per approval, bytes kept per run, and what `WAIT` costs:
the figures docs/operators.md ("Capacity") sizes deployments with.

    python -m bench.capacity [--runs 200] [--concurrency 50] [--approvals 100]

Starts a real `redis-server` master and a replica of it (free ports, no persistence) and one
`aura serve` per mode: `AURA_REDIS__WAIT_REPLICAS=0` (no WAIT: a single Redis) and `=1` (what a
Sentinel deployment runs by default; the per-command cost is the same whether the client found the
master through sentinels or not). Per mode:

- streams: `--runs` runs of 20 and of 200 events (the offline model's `@answer`), `--concurrency`
  at once; Redis's INFO commandstats and INFO cpu before and after each, so commands = fixed per
  run + per event * events is solved from the two sizes, and Aura's and Redis's CPU per event;
- approvals: `--approvals` runs parked on an approval, each approved through the API once
  parked; their commands minus the streams' per-run and per-event cost = an approval's own;
- bytes kept: MEMORY USAGE of every key a finished run leaves (its log, record, snapshot, the
  thread's turns, the approval's records), summed per run.

Writes bench/results/<date>-capacity.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from bench import servers as S
from bench.run import ANSWER_TEXT, CHUNK_CHARS, PARK_PROMPT, STREAM_PATH

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (20, 200)  # content chunks per run (each run has a few more events: start, plan, end...)


def headers(index: int) -> dict[str, str]:
    from adapters.jwt import mint_token

    token = mint_token(key=S.SECRET, sub=f"cap-u{index % 50}", tenant_id=S.TENANT, ttl_seconds=3600)
    return {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}


def redis_counters(client: redis.Redis) -> dict[str, float]:
    stats = client.info("commandstats")
    cpu = client.info("cpu")
    out = {name.removeprefix("cmdstat_"): float(value["calls"]) for name, value in stats.items()}
    out["_cpu"] = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] - before.get(k, 0.0)}


async def stream_run(client: httpx.AsyncClient, index: int, body: dict[str, Any], *,
                     approve_on: httpx.AsyncClient | None = None) -> tuple[str, int]:
    """Runs one stream to its end (approving its request when there is one): (run id, events)."""
    events = 0
    async with client.stream("POST", STREAM_PATH, json=body, headers=headers(index)) as response:
        response.raise_for_status()
        run_id = response.headers["x-aura-run-id"]
        buffer = b""
        async for chunk in response.aiter_bytes():
            buffer += chunk
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                if b"\ndata: " not in b"\n" + frame or frame.endswith(b"data: [DONE]"):
                    continue
                events += 1
                if approve_on is not None and b"event: hitl" in frame:
                    data = json.loads(frame.split(b"data: ", 1)[1])
                    answer = await approve_on.post(f"/aura/hitl/approve/{data['data']['requestId']}",
                                                   headers=headers(index))
                    answer.raise_for_status()
    return run_id, events


async def phase(url: str, master: redis.Redis, aura: S.Server, runs: int, concurrency: int,
                body: dict[str, Any], approve: bool = False) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> tuple[str, int]:
            async with gate:
                return await stream_run(client, index, body, approve_on=client if approve else None)

        before, cpu_before, started = redis_counters(master), aura.cpu(), time.monotonic()
        done = await asyncio.gather(*(one(i) for i in range(runs)))
        seconds, cpu_after, after = time.monotonic() - started, aura.cpu(), redis_counters(master)
    commands = delta(before, after)
    redis_cpu = commands.pop("_cpu", 0.0)
    commands.pop("info", None)
    return {"runs": runs, "events": sum(events for _, events in done), "seconds": round(seconds, 2),
            "aura_cpu_s": round(cpu_after - cpu_before, 3), "redis_cpu_s": round(redis_cpu, 3),
            "commands": commands, "run_ids": [run_id for run_id, _ in done]}


def kept_bytes(master: redis.Redis, run_ids: list[str]) -> dict[str, float]:
    """Mean MEMORY USAGE per finished run, by kind of key (`run_ids`: every run since the flush)."""
    kinds: dict[str, int] = {}
    for run_id in run_ids:
        for key in master.scan_iter(match=f"aura:run:{{{run_id}}}:*", count=1000):
            kind = key.decode().rsplit(":", 1)[1]
            kinds[f"run {kind}"] = kinds.get(f"run {kind}", 0) + int(master.memory_usage(key, samples=0) or 0)
    for pattern, kind in (("aura:threads:*:turns", "thread turns"), ("aura:threads:*:bytes", "user thread bytes"),
                          ("hitl:request:*", "hitl request"), ("hitl:session:*", "hitl session"),
                          ("hitl:signal:*", "hitl signal")):
        for key in master.scan_iter(match=pattern, count=1000):
            kinds[kind] = kinds.get(kind, 0) + int(master.memory_usage(key, samples=0) or 0)
    return {kind: round(total / len(run_ids), 1) for kind, total in sorted(kinds.items())}


def per_unit(streams: list[dict[str, Any]], approvals: dict[str, Any]) -> dict[str, Any]:
    """Commands per run and per event from the two run sizes; an approval's own commands."""
    small, large = streams
    total = [sum(p["commands"].values()) for p in streams]
    per_event = (total[1] - total[0]) / (large["events"] - small["events"])
    per_run = (total[0] - per_event * small["events"]) / small["runs"]
    approval_total = sum(approvals["commands"].values())
    per_approval = (approval_total - per_run * approvals["runs"] - per_event * approvals["events"]) / approvals["runs"]
    waits = {f"{size} chunks": p["commands"].get("wait", 0.0) / p["events"]
             for size, p in zip(SIZES, streams, strict=True)}
    return {
        "commands_per_run": round(per_run, 1), "commands_per_event": round(per_event, 3),
        "commands_per_approval": round(per_approval, 1),
        "wait_per_event": {k: round(v, 3) for k, v in waits.items()},
        "aura_cpu_us_per_event": round(large["aura_cpu_s"] / large["events"] * 1e6, 1),
        "redis_cpu_us_per_event": round(large["redis_cpu_s"] / large["events"] * 1e6, 2),
        "redis_cpu_us_per_approval_run": round(approvals["redis_cpu_s"] / approvals["runs"] * 1e6, 1),
        "events_per_second_large": round(large["events"] / large["seconds"], 0),
        "commands_by_name_per_event_large": {k: round(v / large["events"], 3)
                                             for k, v in sorted(large["commands"].items())},
    }


def run_mode(workdir: Path, master_server: S.RedisServer, replicas: int, args: argparse.Namespace) -> dict[str, Any]:
    aura = S.aura_server(f"aura-wait{replicas}", workdir, f"redis://127.0.0.1:{master_server.port}/0",
                         extra_env={"AURA_REDIS__WAIT_REPLICAS": str(replicas),
                                    "AURA_EVENTS__RETENTION_SECONDS": "3600"}).start()
    url = f"http://127.0.0.1:{aura.port}"
    master = redis.Redis(port=master_server.port)
    try:
        master.flushall()
        streams = []
        for chunks in SIZES:
            text = (ANSWER_TEXT * (1 + chunks * CHUNK_CHARS // len(ANSWER_TEXT)))[: chunks * CHUNK_CHARS]
            body = {"prompt": "@answer " + json.dumps({"text": text, "chunks": chunks})}
            asyncio.run(phase(url, master, aura, 10, 5, body))  # warm-up
            streams.append(asyncio.run(phase(url, master, aura, args.runs, args.concurrency, body)))
        kept = kept_bytes(master, streams[1]["run_ids"])
        master.flushall()
        approvals = asyncio.run(phase(url, master, aura, args.approvals, args.concurrency,
                                      {"prompt": PARK_PROMPT}, approve=True))
        kept_approval = kept_bytes(master, approvals["run_ids"])
        result = {"wait_replicas": replicas, "streams": streams, "approvals": approvals,
                  "kept_bytes_per_run_200_chunks": kept, "kept_bytes_per_approval_run": kept_approval,
                  **per_unit(streams, approvals)}
        for p in (*streams, approvals):
            p.pop("run_ids")
        return result
    finally:
        master.close()
        aura.stop()


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = [f"# Capacity figures ({datetime.date.today().isoformat()})", "",
           f"`python -m bench.capacity --runs {args.runs} --concurrency {args.concurrency} "
           f"--approvals {args.approvals}`: one `aura serve`, a redis-server master and one replica on this "
           "machine's loopback.", "",
           "| WAIT replicas | commands/run | commands/event | commands/approval | WAIT per event | "
           "Aura µs/event | Redis µs/event | Redis µs per approved run | events/s (200-chunk runs) |",
           "|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in results:
        out.append(f"| {r['wait_replicas']} | {r['commands_per_run']} | {r['commands_per_event']} | "
                   f"{r['commands_per_approval']} | {r['wait_per_event']} | {r['aura_cpu_us_per_event']} | "
                   f"{r['redis_cpu_us_per_event']} | {r['redis_cpu_us_per_approval_run']} | "
                   f"{r['events_per_second_large']} |")
    for r in results:
        out += ["", f"WAIT replicas {r['wait_replicas']}: bytes kept per finished 200-chunk run "
                f"{r['kept_bytes_per_run_200_chunks']}; per approved run {r['kept_bytes_per_approval_run']}; "
                f"commands per event by name (200-chunk runs) {r['commands_by_name_per_event_large']}"]
        for p in (*r["streams"], r["approvals"]):
            out.append(f"- {p['runs']} runs, {p['events']} events, {p['seconds']} s, Aura CPU {p['aura_cpu_s']} s, "
                       f"Redis CPU {p['redis_cpu_s']} s, commands {int(sum(p['commands'].values()))}")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--approvals", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aura-capacity-") as tmp:
        workdir = Path(tmp)
        (workdir / "master").mkdir()
        (workdir / "replica").mkdir()
        master_server = S.redis_server(workdir / "master").start()
        replica_server = S.redis_server(workdir / "replica").start()
        try:
            with redis.Redis(port=replica_server.port) as replica:
                replica.execute_command("REPLICAOF", "127.0.0.1", str(master_server.port))
                deadline = time.monotonic() + 30
                while replica.info("replication")["master_link_status"] != "up":
                    if time.monotonic() > deadline:
                        raise SystemExit("bench: the replica did not sync")
                    time.sleep(0.1)  # start-up poll with a deadline
            results = [run_mode(workdir, master_server, replicas, args) for replicas in (0, 1)]
        finally:
            replica_server.stop()
            master_server.stop()
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{datetime.date.today().isoformat()}-capacity"
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results, args))
    print(markdown(results, args))


if __name__ == "__main__":
    main()
