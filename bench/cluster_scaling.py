"""What Redis Cluster adds: the store's capacity growing with its masters (1 → 3).

    python -m bench.cluster_scaling [--streams 150] [--rounds 2] [--chunks 60] [--approvals 100]
                                    [--instances 2] [--masters 1,3]

For each number of masters: a real Redis Cluster on loopback (cluster-enabled `redis-server`s, no
replicas, tests/redis_nodes.py) and `--instances` `aura serve` on its `redis+cluster://` URL. The
same offered load runs on each: `--streams` streams at once, each paced at 10 events/s (the offline
model's `@answer` with `intervalMs` 100), `--rounds` of them, spread over the instances; then
`--approvals` runs parked on an approval, each approved through another instance's API. Per master,
from its own INFO commandstats and INFO cpu before and after (and over an idle window first, Aura
running, to take off what a master spends with no load: cron, cluster bus): commands, CPU seconds,
CPU per event, the share of a core it used at that load, its keys (DBSIZE).

Why this measure: on a 2-core machine Aura's own CPU (and the load client's) saturates the cores
long before even one Redis master does, so throughput cannot be driven to the store's limit here.
What a master can sustain is what one core gives it: the store's limit is reached when its busiest
master's load reaches a core, so at the offered rate E the store sustains E ÷ (busiest master's
share of a core) events/s. That figure, and how evenly the load and the keys spread over the
masters, is what this compares between 1 and 3 masters.

Writes bench/results/<date>-cluster-scaling.json and .md.
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
from bench.capacity import PeakRss, answer_text, machine_line, publish, stream_run
from bench.run import PARK_PROMPT, machine_info, source_revision
from tests.redis_nodes import RedisCluster, start_redis_cluster, stop_redis_cluster

EVENT_INTERVAL_MS = 100  # 10 events/s per stream, the rate docs/operators.md sizes with
IDLE_SECONDS = 5.0


def masters_of(cluster: RedisCluster) -> list[int]:
    """The ports of the cluster's masters (replicas take no load here)."""
    ports = []
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as client:
            if client.info("replication")["role"] == "master":
                ports.append(node.port)
    return ports


def slots_of(port: int) -> int:
    """How many of the 16,384 slots the master on `port` serves (CLUSTER SLOTS: start, end, master)."""
    with redis.Redis(port=port) as client:
        ranges = client.execute_command("CLUSTER", "SLOTS")
    return sum(int(end) - int(start) + 1 for start, end, master, *_ in ranges if int(master[1]) == port)


def snapshot(ports: list[int]) -> dict[int, dict[str, Any]]:
    return {port: S.redis_stats(port) for port in ports}


def work(before: dict[int, dict[str, Any]], after: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {port: S.stats_delta(before[port], after[port]) for port in before}


async def load(auras: list[S.Server], runs: int, concurrency: int, body: dict[str, Any],
               approve: bool = False) -> list[int]:
    """`runs` runs, `concurrency` at once, round-robin over the instances; an approval is made on
    the next instance (another one when there are two or more). Returns each run's event count."""
    limits = httpx.Limits(max_connections=concurrency * 2)
    clients = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{aura.port}", timeout=120, limits=limits)
               for aura in auras]
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> int:
        owner, other = clients[index % len(clients)], clients[(index + 1) % len(clients)]
        async with gate:
            _, events = await stream_run(owner, index, body, approve_on=other if approve else None)
            return events

    try:
        return list(await asyncio.gather(*(one(i) for i in range(runs))))
    finally:
        for client in clients:
            await client.aclose()


