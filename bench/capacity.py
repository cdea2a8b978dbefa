"""Redis cost per run, per event and per approval, bytes kept per run, and what `WAIT` costs:
the figures docs/operators.md ("Capacity") sizes deployments with.

    python -m bench.capacity [--runs 200] [--concurrency 50] [--approvals 100] [--no-cluster]

Starts a real `redis-server` master and a replica of it (free ports, no persistence), a Redis
Cluster of 3 masters without replicas (tests/redis_nodes.py), and one `aura serve` per set-up: the
master with `AURA_REDIS__WAIT_REPLICAS=0` (no WAIT: a single Redis) and `=1` (what a Sentinel
deployment runs by default; the per-command cost is the same whether the client found the master
through sentinels or not), and the cluster (`redis+cluster://`). Per set-up:

- streams: `--runs` runs of 20 and of 200 events (the offline model's `@answer`), `--concurrency`
  at once; the masters' INFO commandstats and INFO cpu before and after each (summed over the
  masters), so commands = fixed per run + per event * events is solved from the two sizes, and
  Aura's and Redis's CPU per event;
- approvals: `--approvals` runs parked on an approval, each approved through the API once
  parked; their commands minus the streams' per-run and per-event cost = an approval's own;
- bytes kept: MEMORY USAGE of every key a finished run leaves (its log, record, snapshot, the
  thread's turns, the approval's records), summed per run.

How the store's capacity grows with a cluster's masters is bench/cluster_scaling.py's.
Writes bench/results/<date>-capacity.json and .md (the commit and the machine measured included).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from bench import servers as S
from bench.run import ANSWER_TEXT, CHUNK_CHARS, PARK_PROMPT, STREAM_PATH, machine_info, source_revision
from tests.redis_nodes import start_redis_cluster, stop_redis_cluster

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (20, 200)  # content chunks per run (each run has a few more events: start, plan, end...)
PACED_SIZES = (20, 100)  # content chunks of the paced runs: 2 s and 10 s at 10 events/s
PACED_INTERVAL_MS = 100
PACED_RAMP_SECONDS = 1.0  # the paced streams start over a second, as a second's events spread


def headers(index: int) -> dict[str, str]:
    from adapters.jwt import mint_token

    token = mint_token(key=S.SECRET, sub=f"cap-u{index % 50}", tenant_id=S.TENANT, ttl_seconds=3600)
    return {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}


def redis_counters(ports: list[int]) -> dict[str, float]:
    """Commands by name and CPU seconds (`_cpu`), summed over the masters on `ports`."""
    out: dict[str, float] = {"_cpu": 0.0}
    for port in ports:
        stats = S.redis_stats(port)
        for name, calls in stats["calls"].items():
            out[name] = out.get(name, 0.0) + calls
        out["_cpu"] += stats["cpu_s"]
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] - before.get(k, 0.0)}


async def stream_run(client: httpx.AsyncClient, index: int, body: dict[str, Any], *,
                     approve_on: httpx.AsyncClient | None = None) -> tuple[str, int]:
    """Runs one stream to its end (approving its request when there is one): (run id, events).
    Each run names a thread of its own, so it keeps its turn as a conversation's run does."""
    events = 0
    body = {**body, "thread_id": f"cap-{uuid.uuid4().hex}"}
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


class PeakRss:
    """The servers' resident memory before a phase and its peak during it (sampled every 0.25 s)."""

    def __init__(self, servers: list[S.Server]) -> None:
        self.servers = servers
        self.before = [server.rss() for server in servers]
        self.peak = list(self.before)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            for index, server in enumerate(self.servers):
                self.peak[index] = max(self.peak[index], server.rss())

    def __enter__(self) -> PeakRss:
        self._sampler.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._sampler.join()

    def kib_per(self, streams: int) -> float:
        """The growth over all servers, per stream open at once."""
        return round(sum(p - b for p, b in zip(self.peak, self.before, strict=True)) / 1024 / streams, 1)


