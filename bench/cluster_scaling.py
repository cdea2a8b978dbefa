"""What Redis Cluster adds: the store's capacity growing with its masters (1 -> 3).

    python -m bench.cluster_scaling [--streams 150] [--waves 2] [--chunks 60] [--rounds 3]
                                    [--approvals 100] [--instances 2] [--masters 1,3]

For each number of masters: a real Redis Cluster on loopback (cluster-enabled `redis-server`s, no
replicas, tests/redis_nodes.py) and `--instances` `aura serve` on its `redis+cluster://` URL, all
deployed at once. The same offered load runs on each: `--streams` streams at once, each paced at
10 events/s (the offline model's `@answer` with `intervalMs` 100), `--waves` of them, spread over
the instances; the sizes take turns, `--rounds` times (medians, and same-round ratios). The
smallest cluster also runs the streams at the largest one's load per master (streams ÷ masters):
whether a master's cost per event depends on its own load only. Then `--approvals` runs parked
on an approval, each approved through another instance's API. Per master, from its own INFO
commandstats and INFO cpu before and after (less what it spends idle, Aura running: cron, cluster
bus, measured first): commands, CPU seconds, CPU per event, the share of a core it used at that
load, its keys (DBSIZE).

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
import statistics
import tempfile
import time
from dataclasses import dataclass, field
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


@dataclass
class Deployment:
    """One cluster size: its cluster, its masters' ports, the Aura instances on it, their idle cost."""

    masters: int
    cluster: RedisCluster
    ports: list[int]
    auras: list[S.Server] = field(default_factory=list)
    idle: dict[int, float] = field(default_factory=dict)


def deploy(workdir: Path, masters: int, args: argparse.Namespace) -> Deployment:
    cluster = start_redis_cluster(workdir / f"cluster-{masters}", masters=masters, replicas=0)
    deployment = Deployment(masters, cluster, masters_of(cluster))
    try:
        for index in range(args.instances):
            deployment.auras.append(S.aura_server(f"aura-m{masters}-{index}", workdir, cluster.url).start())
        short = {"prompt": "@answer " + json.dumps({"text": answer_text(10), "chunks": 10})}
        asyncio.run(load(deployment.auras, 10, 10, short))  # warm-up: scripts loaded, code paths taken
        asyncio.run(load(deployment.auras, 4, 4, {"prompt": PARK_PROMPT}, approve=True))
    except BaseException:
        teardown(deployment)
        raise
    return deployment


def teardown(deployment: Deployment) -> None:
    for aura in deployment.auras:
        aura.stop()
    stop_redis_cluster(deployment.cluster)


SUMMARY = ("events_per_second", "redis_commands_per_event", "redis_net_cpu_us_per_event", "busiest_master_core_share",
           "store_events_per_second_at_full_core", "command_share_max_over_mean", "aura_cpu_us_per_event",
           "aura_rss_kib_per_open_stream")