def measure(ports: list[int], auras: list[S.Server], idle: dict[int, float], runs: int, concurrency: int,
            body: dict[str, Any], approve: bool = False) -> dict[str, Any]:
    before, aura_before, started = snapshot(ports), sum(a.cpu() for a in auras), time.monotonic()
    with PeakRss(auras) as rss:
        events = asyncio.run(load(auras, runs, concurrency, body, approve))
    seconds = time.monotonic() - started
    after, aura_after = snapshot(ports), sum(a.cpu() for a in auras)
    total_events = sum(events)
    masters = []
    for port, done in work(before, after).items():
        net_cpu = max(done["cpu_s"] - idle[port] * seconds, 0.0)
        masters.append({
            "port": port, "commands": done["commands"], "cpu_s": round(done["cpu_s"], 3),
            "net_cpu_s": round(net_cpu, 3), "core_share": round(net_cpu / seconds, 4),
            "idle_core_share": round(idle[port], 4),
            "cpu_us_per_event": round(net_cpu / total_events * 1e6, 2),
            "by_command": done["by_command"]})
    rate = total_events / seconds
    busiest = max(m["core_share"] for m in masters)
    commands = sum(m["commands"] for m in masters)
    return {
        "runs": runs, "concurrency": concurrency, "events": total_events, "seconds": round(seconds, 2),
        "events_per_second": round(rate, 1), "aura_cpu_s": round(aura_after - aura_before, 2),
        "aura_cpu_us_per_event": round((aura_after - aura_before) / total_events * 1e6, 1),
        "aura_rss_mib_before": [round(value / 2**20, 1) for value in rss.before],
        "aura_rss_mib_peak": [round(value / 2**20, 1) for value in rss.peak],
        "aura_rss_kib_per_open_stream": rss.kib_per(concurrency),
        "redis_commands": commands, "redis_commands_per_event": round(commands / total_events, 3),
        "redis_net_cpu_us_per_event": round(sum(m["net_cpu_s"] for m in masters) / total_events * 1e6, 2),
        "busiest_master_core_share": busiest,
        # the store's limit: the offered rate scaled until the busiest master takes a whole core
        "store_events_per_second_at_full_core": round(rate / busiest) if busiest else None,
        "command_share_max_over_mean": round(max(m["commands"] for m in masters) / (commands / len(masters)), 3),
        "masters": masters,
    }


def idle_share(ports: list[int]) -> dict[int, float]:
    """Each master's share of a core with Aura running and no load (cron, cluster bus, leases)."""
    before, started = snapshot(ports), time.monotonic()
    time.sleep(IDLE_SECONDS)  # a measurement window, not a wait for a condition
    seconds, after = time.monotonic() - started, snapshot(ports)
    return {port: (after[port]["cpu_s"] - before[port]["cpu_s"]) / seconds for port in ports}


def keys_per_master(ports: list[int]) -> dict[int, int]:
    out = {}
    for port in ports:
        with redis.Redis(port=port) as client:
            out[port] = int(client.dbsize())
    return out


def one_size(workdir: Path, masters: int, args: argparse.Namespace, control_streams: int = 0) -> dict[str, Any]:
    """One cluster size's phases; `control_streams`: the streams phase again with that many streams
    at once (the load each master of a larger cluster gets), after the others."""
    cluster = start_redis_cluster(workdir / f"cluster-{masters}", masters=masters, replicas=0)
    auras: list[S.Server] = []
    try:
        ports = masters_of(cluster)
        for index in range(args.instances):
            auras.append(S.aura_server(f"aura-m{masters}-{index}", workdir, cluster.url).start())
        text = answer_text(args.chunks)
        paced = {"prompt": "@answer " + json.dumps({"text": text, "chunks": args.chunks,
                                                    "intervalMs": EVENT_INTERVAL_MS})}
        asyncio.run(load(auras, 10, 10, {"prompt": "@answer " + json.dumps({"text": text[:200], "chunks": 10})}))
        asyncio.run(load(auras, 4, 4, {"prompt": PARK_PROMPT}, approve=True))  # warm-up: scripts loaded
        idle = idle_share(ports)
        streams = measure(ports, auras, idle, args.streams * args.rounds, args.streams, paced)
        keys = keys_per_master(ports)
        approvals = (measure(ports, auras, idle, args.approvals, args.approvals, {"prompt": PARK_PROMPT},
                             approve=True) if args.approvals else None)
        control = (measure(ports, auras, idle, control_streams * args.rounds, control_streams, paced)
                   if control_streams else None)
        return {"masters": masters, "slots": {port: slots_of(port) for port in ports},
                "keys_after_streams": keys, "streams": streams, "approvals": approvals,
                "streams_at_a_larger_clusters_per_master_load": control}
    finally:
        for aura in auras:
            aura.stop()
        stop_redis_cluster(cluster)


