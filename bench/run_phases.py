"""Where A's CPU goes in each approved run: the approvals phase's load with Aura's instance A
under the `cpu_marks` what-if, then the median CPU (and wall) time between each run's milestones.

    python -m bench.run_phases [--approval-run full|short] [--isolated] [--batches 3]

Starts a real `redis-server`, Aura A (marked) and B under hypercorn and the load generator (all
stopped at the end), parks `--batch` runs on A and approves them one by one on B, as the
approvals phase does, and reads A's log. Milestones: parked on the approval → decided (the signal
arrived) → `end` emitted → stream written to its end → run closed (directory and log) → the next
run decided. Only the last batch counts (the first ones warm up). Back to back, runs overlap,
so a span's CPU is the process's, not the run's alone; `--isolated` waits for each stream's end
before the next approval, which makes them the run's own.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from itertools import pairwise
from pathlib import Path
from statistics import median

from bench import servers as S
from bench.run import PARK_PROMPT, SHORT_PARK_PROMPT, STREAM_PATH, Client

MILESTONES = ("parked", "decided", "end", "streamed", "closed")


def spans(log: Path, batch: int) -> dict[str, tuple[float, float, int]]:
    """Median CPU ms, median wall ms and count for each consecutive pair of one run's milestones,
    and between consecutive decisions, over the last `batch` runs decided."""
    marks: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    decided: list[str] = []
    for line in log.read_text().splitlines():
        if not line.startswith("CPUMARK "):
            continue
        _, milestone, cpu, wall, run_id = line.split()
        marks[run_id][milestone] = (float(cpu), float(wall))
        if milestone == "decided":
            decided.append(run_id)
    last = decided[-batch:]
    found: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run_id in last:
        run = marks[run_id]
        for before, after in pairwise(MILESTONES):
            if before in run and after in run:
                found[f"{before} → {after}"].append((run[after][0] - run[before][0], run[after][1] - run[before][1]))
    for earlier, later in pairwise(last):
        a, b = marks[earlier]["decided"], marks[later]["decided"]
        found["decided → next decided"].append((b[0] - a[0], b[1] - a[1]))
    return {name: (median(c for c, _ in values) * 1000, median(w for _, w in values) * 1000, len(values))
            for name, values in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--approval-run", choices=["full", "short"], default="full")
    parser.add_argument("--isolated", action="store_true")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="aura-run-phases-"))
    redis = S.redis_server(workdir).start()
    a = S.aura_server("aura-a", workdir, redis.url, whatif="cpu_marks").start()
    b = S.aura_server("aura-b", workdir, redis.url).start()
    client = Client(workdir, S.uvloop_available())
    try:
        prompt = SHORT_PARK_PROMPT if args.approval_run == "short" else PARK_PROMPT
        for _ in range(args.batches):
            result = client("approvals", kind="aura", a_port=a.port, b_port=b.port, total=args.batch,
                            batch=args.batch, isolated=args.isolated, path=STREAM_PATH, body={"prompt": prompt},
                            auth={"secret": S.SECRET, "tenant": S.TENANT, "users": 10**9})
            if result["errors"]:
                raise SystemExit(f"approvals failed: {result['error_kinds']}")
    finally:
        client.stop()
        b.stop()
        a.stop()
        redis.stop()
    mode = "isolated" if args.isolated else "back to back"
    print(f"A, {args.approval_run} runs approved {mode} (last batch of {args.batch}): median per run")
    for name, (cpu_ms, wall_ms, count) in spans(workdir / "aura-a.log", args.batch).items():
        print(f"  {name:24s} CPU {cpu_ms:6.2f} ms   wall {wall_ms:6.2f} ms   ({count})")


if __name__ == "__main__":
    main()