async def phase(url: str, ports: list[int], aura: S.Server, runs: int, concurrency: int,
                body: dict[str, Any], approve: bool = False, ramp_seconds: float = 0.0) -> dict[str, Any]:
    """`runs` runs, `concurrency` at once; the first `concurrency` start spread over `ramp_seconds`
    (hundreds of connections opened in one instant overflow the listen backlog)."""
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> tuple[str, int]:
            if index < concurrency and ramp_seconds:
                await asyncio.sleep(ramp_seconds * index / concurrency)  # the start's spread, not a wait
            async with gate:
                return await stream_run(client, index, body, approve_on=client if approve else None)

        before, cpu_before, started = redis_counters(ports), aura.cpu(), time.monotonic()
        with PeakRss([aura]) as rss:
            done = await asyncio.gather(*(one(i) for i in range(runs)))
        seconds, cpu_after, after = time.monotonic() - started, aura.cpu(), redis_counters(ports)
    commands = delta(before, after)
    redis_cpu = commands.pop("_cpu", 0.0)
    for own in S.BENCH_COMMANDS:  # the bench's look-ups are not Aura's work
        commands.pop(own, None)
    return {"runs": runs, "events": sum(events for _, events in done), "seconds": round(seconds, 2),
            "aura_cpu_s": round(cpu_after - cpu_before, 3), "redis_cpu_s": round(redis_cpu, 3),
            "aura_rss_kib_per_open_stream": rss.kib_per(concurrency),
            "aura_rss_mib_before": round(rss.before[0] / 2**20, 1),
            "commands": commands, "run_ids": [run_id for run_id, _ in done]}


def kept_bytes(ports: list[int], run_ids: list[str]) -> dict[str, float]:
    """Mean MEMORY USAGE per finished run, by kind of key, over the masters on `ports` (`run_ids`:
    every run since the flush)."""
    kinds: dict[str, int] = {}

    def add(client: redis.Redis, pattern: str, kind: str | None = None) -> None:
        """Every key matching `pattern` as `kind` (a run's keys: by their last part)."""
        for key in client.scan_iter(match=pattern, count=1000):
            name = kind or "run " + key.decode().rsplit(":", 1)[1]
            kinds[name] = kinds.get(name, 0) + int(client.memory_usage(key, samples=0) or 0)

    for port in ports:
        with redis.Redis(port=port) as client:
            for run_id in run_ids:
                add(client, f"aura:run:{{{run_id}}}:*")
            for pattern, kind in (("aura:thread:*:turns", "thread turns"),
                                  ("aura:threads:*:bytes", "user thread bytes"),
                                  ("hitl:request:*", "hitl request"), ("hitl:session:*", "hitl session"),
                                  ("hitl:signal:*", "hitl signal")):
                add(client, pattern, kind)
    return {kind: round(total / len(run_ids), 1) for kind, total in sorted(kinds.items())}


def solve(small: dict[str, Any], large: dict[str, Any], value: str) -> tuple[float, float]:
    """(per run, per event) of `value` from two phases of the same runs but for their length."""
    def of(p: dict[str, Any]) -> float:
        return float(sum(p["commands"].values()) if value == "commands" else p[value])

    per_event = (of(large) - of(small)) / (large["events"] - small["events"])
    return (of(small) - per_event * small["events"]) / small["runs"], per_event


def per_paced_unit(paced: list[dict[str, Any]]) -> dict[str, Any]:
    """What a stream at 10 events/s costs: per run and per event (its lease renewals, heartbeats and
    the rest of what a run's time costs fall in the per-event share: time and events grow together)."""
    small, large = paced
    commands, aura, redis_cpu = (solve(small, large, v) for v in ("commands", "aura_cpu_s", "redis_cpu_s"))
    return {
        "commands_per_run": round(commands[0], 1), "commands_per_event": round(commands[1], 3),
        "aura_cpu_ms_per_run": round(aura[0] * 1e3, 2), "aura_cpu_us_per_event": round(aura[1] * 1e6, 1),
        "redis_cpu_ms_per_run": round(redis_cpu[0] * 1e3, 3), "redis_cpu_us_per_event": round(redis_cpu[1] * 1e6, 2),
        # the longer runs' whole cost per event, their fixed cost included: steadier than the solve
        # (whose split between run and event swings with the machine's load), and what sizing uses
        "aura_cpu_us_per_event_all_in": round(large["aura_cpu_s"] / large["events"] * 1e6, 1),
        "redis_cpu_us_per_event_all_in": round(large["redis_cpu_s"] / large["events"] * 1e6, 2),
        "events_per_run_all_in": round(large["events"] / large["runs"], 1),
        "aura_rss_kib_per_open_stream": small["aura_rss_kib_per_open_stream"],
        "aura_rss_mib_before": small["aura_rss_mib_before"],
        "events_per_second": round(large["events"] / large["seconds"], 0),
    }