def summary(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the rounds, and each round's value."""
    return {key: {"median": statistics.median(p[key] for p in phases), "rounds": [p[key] for p in phases]}
            for key in SUMMARY}


def run(workdir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every cluster size deployed at once, their streams phases interleaved round by round (the
    machine's noise then falls on every size alike); then each size's approvals."""
    sizes = sorted(int(masters) for masters in args.masters.split(","))
    # the smallest cluster also runs the streams at the per-master load of the largest
    control_streams = args.streams * sizes[0] // sizes[-1] if len(sizes) > 1 else 0
    paced = {"prompt": "@answer " + json.dumps({"text": answer_text(args.chunks), "chunks": args.chunks,
                                                "intervalMs": EVENT_INTERVAL_MS})}
    deployments: list[Deployment] = []
    try:
        for masters in sizes:
            deployments.append(deploy(workdir, masters, args))
        for d in deployments:
            d.idle = idle_share(d.ports)
        streams: dict[int, list[dict[str, Any]]] = {d.masters: [] for d in deployments}
        control: list[dict[str, Any]] = []
        for _ in range(args.rounds):
            for d in deployments:
                streams[d.masters].append(measure(d.ports, d.auras, d.idle, args.streams * args.waves,
                                                  args.streams, paced))
            if control_streams:
                first = deployments[0]
                control.append(measure(first.ports, first.auras, first.idle, control_streams * args.waves,
                                       control_streams, paced))
        results = []
        for d in deployments:
            keys = keys_per_master(d.ports)
            approvals = (measure(d.ports, d.auras, d.idle, args.approvals, args.approvals, {"prompt": PARK_PROMPT},
                                 approve=True) if args.approvals else None)
            results.append({
                "masters": d.masters, "slots": {port: slots_of(port) for port in d.ports},
                "keys_after_streams": keys, "streams": summary(streams[d.masters]),
                "streams_rounds": streams[d.masters], "approvals": approvals,
                "control": summary(control) if control and d is deployments[0] else None,
                "control_rounds": control if d is deployments[0] else [],
                "control_streams": control_streams if d is deployments[0] else 0})
        return results
    finally:
        for d in deployments:
            teardown(d)


def figure(entry: dict[str, Any]) -> str:
    rounds = entry["rounds"]
    return f"{entry['median']:g}" + (f" ({', '.join(f'{v:g}' for v in rounds)})" if len(rounds) > 1 else "")


def markdown(report: dict[str, Any]) -> str:
    args = report["args"]
    sizes = report["results"]
    out = [f"# Redis Cluster: capacity by masters ({report['date']})", "",
           f"`python -m bench.cluster_scaling --streams {args['streams']} --waves {args['waves']} "
           f"--chunks {args['chunks']} --rounds {args['rounds']} --approvals {args['approvals']} "
           f"--instances {args['instances']}`; commit {report['commit']}; {machine_line(report['machine'])}.", "",
           f"{args['instances']} `aura serve` on `redis+cluster://` per cluster size, each cluster's masters "
           f"without replicas, all deployed at once. The same load on each: {args['streams']} streams at once at "
           f"10 events/s each ({args['chunks']}-chunk answers, {args['waves']} waves of them), the sizes "
           f"interleaved over {args['rounds']} rounds (medians; each round's value in brackets); then "
           f"{args['approvals']} runs parked on an approval and approved through another instance. A master's "
           "*core share* is its CPU seconds (INFO cpu) over the phase's seconds, less what it spends idle "
           "(measured first, Aura running); the store's limit is the offered rate scaled until the busiest "
           "master takes a whole core.", "",
           "What this machine cannot show: masters driven to a full core. On 2 cores Aura's instances and the "
           "load client take both cores while the busiest master uses a few percent of one, so the limit is "
           "extrapolated from each master's CPU, not reached. A master's cost per event falls as its load grows "
           "(each instance's pipeline to it carries larger batches), so the extrapolation errs low for every "
           "size, more so for the larger cluster (each of its masters is lighter loaded); the control row (the "
           "smallest cluster at the largest one's load per master) shows whether a master's cost per event "
           "depends on its own load alone.", "",
           "| masters | events/s | Redis commands/event | Redis CPU µs/event (all masters) "
           "| busiest master's core share | store's limit (events/s at a full core) | commands max/mean over "
           "masters | keys per master | Aura CPU µs/event | Aura RSS KiB per open stream (the first round: fresh "
           "instances) |",
           "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]

    def row(label: str, st: dict[str, Any], keys: str) -> str:
        return (f"| {label} | {figure(st['events_per_second'])} | {figure(st['redis_commands_per_event'])} | "
                f"{figure(st['redis_net_cpu_us_per_event'])} | {figure(st['busiest_master_core_share'])} | "
                f"{figure(st['store_events_per_second_at_full_core'])} | "
                f"{figure(st['command_share_max_over_mean'])} | {keys} | {figure(st['aura_cpu_us_per_event'])} | "
                f"{figure(st['aura_rss_kib_per_open_stream'])} |")

    for size in sizes:
        out.append(row(str(size["masters"]), size["streams"], str(list(size["keys_after_streams"].values()))))
    first = sizes[0]
    if first["control"]:
        out.append(row(f"{first['masters']}, {first['control_streams']} streams (the largest cluster's load per "
                       "master)", first["control"], ""))
    if len(sizes) >= 2:
        last = sizes[-1]

        def ratio(key: str, low: list[dict[str, Any]], high: list[dict[str, Any]]) -> str:
            values = [h[key] / lo[key] for lo, h in zip(low, high, strict=True)]
            return f"{statistics.median(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})"

        low, high = first["streams_rounds"], last["streams_rounds"]
        out += ["", f"Same-round ratios, {last['masters']} masters over {first['masters']} (median, each round): "
                f"the store's limit {ratio('store_events_per_second_at_full_core', low, high)}; the busiest "
                f"master's load at the same rate {ratio('busiest_master_core_share', low, high)}; Redis CPU per "
                f"event over all masters {ratio('redis_net_cpu_us_per_event', low, high)}."]
        if first["control_rounds"]:
            out.append(f"At the same load per master ({first['masters']} master with {first['control_streams']} "
                       f"streams against {last['masters']} with {args['streams']}), Redis CPU per event over all "
                       f"masters, {last['masters']} masters over 1: "
                       f"{ratio('redis_net_cpu_us_per_event', first['control_rounds'], high)}.")
    for size in sizes:
        out += ["", f"## {size['masters']} master(s)", "",
                "| phase | master | slots | commands | CPU s (idle share) | core share | CPU µs/event |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        phases = [("streams", p) for p in size["streams_rounds"]] + [("control", p) for p in size["control_rounds"]]
        if size["approvals"] is not None:
            phases.append(("approvals", size["approvals"]))
        for name, phase in phases:
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
    parser.add_argument("--waves", type=int, default=2, help="runs per phase = streams * waves")
    parser.add_argument("--chunks", type=int, default=60, help="content chunks per run (+ start, plan, end...)")
    parser.add_argument("--rounds", type=int, default=3, help="the sizes' streams phases, interleaved, this often")
    parser.add_argument("--approvals", type=int, default=100)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--masters", default="1,3", help="comma-separated cluster sizes")
    args = parser.parse_args()
    report: dict[str, Any] = {"date": datetime.date.today().isoformat(), "commit": source_revision(),
                              "machine": machine_info(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="aura-cluster-scaling-") as tmp:
        report["results"] = run(Path(tmp), args)
    publish(report, "cluster-scaling", markdown(report))


if __name__ == "__main__":
    main()
