"""Profile Aura under one of the benchmark's loads with py-spy (sampling, no code change).

    python -m bench.profile stream      # 100 concurrent @answer streams of 200 events
    python -m bench.profile stream1000  # 1,000 concurrent @answer streams of 200 events
    python -m bench.profile stream1     # 1 @answer stream of 200 events at a time
    python -m bench.profile short       # 1 stream at a time of the shortest run (per-run cost)
    python -m bench.profile approval    # approve on B -> running event on A (profiles A and B)
    python -m bench.profile summarise bench/results/profiles/*.txt   # re-print the summaries

Writes collapsed stacks (flamegraph input) to bench/results/profiles/<scenario>-<instance>.txt and
prints the functions with the most samples, inclusive and self. Needs `pip install py-spy`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench import servers as S
from bench.run import PARK_PROMPT, STREAM_PATH, Calibration, Client, Target

OUT = Path(__file__).resolve().parent / "results" / "profiles"


def _component(frame: str) -> str:
    where = frame[frame.rfind("(") + 1:]
    for aura in ("adapters/", "domain/", "app/"):
        if where.startswith(aura):
            return "aura:" + aura.rstrip("/")
    return where.split("/", 1)[0].split(".", 1)[0] if "/" in where else "other"


def top(collapsed: Path, limit: int = 25) -> str:
    """Shares of samples: by the component of the innermost frame, by the deepest Aura frame on
    the stack (all library time below it charged to it), and by function, inclusive."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    components: Counter[str] = Counter()
    deepest: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
        components[_component(frames[-1])] += count
        mine = [f for f in frames if _component(f).startswith("aura:")]
        deepest[mine[-1] if mine else f"(no Aura frame) {_component(frames[-1])}"] += count
    lines = [f"{collapsed.name}: {total} samples", "  innermost frame's component:"]
    lines += [f"    {n / total * 100:5.1f}%  {f}" for f, n in components.most_common(12)]
    lines += ["  deepest Aura frame (library time below it included):"]
    lines += [f"    {n / total * 100:5.1f}%  {f}" for f, n in deepest.most_common(limit)]
    lines += ["  inclusive:"]
    lines += [f"    {n / total * 100:5.1f}%  {f}" for f, n in inclusive.most_common(limit)]
    lines += ["  self:"]
    lines += [f"    {n / total * 100:5.1f}%  {f}" for f, n in own.most_common(limit)]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "summarise":
        for name in sys.argv[2:]:
            path = Path(name)
            summary = top(path)
            path.with_suffix(".summary.txt").write_text(summary + "\n")
            print(summary)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["stream", "stream1000", "stream1", "short", "approval"])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--asyncio", action="store_true", help="run Aura on plain asyncio instead of its default")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("pip install py-spy")
    OUT.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="aura-profile-"))
    redis = S.redis_server(workdir).start()
    a = S.aura_server("aura-a", workdir, redis.url, event_loop="asyncio" if args.asyncio else "auto").start()
    b = S.aura_server("aura-b", workdir, redis.url).start() if args.scenario == "approval" else None
    client = Client(workdir, S.uvloop_available())
    try:
        target = Target("aura", a, "aura")
        cal = Calibration()
        first = client("streams", **target.stream_spec(cal, 1), total=1, concurrency=1)
        cal.overhead = first["events_max"] - 1
        cal.sizes = {cal.events_for(200): 0, cal.events_for(10): 0}
        client("streams", **target.stream_spec(cal, 200), total=20, concurrency=10)  # warm up
        recorders = []
        for server in (a, b):
            if server is None:
                continue
            path = OUT / f"{args.scenario}-{server.name}.txt"
            assert server.process is not None
            recorders.append((path, subprocess.Popen(
                [py_spy, "record", "--pid", str(server.process.pid), "--format", "raw", "--rate", "200",
                 "--duration", str(int(args.seconds)), "--output", str(path), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        time.sleep(1.0)
        deadline = time.monotonic() + args.seconds - 2
        while time.monotonic() < deadline:
            if args.scenario == "stream":
                result = client("streams", **target.stream_spec(cal, 200), total=100, concurrency=100,
                                connect_limit=50)
            elif args.scenario == "stream1000":
                result = client("streams", **target.stream_spec(cal, 200), total=1000, concurrency=1000,
                                connect_limit=50)
            elif args.scenario == "stream1":
                result = client("streams", **target.stream_spec(cal, 200), total=20, concurrency=1)
            elif args.scenario == "short":
                result = client("streams", **target.stream_spec(cal, 10), total=50, concurrency=1)
            else:
                assert b is not None
                result = client("approvals", kind="aura", a_port=a.port, b_port=b.port, total=50, batch=50,
                                path=STREAM_PATH, body={"prompt": PARK_PROMPT},
                                auth={"secret": S.SECRET, "tenant": S.TENANT, "users": 10**9})
            print({k: v for k, v in result.items() if not isinstance(v, list)}, file=sys.stderr)
        for path, recorder in recorders:
            recorder.wait(60)
            summary = top(path)
            path.with_suffix(".summary.txt").write_text(summary + "\n")
            print(summary)
    finally:
        client.stop()
        for server in (b, a, redis):
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