def markdown(report: dict[str, Any]) -> str:
    args = report["args"]
    sizes = report["results"]
    out = [f"# Redis Cluster: capacity by masters ({report['date']})", "",
           f"`python -m bench.cluster_scaling --streams {args['streams']} --rounds {args['rounds']} "
           f"--chunks {args['chunks']} --approvals {args['approvals']} --instances {args['instances']}`; "
           f"commit {report['commit']}; {machine_line(report['machine'])}.", "",
           f"{args['instances']} `aura serve` on `redis+cluster://`; each cluster's masters without replicas. "
           f"The same load on each: {args['streams']} streams at once at 10 events/s each "
           f"({args['chunks']}-chunk answers, {args['rounds']} rounds), then {args['approvals']} runs parked "
           "on an approval and approved through another instance. A master's *core share* is its CPU "
           "seconds (INFO cpu) over the phase's seconds, less what it spends idle (measured first, Aura "
           "running); the store's limit is the offered rate scaled until the busiest master takes a whole "
           "core.", "",
           "| masters | events/s | Redis commands/event | Redis CPU µs/event (all masters) "
           "| busiest master's core share | store's limit (events/s at a full core) | commands max/mean over "
           "masters | keys per master | Aura CPU µs/event | Aura RSS KiB per open stream |",
           "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for size in sizes:
        st = size["streams"]
        out.append(f"| {size['masters']} | {st['events_per_second']} | {st['redis_commands_per_event']} | "
                   f"{st['redis_net_cpu_us_per_event']} | {st['busiest_master_core_share']} | "
                   f"{st['store_events_per_second_at_full_core']} | {st['command_share_max_over_mean']} | "
                   f"{list(size['keys_after_streams'].values())} | {st['aura_cpu_us_per_event']} | "
                   f"{st['aura_rss_kib_per_open_stream']} |")
    for size in sizes:
        control = size.get("streams_at_a_larger_clusters_per_master_load")
        if control:
            out.append(f"| {size['masters']}, {control['concurrency']} streams (the larger cluster's load per "
                       f"master) | {control['events_per_second']} | {control['redis_commands_per_event']} | "
                       f"{control['redis_net_cpu_us_per_event']} | {control['busiest_master_core_share']} | "
                       f"{control['store_events_per_second_at_full_core']} | | | {control['aura_cpu_us_per_event']} "
                       "| (after a larger phase: not measured) |")
    if len(sizes) >= 2:
        first, last = sizes[0]["streams"], sizes[-1]["streams"]

        def ratio(key: str) -> str:
            return f"{last[key] / first[key]:.2f}"

        out += ["", f"Same-run ratios, {sizes[-1]['masters']} masters over {sizes[0]['masters']}: the store's "
                f"limit {ratio('store_events_per_second_at_full_core')}; the busiest master's load at the same "
                f"rate {ratio('busiest_master_core_share')}; Redis CPU per event over all masters "
                f"{ratio('redis_net_cpu_us_per_event')}."]
        control = sizes[0].get("streams_at_a_larger_clusters_per_master_load")
        if control:
            out.append(f"At the same load per master ({sizes[0]['masters']} master(s) with "
                       f"{control['concurrency']} streams against {sizes[-1]['masters']} with {args['streams']}), "
                       f"Redis CPU per event over all masters {control['redis_net_cpu_us_per_event']} µs against "
                       f"{last['redis_net_cpu_us_per_event']} µs: ratio "
                       f"{last['redis_net_cpu_us_per_event'] / control['redis_net_cpu_us_per_event']:.2f}.")
    for size in sizes:
        out += ["", f"## {size['masters']} master(s)", "",
                "| phase | master | slots | commands | CPU s (idle share) | core share | CPU µs/event |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for name in ("streams", "approvals"):
            phase = size[name]
            if phase is None:
                continue
            for m in phase["masters"]:
                out.append(f"| {name}: {phase['runs']} runs, {phase['events']} events, {phase['seconds']} s | "
                           f"{m['port']} | {size['slots'][m['port']]} | {m['commands']} | {m['cpu_s']} "
                           f"({m['idle_core_share']}) | {m['core_share']} | {m['cpu_us_per_event']} |")
        approvals = size["approvals"]
        if approvals is not None:
            per = {m["port"]: round(m["net_cpu_s"] / approvals["runs"] * 1e6) for m in approvals["masters"]}
            out.append(f"\nApprovals: {approvals['redis_commands'] / approvals['runs']:.1f} commands per approved "
                       f"run; Redis CPU µs per approved run by master {per}.")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=150, help="streams at once (10 events/s each)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=60, help="content chunks per run (+ start, plan, end...)")
    parser.add_argument("--approvals", type=int, default=100)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--masters", default="1,3", help="comma-separated cluster sizes, measured in turn")
    args = parser.parse_args()
    report: dict[str, Any] = {"date": datetime.date.today().isoformat(), "commit": source_revision(),
                              "machine": machine_info(), "args": vars(args)}
    sizes = [int(masters) for masters in args.masters.split(",")]
    with tempfile.TemporaryDirectory(prefix="aura-cluster-scaling-") as tmp:
        # the smallest cluster runs the streams again at the per-master load of the largest
        report["results"] = [one_size(Path(tmp), masters, args,
                                      args.streams * masters // max(sizes) if masters < max(sizes) else 0)
                             for masters in sizes]
    publish(report, "cluster-scaling", markdown(report))


if __name__ == "__main__":
    main()