def per_unit(streams: list[dict[str, Any]], approvals: dict[str, Any]) -> dict[str, Any]:
    """Commands per run and per event from the two run sizes; an approval's own commands."""
    small, large = streams
    per_run, per_event = solve(small, large, "commands")
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


@dataclass
class Mode:
    """One store set-up Aura is measured on: its `AURA_REDIS__URL`, the ports of the masters whose
    counters are summed, and `AURA_REDIS__WAIT_REPLICAS`."""

    name: str
    redis_url: str
    masters: list[int]
    wait_replicas: int = 0
    paced: bool = False  # also measure streams paced at 10 events/s (what the sizing uses)


def answer_text(chunks: int) -> str:
    return (ANSWER_TEXT * (1 + chunks * CHUNK_CHARS // len(ANSWER_TEXT)))[: chunks * CHUNK_CHARS]


def flush(ports: list[int]) -> None:
    for port in ports:
        with redis.Redis(port=port) as client:
            client.flushall()


def start_aura(workdir: Path, mode: Mode, suffix: str = "") -> S.Server:
    return S.aura_server(f"aura-{mode.name.replace(' ', '-')}-wait{mode.wait_replicas}{suffix}", workdir,
                         mode.redis_url, extra_env={"AURA_REDIS__WAIT_REPLICAS": str(mode.wait_replicas),
                                                    "AURA_EVENTS__RETENTION_SECONDS": "3600"}).start()


def paced_phases(workdir: Path, mode: Mode, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The paced streams on an instance of their own, fresh: its RSS grows with the streams open at
    once only the first time (a heap grown by an earlier phase is reused)."""
    aura = start_aura(workdir, mode, "-paced")
    url, ports = f"http://127.0.0.1:{aura.port}", mode.masters
    try:
        warm = {"prompt": "@answer " + json.dumps({"text": answer_text(10), "chunks": 10})}
        asyncio.run(phase(url, ports, aura, 5, 5, warm))  # the first run's imports and scripts
        paced = []
        for chunks in PACED_SIZES:
            body = {"prompt": "@answer " + json.dumps({"text": answer_text(chunks), "chunks": chunks,
                                                       "intervalMs": PACED_INTERVAL_MS})}
            paced.append(asyncio.run(phase(url, ports, aura, args.paced_streams, args.paced_streams, body,
                                           ramp_seconds=PACED_RAMP_SECONDS)))
        return paced
    finally:
        aura.stop()


def one_round(workdir: Path, aura: S.Server, mode: Mode, args: argparse.Namespace) -> dict[str, Any]:
    url, ports = f"http://127.0.0.1:{aura.port}", mode.masters
    streams = []
    for chunks in SIZES:
        body = {"prompt": "@answer " + json.dumps({"text": answer_text(chunks), "chunks": chunks})}
        asyncio.run(phase(url, ports, aura, 10, 5, body))  # warm-up
        flush(ports)  # the bytes kept are the measured runs' alone (threads are found by pattern)
        streams.append(asyncio.run(phase(url, ports, aura, args.runs, args.concurrency, body)))
    kept = kept_bytes(ports, streams[1]["run_ids"])
    flush(ports)
    approvals = asyncio.run(phase(url, ports, aura, args.approvals, args.concurrency,
                                  {"prompt": PARK_PROMPT}, approve=True))
    kept_approval = kept_bytes(ports, approvals["run_ids"])
    paced = paced_phases(workdir, mode, args) if mode.paced and args.paced_streams else []
    for p in (*streams, approvals, *paced):
        p.pop("run_ids")
    return {"streams": streams, "approvals": approvals, "kept_bytes_per_run_200_chunks": kept,
            "kept_bytes_per_approval_run": kept_approval, **per_unit(streams, approvals),
            "paced": paced, "paced_per_unit": per_paced_unit(paced) if paced else None}


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the rounds (the first round's for what is not a number)."""
    out: dict[str, Any] = {}
    for key, first in rounds[0].items():
        if isinstance(first, int | float):
            out[key] = round(statistics.median(r[key] for r in rounds), 3)
        elif key == "paced_per_unit" and first is not None:
            out[key] = {k: round(statistics.median(r[key][k] for r in rounds), 3) for k in first}
        else:
            out[key] = first
    return out


def run_mode(workdir: Path, mode: Mode, args: argparse.Namespace) -> dict[str, Any]:
    aura = start_aura(workdir, mode)
    try:
        flush(mode.masters)
        rounds = [one_round(workdir, aura, mode, args) for _ in range(args.rounds)]
    finally:
        aura.stop()
    return {"mode": mode.name, "wait_replicas": mode.wait_replicas, **medians(rounds), "rounds": rounds}


def machine_line(info: dict[str, Any]) -> str:
    """The machine a result was measured on, for its report (from `bench.run.machine_info`)."""
    load = ", ".join(f"{value:.2f}" for value in info["loadavg_start"])
    return (f"{info['host']}: {info['cpus']} cores ({info['cpu_model']}), {info['memory_gib']} GiB, Python "
            f"{info['python']}, {info['redis_server'].split(' sha=')[0]}, redis-py {info['packages']['redis']}; "
            f"load average at the start {load}")


def spread(result: dict[str, Any], key: str, paced: bool = False) -> str:
    """A figure's median and, when there are several rounds, each round's value."""
    values = [(r["paced_per_unit"] if paced else r)[key] for r in result["rounds"]]
    median = (result["paced_per_unit"] if paced else result)[key]
    return f"{median:g}" + (f" ({', '.join(f'{v:g}' for v in values)})" if len(values) > 1 else "")


def markdown(report: dict[str, Any]) -> str:
    args, results = report["args"], report["results"]
    out = [f"# Capacity figures ({report['date']})", "",
           f"`python -m bench.capacity --runs {args['runs']} --concurrency {args['concurrency']} "
           f"--approvals {args['approvals']} --paced-streams {args['paced_streams']} --rounds {args['rounds']}`; "
           f"commit {report['commit']}; {machine_line(report['machine'])}.", "",
           "One `aura serve` per set-up, on this machine's loopback: a redis-server master with one replica "
           "fed (`WAIT` replicas 0 and 1), and a Redis Cluster of 3 masters without replicas "
           "(`redis+cluster://`). Commands and Redis CPU are the masters' own (INFO commandstats, a script's "
           f"own calls included; INFO cpu), summed over the masters. Medians of {args['rounds']} rounds (each "
           "round's figure in brackets).", "",
           "| set-up | WAIT replicas | commands/run | commands/event | commands/approval | WAIT per event | "
           "Aura µs/event | Redis µs/event | Redis µs per approved run | events/s (200-chunk runs) |",
           "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in results:
        out.append(f"| {r['mode']} | {r['wait_replicas']} | {spread(r, 'commands_per_run')} | "
                   f"{spread(r, 'commands_per_event')} | {spread(r, 'commands_per_approval')} | "
                   f"{r['wait_per_event']} | {spread(r, 'aura_cpu_us_per_event')} | "
                   f"{spread(r, 'redis_cpu_us_per_event')} | {spread(r, 'redis_cpu_us_per_approval_run')} | "
                   f"{spread(r, 'events_per_second_large')} |")
    for r in results:
        unit = r.get("paced_per_unit")
        if not unit:
            continue
        out += ["", f"Streams paced at 10 events/s ({r['mode']}, WAIT replicas {r['wait_replicas']}; "
                f"{args['paced_streams']} at once, runs of {' and '.join(map(str, PACED_SIZES))} chunks, solved "
                "for per run and per event as above; a run's time costs fall in the per-event share):", "",
                "| per | Redis commands | Aura CPU | Redis CPU |", "|---|---:|---:|---:|",
                f"| event | {spread(r, 'commands_per_event', True)} | {spread(r, 'aura_cpu_us_per_event', True)} µs | "
                f"{spread(r, 'redis_cpu_us_per_event', True)} µs |",
                f"| run (fixed) | {spread(r, 'commands_per_run', True)} | {spread(r, 'aura_cpu_ms_per_run', True)} ms "
                f"| {spread(r, 'redis_cpu_ms_per_run', True)} ms |",
                f"| event, all in ({unit['events_per_run_all_in']:g}-event runs, their fixed cost included) | | "
                f"{spread(r, 'aura_cpu_us_per_event_all_in', True)} µs | "
                f"{spread(r, 'redis_cpu_us_per_event_all_in', True)} µs |", "",
                f"Aura's RSS per open stream (on a fresh instance, the peak over the {PACED_SIZES[0]}-chunk runs "
                "less the RSS before them): "
                f"{spread(r, 'aura_rss_kib_per_open_stream', True)} KiB over "
                f"{spread(r, 'aura_rss_mib_before', True)} MiB; {spread(r, 'events_per_second', True)} events/s."]
        for one in r["rounds"]:
            for p in one["paced"]:
                out.append(f"- {p['runs']} runs, {p['events']} events, {p['seconds']} s, Aura CPU "
                           f"{p['aura_cpu_s']} s, Redis CPU {p['redis_cpu_s']} s, "
                           f"commands {int(sum(p['commands'].values()))}")
    for r in results:
        out += ["", f"{r['mode']}, WAIT replicas {r['wait_replicas']}: bytes kept per finished 200-chunk run "
                f"{r['kept_bytes_per_run_200_chunks']}; per approved run {r['kept_bytes_per_approval_run']}; "
                f"commands per event by name (200-chunk runs) {r['commands_by_name_per_event_large']}"]
        for one in r["rounds"]:
            for p in (*one["streams"], one["approvals"]):
                out.append(f"- {p['runs']} runs, {p['events']} events, {p['seconds']} s, Aura CPU "
                           f"{p['aura_cpu_s']} s, Redis CPU {p['redis_cpu_s']} s, "
                           f"commands {int(sum(p['commands'].values()))}")
    return "\n".join(out) + "\n"


def publish(report: dict[str, Any], tool: str, text: str) -> None:
    """bench/results/<date>-<tool>.json and .md: the latest published run of that tool."""
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{report['date']}-{tool}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--approvals", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="each set-up's phases this many times (medians)")
    parser.add_argument("--paced-streams", type=int, default=200,
                        help="streams at once at 10 events/s (on the master without WAIT; 0: none)")
    parser.add_argument("--no-cluster", dest="cluster", action="store_false",
                        help="skip the Redis Cluster set-up (3 masters)")
    args = parser.parse_args()
    report: dict[str, Any] = {"date": datetime.date.today().isoformat(), "commit": source_revision(),
                              "machine": machine_info(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="aura-capacity-") as tmp:
        workdir = Path(tmp)
        (workdir / "master").mkdir()
        (workdir / "replica").mkdir()
        master_server = S.redis_server(workdir / "master").start()
        replica_server = S.redis_server(workdir / "replica").start()
        cluster = None
        try:
            with redis.Redis(port=replica_server.port) as replica:
                replica.execute_command("REPLICAOF", "127.0.0.1", str(master_server.port))
                deadline = time.monotonic() + 30
                while replica.info("replication")["master_link_status"] != "up":
                    if time.monotonic() > deadline:
                        raise SystemExit("bench: the replica did not sync")
                    time.sleep(0.1)  # start-up poll with a deadline
            single = f"redis://127.0.0.1:{master_server.port}/0"
            modes = [Mode("one master", single, [master_server.port], 0, paced=True),
                     Mode("one master", single, [master_server.port], 1)]
            if args.cluster:
                cluster = start_redis_cluster(workdir / "cluster", masters=3, replicas=0)
                modes.append(Mode("cluster, 3 masters", cluster.url, [node.port for node in cluster.nodes]))
            report["results"] = [run_mode(workdir, mode, args) for mode in modes]
        finally:
            if cluster is not None:
                stop_redis_cluster(cluster)
            replica_server.stop()
            master_server.stop()
    publish(report, "capacity", markdown(report))


if __name__ == "__main__":
    main()
