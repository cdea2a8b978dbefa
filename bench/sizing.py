"""The arithmetic of docs/operators.md ("Capacity"): a deployment's size from the measured costs.

    python -m bench.sizing [--results bench/results/<date>-capacity.json] [--retention 300]

Reads bench/capacity.py's latest result (the master without `WAIT`, replica fed): the cost of a
stream paced at 10 events/s (per event and per run, Aura's CPU, Redis's CPU and commands, Aura's
RSS per open stream) and the bytes a finished run keeps. Prints, for 10k, 100k and 1M concurrent
streams: Aura instances (cores, memory), Redis masters by CPU, Redis nodes and memory. Every
figure is an extrapolation from what this machine measured; the parameters are printed with it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from bench.capacity import RESULTS

STREAMS = (10_000, 100_000, 1_000_000)


def costs(report: dict[str, Any]) -> dict[str, float]:
    """The per-unit costs the sizing takes from a bench/capacity.py result."""
    single = next(r for r in report["results"] if r["wait_replicas"] == 0 and r.get("paced_per_unit"))
    waited = next((r for r in report["results"] if r["wait_replicas"] == 1), None)
    paced = single["paced_per_unit"]
    large = single["streams"][1]
    kept = single["kept_bytes_per_run_200_chunks"]
    events_per_run = large["events"] / large["runs"]
    # the paced runs' whole cost per event (a ~120-event run's fixed cost included: for the longer
    # runs sized here this errs high), steadier than the solve's split between run and event
    return {
        "aura_us_per_event": paced["aura_cpu_us_per_event_all_in"], "aura_ms_per_run": 0.0,
        "redis_us_per_event": paced["redis_cpu_us_per_event_all_in"], "redis_ms_per_run": 0.0,
        "wait_factor": (waited["redis_cpu_us_per_event"] / single["redis_cpu_us_per_event"]) if waited else 1.0,
        "rss_kib_per_stream": paced["aura_rss_kib_per_open_stream"], "rss_mib_base": paced["aura_rss_mib_before"],
        "log_bytes_per_event": kept["run events"] / events_per_run,
        "record_bytes_per_run": kept["run meta"] + kept["run snapshot"],
    }


def small_batches(report: dict[str, Any]) -> float:
    """Redis CPU per event with several instances per master, from a bench/cluster_scaling.py result:
    the smallest cluster's median (each instance's pipeline to a master carries smaller batches than
    bench/capacity.py's single instance sends, and a master's cost per event grows as they shrink)."""
    return float(report["results"][0]["streams"]["redis_net_cpu_us_per_event"]["median"])


def masters_for(streams: int, us_per_event: float, c: dict[str, float], args: argparse.Namespace) -> tuple[int, int]:
    """(streams per master, masters) when a master may use `args.core_share` of a core."""
    per_stream = args.rate * us_per_event * 1e-6 + c["redis_ms_per_run"] * 1e-3 / args.run_seconds
    per_master = math.floor(args.core_share / per_stream)
    return per_master, math.ceil(streams / per_master)


def size(streams: int, c: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    rate, length, retention, share = args.rate, args.run_seconds, args.retention, args.core_share
    aura_per_stream = rate * c["aura_us_per_event"] * 1e-6 + c["aura_ms_per_run"] * 1e-3 / length  # core-seconds/s
    per_instance = math.floor(share / aura_per_stream)
    instances = math.ceil(streams / per_instance)
    instance_mib = c["rss_mib_base"] + per_instance * c["rss_kib_per_stream"] / 1024
    per_master, masters = masters_for(streams, c["redis_us_per_event"], c, args)
    per_master_small, masters_small = (masters_for(streams, c["redis_us_per_event_small_batches"], c, args)
                                       if "redis_us_per_event_small_batches" in c else (per_master, masters))
    events = streams * rate
    live = streams * (length * rate / 2) * c["log_bytes_per_event"] + streams * c["record_bytes_per_run"]
    retained = events * retention * c["log_bytes_per_event"] + streams / length * retention * c["record_bytes_per_run"]
    memory = live + retained
    return {"streams": streams, "events_per_second": events, "streams_per_instance": per_instance,
            "instances": instances, "instance_mib": instance_mib, "streams_per_master": per_master,
            "masters": masters, "streams_per_master_small_batches": per_master_small,
            "masters_small_batches": masters_small, "redis_gb": memory / 1e9}


def markdown(rows: list[dict[str, Any]], c: dict[str, float], args: argparse.Namespace, source: str) -> str:
    out = [f"From `{source}` (`python -m bench.sizing --retention {args.retention:g}`): Aura "
           f"{c['aura_us_per_event']} µs per event (a paced run's fixed cost included), {c['rss_kib_per_stream']} KiB "
           f"per open stream over {c['rss_mib_base']} MiB; Redis {c['redis_us_per_event']} µs per event, the same way "
           f"(replica fed, no WAIT; {c['wait_factor']:.2f} times that with WAIT 1); "
           f"{c['log_bytes_per_event']:.0f} B of log per event, {c['record_bytes_per_run'] / 1000:.1f} KB of record "
           f"and snapshot per run; runs of {args.run_seconds:g} s at {args.rate:g} events/s, "
           f"retention {args.retention:g} s, "
           f"{args.core_share:.0%} of a core per process.", "",
           "| concurrent streams | events/s | Aura instances (streams each; 1 core each; memory) | Redis masters "
           f"by CPU, at {c['redis_us_per_event']:g} µs per event and at "
           f"{c.get('redis_us_per_event_small_batches', c['redis_us_per_event']):g} (bench.cluster_scaling) "
           "(streams each) | Redis nodes (1 replica per master; +3 sentinels for Sentinel) | Redis memory "
           f"(R = {args.retention:g} s; per master) |",
           "|---:|---:|---|---|---|---|"]
    for r in rows:
        memory_mib = 64 * math.ceil(r["instance_mib"] / 64)
        low, high = sorted((r["masters"], r["masters_small_batches"]))
        nodes = f"{low * 2:,} to {high * 2:,}" + (" (+3 sentinels)" if low == 1 else "")
        out.append(f"| {r['streams']:,} | {r['events_per_second']:,.0f} | {r['instances']:,} "
                   f"({r['streams_per_instance']:,}; {r['instances']:,} cores; {memory_mib} MiB each) | "
                   f"{r['masters']:,} and {r['masters_small_batches']:,} ({r['streams_per_master']:,} and "
                   f"{r['streams_per_master_small_batches']:,}) | "
                   f"{nodes} | {r['redis_gb']:,.0f} GB ({r['redis_gb'] / high:.1f} to {r['redis_gb'] / low:.1f} GB) |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, help="a bench/capacity.py result (default: the latest)")
    parser.add_argument("--rate", type=float, default=10.0, help="events per second per stream")
    parser.add_argument("--run-seconds", type=float, default=60.0, help="a run's length")
    parser.add_argument("--retention", type=float, default=300.0, help="AURA_EVENTS__RETENTION_SECONDS")
    parser.add_argument("--core-share", type=float, default=0.6, help="the share of a core each process may use")
    args = parser.parse_args()
    source = Path(args.results or sorted(RESULTS.glob("*-capacity.json"))[-1]).resolve()
    c = costs(json.loads(source.read_text()))
    scaling = sorted(RESULTS.glob("*-cluster-scaling.json"))
    if scaling:
        c["redis_us_per_event_small_batches"] = small_batches(json.loads(scaling[-1].read_text()))
    rows = [size(streams, c, args) for streams in STREAMS]
    root = RESULTS.parent.parent
    print(markdown(rows, c, args, str(source.relative_to(root) if source.is_relative_to(root) else source)))


if __name__ == "__main__":
    main()
