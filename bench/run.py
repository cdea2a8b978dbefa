"""The benchmark orchestrator: `python -m bench [--quick]`.

Starts a real redis-server, Aura (`aura serve`, hypercorn) twice (instances A and B), the peer
(Starlette + sse-starlette on uvicorn), the framework floor (bare Quart on hypercorn, twice for the
approval floor) and one load-generator process; runs every measurement in rounds, interleaving
Aura with its baselines (the order rotates each round); stops everything it started; writes
bench/results/<date>.json, <date>.md and <date>.png.

Server CPU is read from /proc (psutil) before and after each load: CPU per delivered event is the
server's CPU seconds divided by the events the client counted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from bench import servers as S
from bench.stats import pct

_T = TypeVar("_T")
RESULTS = Path(__file__).resolve().parent / "results"
ANSWER_TEXT = ("Aura streams what it thinks, plans and does as server-sent events; "
               "a human approves every risky action. ") * 400
CHUNK_CHARS = 20
STREAM_PATH = "/aura/test/stream"
PARK_PROMPT = '@git_commit {"repo_path": "no-such-repo", "message": "bench"}'
# LangGraph's approval run: it stops on interrupt(); resumed, it writes its `tool_execution` and
# 30 more events (Aura's approved run writes about as many: its tool's events, the answer, `end`).
LANGGRAPH_APPROVAL_BODY = {"assistant_id": "approval", "input": {"events": 30, "size": 200}}
# For `--approval-run short`: after its decision the run answers in one chunk (about 8 events
# instead of about 30), to see how much of the approval latency A's work after a decision costs.
SHORT_PARK_PROMPT = PARK_PROMPT + '\n@answer {"text": "Done.", "chunks": 1}'
# The approval floors: bare Quart writing the frames Aura's approved run writes (the CPU goal's
# baseline), and writing one frame each side of the wait (a wake alone: context).
FLOOR_SAME_FRAMES = "quart-floor"
FLOOR_WAKE_ONLY = "quart-floor (wake only)"


@dataclass
class Mode:
    name: str
    rounds: int
    # CPU per event: concurrency -> runs per measurement (200 events per run)
    throughput: dict[int, int]
    ttfe_c1_runs: int
    ttfe_c100_waves: int
    # growth: events-per-run targets x concurrencies, with an event budget per cell
    growth_events: list[int]
    growth_conc: list[int]
    growth_budget: int
    growth_max_cell_events: int
    growth_rounds: int
    approvals_total: int
    approval_batch: int
    redis_rtt_n: int
    parked_levels: list[int]
    park_hold_s: float
    options_runs: int  # uvloop option: runs at concurrency 100
    big_rounds: int = 99  # rounds that include the 1,000-stream measurement
    # CPU per event: concurrency -> measurements of each server per round (LangGraph's: one). A
    # load of a second or less moves by up to 2x between measurements on this shared machine
    # (a neighbour's burst, the load generator and the server on one core or two): several passes
    # in a round, each its own same-pass ratio, make the median a median of more samples.
    throughput_passes: dict[int, int] = field(default_factory=lambda: {1: 3, 100: 3, 1000: 2})


MODES = {
    "quick": Mode("quick", rounds=2, throughput={1: 10, 100: 100, 1000: 1000}, ttfe_c1_runs=30, ttfe_c100_waves=1,
                  growth_events=[10, 100, 1000], growth_conc=[1, 10, 100, 1000], growth_budget=4000,
                  growth_max_cell_events=20_000, growth_rounds=1, approvals_total=300, approval_batch=50,
                  redis_rtt_n=500, parked_levels=[500, 1000], park_hold_s=6.0, options_runs=50, big_rounds=1),
    "full": Mode("full", rounds=3, throughput={1: 60, 100: 200, 1000: 1000}, ttfe_c1_runs=100, ttfe_c100_waves=3,
                 growth_events=[10, 100, 1000], growth_conc=[1, 10, 100, 1000], growth_budget=12000,
                 growth_max_cell_events=200_000, growth_rounds=2, approvals_total=2100, approval_batch=100,
                 redis_rtt_n=3000, parked_levels=[1000, 2000, 5000, 10000], park_hold_s=11.0, options_runs=100),
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Client:
    """The load-generator process (bench/client.py), driven over its stdin/stdout."""

    def __init__(self, workdir: Path, use_uvloop: bool) -> None:
        argv = [sys.executable, "-m", "bench.client"] + (["--uvloop"] if use_uvloop else [])
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=(workdir / "client.log").open("ab"), env=S.base_env(), cwd=S.ROOT,
                                        text=True, start_new_session=True)
        self.ps = psutil.Process(self.process.pid)

    def __call__(self, cmd: str, **spec: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"cmd": cmd, **spec}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the load generator exited; see client.log")
        result: dict[str, Any] = json.loads(line)
        if "fatal" in result:
            raise RuntimeError(f"client command {cmd} failed: {result['fatal']}")
        return result

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


@dataclass
class Target:
    """One server under load and how to ask it for a stream of a given length."""

    name: str
    server: S.Server
    kind: str  # aura | peer | floor | langgraph

    def stream_spec(self, cal: Calibration, events: int) -> dict[str, Any]:
        if self.kind == "langgraph":  # a stateless run of the `stream` graph (bench/apps/langgraph)
            return {"port": self.server.port, "path": "/runs/stream", "kind": "langgraph",
                    "bodies": [{"assistant_id": "stream", "stream_mode": ["custom"],
                                "input": {"events": cal.events_for(events), "size": cal.frame_size(events)}}]}
        if self.kind == "aura":
            chunks = cal.chunks_for(events)
            text = ANSWER_TEXT[: chunks * CHUNK_CHARS]
            prompt = "@answer " + json.dumps({"text": text, "chunks": chunks})
            return {"port": self.server.port, "path": STREAM_PATH, "bodies": [{"prompt": prompt}],
                    "auth": {"secret": S.SECRET, "tenant": S.TENANT, "users": 1000}}
        return {"port": self.server.port, "path": "/stream",
                "bodies": [{"events": cal.events_for(events), "size": cal.frame_size(events)}]}


@dataclass
class Calibration:
    """Aura's event count for a chunk count, and its mean frame size, measured on the real service."""

    overhead: int = 0  # events of an @answer run besides its content chunks
    sizes: dict[int, int] = field(default_factory=dict)  # events per run -> mean bytes per event frame

    def chunks_for(self, events: int) -> int:
        return max(1, events - self.overhead)

    def events_for(self, events: int) -> int:
        return self.overhead + self.chunks_for(events)

    def frame_size(self, events: int) -> int:
        return self.sizes[self.events_for(events)]


class Bench:
    def __init__(self, mode: Mode, workdir: Path, use_uvloop_client: bool, options: bool,
                 approval_prompt: str = PARK_PROMPT, langgraph: bool = True) -> None:
        self.mode = mode
        self.langgraph = langgraph
        self.approval_prompt = approval_prompt
        self.approval_shape: dict[str, int] = {}  # what Aura's approved run writes (measure_approval_shape)
        self.workdir = workdir
        self.options = options
        self.started: list[S.Server] = []
        self.checkouts: list[Path] = []
        self.redis = self._start(S.redis_server(workdir))
        self.client = Client(workdir, use_uvloop_client)
        self.cal = Calibration()
        self.results: dict[str, Any] = {"measurements": []}
        self.langgraph_remote: list[str] = []  # LangGraph's connections beyond loopback, if any

    def _start(self, server: S.Server) -> Any:
        self.started.append(server)
        return server.start()

    def stop_all(self) -> None:
        self.client.stop()
        for server in reversed(self.started):
            server.stop()

    # -- measuring -------------------------------------------------------------------------
    def load(self, target: Target, phase: str, round_no: int, spec: dict[str, Any], **labels: Any) -> dict[str, Any]:
        server = target.server
        stats0 = self.redis.stats()
        S.settle(server)
        mark, redis_mark, client0 = S.cpu_mark(server), S.cpu_mark(self.redis), self.client.ps.cpu_times()
        result = self.client("streams", **spec)
        S.settle(server)
        server_cpu, redis_cpu = S.cpu_used(server, mark), S.cpu_used(self.redis, redis_mark)
        client1 = self.client.ps.cpu_times()
        redis_work = S.stats_delta(stats0, self.redis.stats())
        if target.kind == "langgraph":
            self.note_remote(server)
        events = result["events"]
        row = {
            "phase": phase, "round": round_no, "server": target.name, **labels,
            "runs": result["ok"], "errors": result["errors"], "error_kinds": result["error_kinds"],
            "incomplete": result["incomplete"], "events": events, "events_per_run": result["events_max"],
            "bytes": result["bytes"], "wall_s": result["wall_s"], "peak_open": result["peak_open"],
            "server_cpu_s": server_cpu, "redis_cpu_s": redis_cpu,
            "client_cpu_s": (client1.user + client1.system) - (client0.user + client0.system),
            "server_us_per_event": server_cpu / events * 1e6 if events else None,
            "redis_us_per_event": redis_cpu / events * 1e6 if events else None,
            "client_us_per_event": ((client1.user + client1.system) - (client0.user + client0.system)) / events * 1e6
            if events else None,
            **self._redis_row(redis_work, events, "event"),
        }
        if spec.get("ttfe"):
            row["ttfe_ms"] = result["ttfe_ms"]
            row["ttfe_p50_ms"], row["ttfe_p99_ms"] = pct(result["ttfe_ms"], 50), pct(result["ttfe_ms"], 99)
        self.results["measurements"].append(row)
        extra = f" ttfe p50/p99 {row.get('ttfe_p50_ms') or 0:.2f}/{row.get('ttfe_p99_ms') or 0:.2f} ms" \
            if spec.get("ttfe") else ""
        log(f"{phase} r{round_no} {target.name} {labels}: {events} events, "
            f"{row['server_us_per_event'] or 0:.1f} us/event server, {row['redis_us_per_event'] or 0:.1f} redis, "
            f"{row['client_us_per_event'] or 0:.1f} client, {result['errors']} errors, {result['wall_s']:.1f} s{extra}")
        return row

    def note_remote(self, server: S.Server) -> None:
        found = S.remote_connections(server)
        if found:
            log(f"{server.name} has connections beyond loopback: {found}")
        self.langgraph_remote = sorted({*self.langgraph_remote, *found})

    @staticmethod
    def _redis_row(work: dict[str, Any], count: int, unit: str) -> dict[str, Any]:
        """Redis's commands (INFO commandstats, a script's own calls included) and its CPU by its
        own account (INFO cpu) over a load, in all and per `unit` (event, approval)."""
        return {"redis_commands": work["commands"], "redis_by_command": work["by_command"],
                "redis_info_cpu_s": work["cpu_s"],
                f"redis_commands_per_{unit}": work["commands"] / count if count else None,
                f"redis_info_us_per_{unit}": work["cpu_s"] / count * 1e6 if count else None}

    def calibrate(self, aura: Target) -> None:
        body = aura.stream_spec(self.cal, 1)
        first = self.client("streams", **body, total=1, concurrency=1)
        self.cal.overhead = first["events_max"] - 1
        targets = sorted({*self.mode.growth_events, 200})
        for events in targets:
            result = self.client("streams", **aura.stream_spec(self.cal, events), total=3, concurrency=1)
            real = result["events_max"]
            assert real == self.cal.events_for(events), (real, events, self.cal.overhead)
            done_frame = len(b"data: [DONE]\n\n")
            self.cal.sizes[real] = round((result["bytes"] / result["ok"] - done_frame) / real)
        log(f"calibration: an @answer run has {self.cal.overhead} events besides its chunks; "
            f"mean frame bytes by events per run: {self.cal.sizes}")
        self.results["calibration"] = asdict(self.cal)

    def rotate(self, targets: list[_T], round_no: int) -> list[_T]:
        shift = round_no % len(targets)
        return targets[shift:] + targets[:shift]

    def warm(self, targets: list[Target]) -> None:
        for target in targets:
            self.client("streams", **target.stream_spec(self.cal, 200), total=20, concurrency=10)

    # -- phases ----------------------------------------------------------------------------
    def checkout(self, revision: str) -> Path:
        """A worktree of `revision` in the run's folder (removed by `remove_checkouts`)."""
        checkout = self.workdir / f"against-{len(self.checkouts)}"
        subprocess.run(["git", "-C", str(S.ROOT), "worktree", "add", "--detach", str(checkout), revision],
                       check=True, capture_output=True)
        self.checkouts.append(checkout)
        return checkout

    def remove_checkouts(self) -> None:
        for checkout in self.checkouts:
            subprocess.run(["git", "-C", str(S.ROOT), "worktree", "remove", "--force", str(checkout)],
                           check=False, capture_output=True)

    def against_target(self, revision: str) -> Target:
        """Aura at another revision (instance `aura-against`, on the same Redis), warmed up."""
        other = self._start(S.aura_server("aura-against", self.workdir, self.redis.url, source=self.checkout(revision)))
        target = Target(f"aura@{revision}", other, "aura")
        self.warm([target])
        return target

    def phase_against(self, current: S.Server, against: Target, revision: str) -> None:
        """The working tree's Aura against another revision's, interleaved, on the loads where a
        per-run or per-batch change shows: one stream of 200 events, 100 of 200, one stream of the
        shortest run, and 100 new streams at once (time to first event, also taken at one stream).
        (The throughput phase measures the other revision beside the floor too.)"""
        other = against.server
        targets = [Target("aura", current, "aura"), against]
        log(f"== against {revision}")
        loads = [("c1x200", 200, 1, self.mode.throughput[1] * 2), ("c100x200", 200, 100, self.mode.throughput[100]),
                 ("c1x19", 10, 1, self.mode.ttfe_c1_runs * 3)]
        for round_no in range(self.mode.rounds * 2):
            for name, size, concurrency, runs in loads:
                for target in self.rotate(targets, round_no):
                    spec = {**target.stream_spec(self.cal, size), "total": runs, "concurrency": concurrency,
                            "connect_limit": min(concurrency, 50), "ttfe": concurrency == 1}
                    self.load(target, "against", round_no, spec, load=name, concurrency=concurrency)
            for target in self.rotate(targets, round_no):
                # 100 new streams at the same instant, as in the ttfe phase
                spec = {**target.stream_spec(self.cal, 10), "total": 100, "concurrency": 100, "ttfe": True}
                self.load(target, "against", round_no, spec, load="ttfe100", concurrency=100)
                time.sleep(0.5)
        other.stop()

    def phase_throughput(self, targets: list[Target], round_no: int, phase: str = "cpu_per_event") -> None:
        for concurrency, runs in self.mode.throughput.items():
            if concurrency >= 1000 and round_no >= self.mode.big_rounds:
                continue
            passes = self.mode.throughput_passes.get(concurrency, 1) if phase == "cpu_per_event" else 1
            for pass_no in range(passes):
                for target in self.rotate(targets, round_no + pass_no):
                    if target.kind == "langgraph" and pass_no:
                        continue  # about 1 s of wall per run at one stream, 190 s a load at 1,000
                    # LangGraph's runs start from its run queue, polled every 0.5 s: one at a time,
                    # 20 runs take it 20 s and measure its CPU per event as well as more would
                    count = min(runs, 20) if target.kind == "langgraph" and concurrency == 1 else runs
                    spec = {**target.stream_spec(self.cal, 200), "total": count, "concurrency": concurrency,
                            "connect_limit": min(concurrency, 50)}
                    self.load(target, phase, round_no, spec, concurrency=concurrency, pass_no=pass_no)

    def phase_ttfe(self, targets: list[Target], round_no: int) -> None:
        for target in self.rotate(targets, round_no):
            # LangGraph's first event comes after its run queue's next poll (about a second): 30 of
            # them a round show that as well as 100 would
            runs = min(30, self.mode.ttfe_c1_runs) if target.kind == "langgraph" else self.mode.ttfe_c1_runs
            spec = {**target.stream_spec(self.cal, 10), "total": runs, "concurrency": 1, "ttfe": True}
            self.load(target, "ttfe", round_no, spec, concurrency=1)
        for target in self.rotate(targets, round_no):
            for wave in range(self.mode.ttfe_c100_waves):
                # 100 new streams at the same instant: no ramp, as a burst of users would do.
                spec = {**target.stream_spec(self.cal, 10), "total": 100, "concurrency": 100, "ttfe": True}
                self.load(target, "ttfe", round_no, spec, concurrency=100, wave=wave)
                time.sleep(0.5)

    def phase_growth(self, targets: list[Target], round_no: int) -> None:
        for events in self.mode.growth_events:
            real = self.cal.events_for(events)
            for concurrency in self.mode.growth_conc:
                if real * concurrency > self.mode.growth_max_cell_events:
                    continue
                runs = max(concurrency, math.ceil(self.mode.growth_budget / real / concurrency) * concurrency)
                for target in self.rotate(targets, round_no):
                    spec = {**target.stream_spec(self.cal, events), "total": runs, "concurrency": concurrency,
                            "connect_limit": min(concurrency, 50)}
                    self.load(target, "growth", round_no, spec, concurrency=concurrency, target_events=events)

    def phase_approvals(self, pairs: list[tuple[str, S.Server, S.Server]], round_no: int, total: int) -> None:
        # Back to back (the goal's measurement), then isolated: each approval only once the run
        # approved before it has ended, which separates the approval path from A's other work.
        # LangGraph's runs start from its run queue, which it polls every 0.5 s: each approval takes
        # about a second, so it gets a tenth of the approvals, back to back only.
        runs = [(name, a, b, max(20, total // 10) if a is b else total, False)
                for name, a, b in self.rotate(pairs, round_no)]
        runs += [(f"{name} (isolated)", a, b, max(1, total // 3), True) for name, a, b in self.rotate(pairs, round_no)
                 if a is not b and name != FLOOR_WAKE_ONLY]
        for name, a, b, count, isolated in runs:
            kind = "aura" if name.startswith("aura") else "langgraph" if name.startswith("langgraph") else "floor"
            spec: dict[str, Any] = {"kind": kind, "a_port": a.port, "b_port": b.port,
                                    "total": count, "batch": self.mode.approval_batch, "isolated": isolated}
            if kind == "aura":
                spec.update(path=STREAM_PATH, body={"prompt": self.approval_prompt},
                            auth={"secret": S.SECRET, "tenant": S.TENANT, "users": 10**9})
            elif kind == "langgraph":
                spec.update(body=LANGGRAPH_APPROVAL_BODY)
            elif name.startswith(FLOOR_SAME_FRAMES):
                spec.update(body=self.approval_shape)
            stats0 = self.redis.stats()
            S.settle(a, b)
            a_mark, b_mark = S.cpu_mark(a), S.cpu_mark(b)
            result = self.client("approvals", **spec)
            S.settle(a, b)
            a_cpu, b_cpu = S.cpu_used(a, a_mark), S.cpu_used(b, b_mark)
            if a is b:  # one server both parks and resumes (LangGraph's in-memory runtime is one process)
                b_cpu = 0.0  # the same process's CPU, counted once
            redis_work = S.stats_delta(stats0, self.redis.stats())
            if kind == "langgraph":
                self.note_remote(a)
            lat = result["latency_ms"]
            row = {"phase": "approval", "round": round_no, "server": name, "approvals": result["approvals"],
                   "errors": result["errors"], "error_kinds": result["error_kinds"], "latency_ms": lat,
                   "post_ms": result["post_ms"], "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                   "post_p50_ms": pct(result["post_ms"], 50), "post_p99_ms": pct(result["post_ms"], 99),
                   # A parks the runs and finishes them after their decision; B only answers the POSTs.
                   "servers_cpu_s": a_cpu + b_cpu, "a_cpu_s": a_cpu, "b_cpu_s": b_cpu,
                   "client_cpu_s": result["client_cpu_s"],
                   "wall_s": result["wall_s"], **self._redis_row(redis_work, len(lat), "approval")}
            self.results["measurements"].append(row)
            log(f"approval r{round_no} {name}: {len(lat)} approvals, p50 {row['p50_ms'] or 0:.2f} ms, "
                f"p99 {row['p99_ms'] or 0:.2f} ms (POST answered p50 {row['post_p50_ms'] or 0:.2f} ms), "
                f"{result['errors']} errors, {result['wall_s']:.1f} s, "
                f"Redis {row['redis_commands_per_approval'] or 0:.1f} commands and "
                f"{row['redis_info_us_per_approval'] or 0:.0f} us CPU per approval")

    def measure_approval_shape(self, a: S.Server, b: S.Server, approvals: int = 5) -> None:
        """What Aura's approved run writes (events up to its `hitl`, then to its end, and their mean
        size), so that the floor's approval writes the same frames: its CPU per approval is then the
        same wire work without Aura's (the auth, the agent, the event log, the approval's records)."""
        result = self.client("approvals", kind="aura", a_port=a.port, b_port=b.port, total=approvals,
                             batch=approvals, isolated=True, path=STREAM_PATH, body={"prompt": self.approval_prompt},
                             auth={"secret": S.SECRET, "tenant": S.TENANT, "users": 10**9})
        if not result["approvals"] or not result["frames_all"]:
            raise RuntimeError(f"no approved run to measure: {result['error_kinds']}")
        before, total = int(result["frames_before"]), int(result["frames_all"])
        self.approval_shape = {"before": before, "after": total - before, "size": round(result["bytes_per_frame"])}
        self.results["approval_shape"] = self.approval_shape
        log(f"Aura's approved run: {before} events to its hitl, {total - before} after it, "
            f"{self.approval_shape['size']} bytes per event: the floor's approval writes as many")

    def phase_approval_commands(self, a: S.Server, b: S.Server, approvals: int = 20) -> None:
        """An approval's own Redis commands, apart from its run's: `approvals` isolated approvals
        watched with MONITOR (which slows Redis: nothing else is measured meanwhile). A command is
        the approval's when its key or channel is one of the contract's `hitl:*` or Aura's
        `aura:hitl:*`; a transaction (MULTI … EXEC) or script (EVALSHA) is, with every command in
        it, when it touches one; a script's own calls count, as in INFO commandstats."""
        import threading

        import redis

        seen: list[dict[str, Any]] = []
        monitor = redis.Redis(port=self.redis.port).monitor()  # type: ignore[no-untyped-call]
        stop = threading.Event()

        def read() -> None:
            with monitor as m:
                for entry in m.listen():
                    seen.append(entry)
                    if stop.is_set():
                        return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(0.3)
        result = self.client("approvals", kind="aura", a_port=a.port, b_port=b.port, total=approvals,
                             batch=approvals, isolated=True, path=STREAM_PATH, body={"prompt": self.approval_prompt},
                             auth={"secret": S.SECRET, "tenant": S.TENANT, "users": 10**9})
        time.sleep(0.5)  # the last UNSUBSCRIBE goes out after the run went on
        stop.set()
        self.redis.command("PING")  # one more line for the reader to see the flag
        reader.join(5)
        by_name, others = classify_approval_commands(seen)
        n = result["approvals"]
        row = {"phase": "approval_commands", "server": "aura", "approvals": n, "errors": result["errors"],
               "approval_commands_per_approval": sum(by_name.values()) / n if n else None,
               "approval_by_command": {k: v / n for k, v in by_name.items()} if n else {},
               "run_commands_per_approval": sum(others.values()) / n if n else None,
               "run_by_command": {k: v / n for k, v in others.items()} if n else {}}
        self.results["measurements"].append(row)
        log(f"an approval's own Redis commands: {row['approval_commands_per_approval'] or 0:.1f} "
            f"({row['approval_by_command']}); its run's: {row['run_commands_per_approval'] or 0:.1f}")

    def phase_follow(self, a: S.Server, b: S.Server, round_no: int) -> None:
        """Runs of 200 events on A, each read by its owner's stream on A and by a follower on B:
        Redis's commands and CPU per event delivered, owner and follower together (the owner-only
        figures are the cpu_per_event rows)."""
        for concurrency, runs in ((1, self.mode.throughput[1]), (100, self.mode.throughput[100])):
            spec = {**Target("aura", a, "aura").stream_spec(self.cal, 200), "a_port": a.port, "b_port": b.port,
                    "total": runs, "concurrency": concurrency}
            spec["body"] = spec.pop("bodies")[0]
            S.settle(a, b)
            stats0, a_mark, b_mark = self.redis.stats(), S.cpu_mark(a), S.cpu_mark(b)
            result = self.client("follow", **spec)
            S.settle(a, b)
            work = S.stats_delta(stats0, self.redis.stats())
            a_cpu, b_cpu = S.cpu_used(a, a_mark), S.cpu_used(b, b_mark)
            events = result["follower_events"]
            row = {"phase": "follow", "round": round_no, "server": "aura", "concurrency": concurrency,
                   "runs": result["ok"], "errors": result["errors"], "error_kinds": result["error_kinds"],
                   "incomplete": result["incomplete"], "owner_events": result["owner_events"], "events": events,
                   "a_cpu_s": a_cpu, "b_cpu_s": b_cpu, "wall_s": result["wall_s"],
                   "follower_us_per_event": b_cpu / events * 1e6 if events else None,
                   **self._redis_row(work, events, "event")}
            self.results["measurements"].append(row)
            log(f"follow r{round_no} c{concurrency}: {events} events on the follower, {result['errors']} errors, "
                f"B {row['follower_us_per_event'] or 0:.1f} us/event, Redis "
                f"{row['redis_commands_per_event'] or 0:.2f} commands, {row['redis_info_us_per_event'] or 0:.1f} us "
                f"per event (owner + follower)")

    def phase_embedded(self, real: S.Server) -> None:
        """Aura's embedded mode (no Redis URL: an in-process fakeredis, one instance, for development)
        against the same Aura on the real redis-server, interleaved, at the throughput phase's loads.
        The embedded process does Redis's work itself, so the report sets its CPU per event beside
        both Aura's own and Aura's plus redis-server's."""
        embedded = self._start(S.aura_server("aura-embedded", self.workdir, None))
        targets = [Target("aura", real, "aura"), Target("aura (embedded)", embedded, "aura")]
        self.warm(targets[1:])
        log("== embedded: Aura on its in-process fakeredis against Aura on redis-server")
        for round_no in range(self.mode.rounds):
            self.phase_throughput(targets, round_no, "embedded")
        embedded.stop()

    def phase_redis_rtt(self, round_no: int, n: int) -> None:
        result = self.client("redis_rtt", url=self.redis.url, n=n)
        lat = result["latency_ms"]
        row = {"phase": "redis_rtt", "round": round_no, "server": "redis-floor", "latency_ms": lat,
               "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "hiredis": result["hiredis"],
               "client_cpu_s": result["client_cpu_s"]}
        self.results["measurements"].append(row)
        log(f"redis floor r{round_no}: PUBLISH -> subscriber p50 {row['p50_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms "
            f"(hiredis={result['hiredis']})")

    def phase_parked(self, rounds: int = 1, against: str | None = None) -> None:
        """Fresh processes per level: N streams parked on an approval (Aura) or idle (floor),
        heartbeats on (5 s); errors, Redis connections and memory per parked stream. With
        `against`, Aura at that revision too (server `aura@REV`); with `rounds` > 1 each level is
        measured that many times, the servers' order rotating each round (LangGraph in the first)."""
        source = self.checkout(against) if against else None
        levels = list(self.mode.parked_levels)
        for round_no in range(rounds):
            for n in list(levels):
                broken = False
                kinds = self.rotate(["aura", "floor", *([f"aura@{against}"] if against else [])], round_no)
                # LangGraph up to 1,000 parked runs: each held stream polls every 20 ms, and parking one
                # waits for its run queue's poll
                if self.langgraph and n <= 1000 and round_no == 0:
                    kinds.append("langgraph")
                for kind in kinds:
                    row = self._park_level(kind, n, source if kind.startswith("aura@") else None)
                    row["round"] = round_no
                    self.results["measurements"].append(row)
                    # errors are recorded and the next level is still tried, unless most streams failed
                    broken = broken or row["errors_total"] > n // 2
                if broken:
                    log(f"parked: most streams failed at {n}; larger levels are not attempted")
                    del levels[levels.index(n):]
                    break

    def _park_level(self, kind: str, n: int, source: Path | None = None) -> dict[str, Any]:
        if kind.startswith("aura"):
            server = S.aura_server(f"{kind.replace('@', '-at-')}-park-{n}", self.workdir, self.redis.url, source=source)
            spec: dict[str, Any] = {"port": 0, "path": STREAM_PATH, "method": "POST", "until": "hitl",
                                    "body": {"prompt": PARK_PROMPT},
                                    "auth": {"secret": S.SECRET, "tenant": S.TENANT, "users": 10**9},
                                    "connect_limit": 50}
        elif kind == "langgraph":  # a thread stopped on interrupt(), its stream held open
            server = S.langgraph_server(self.workdir)
            spec = {"port": 0, "kind": "langgraph", "body": LANGGRAPH_APPROVAL_BODY, "connect_limit": 50}
        else:
            server = S.floor_server(f"floor-park-{n}", self.workdir)
            spec = {"port": 0, "path": "/idle", "method": "GET", "until": "ready", "connect_limit": 50}
        self._start(server)
        spec["port"] = server.port
        try:
            # warm the code paths (and the allocator) with a small batch first
            self.client("park", **{**spec, "n": 50})
            self.client("release")
            time.sleep(1.0)
            rss0, uss0 = server.rss(), server.uss()
            clients0 = self._redis_clients(server)
            mark = S.cpu_mark(server)
            park = self.client("park", **{**spec, "n": n})
            park_cpu = S.cpu_used(server, mark)
            time.sleep(1.0)
            rss1, uss1 = server.rss(), server.uss()
            clients1 = self._redis_clients(server)
            hold_mark, redis_mark, t0 = S.cpu_mark(server), S.cpu_mark(self.redis), time.perf_counter()
            time.sleep(self.mode.park_hold_s)
            hold_s = time.perf_counter() - t0
            hold_cpu, hold_redis = S.cpu_used(server, hold_mark), S.cpu_used(self.redis, redis_mark)
            rss2 = server.rss()
            if kind == "langgraph":
                self.note_remote(server)
            released = self.client("release")
        finally:
            time.sleep(0.5)
            server.stop()
        parked = park["parked"]
        row = {
            "phase": "parked", "server": kind, "n": n, "parked": parked, "park_failures": park["failures"],
            "failure_kinds": park["failure_kinds"], "ended_early": released["ended_early"],
            "unexpected_events": released["unexpected_events"], "hold_errors": released["errors"],
            "errors_total": park["failures"] + released["ended_early"] + released["errors"] + (n - parked),
            "heartbeats_min": released["heartbeats_min"], "hold_s": hold_s,
            "rss_before_mb": rss0 / 2**20, "rss_parked_mb": rss1 / 2**20, "rss_end_mb": rss2 / 2**20,
            "kib_per_stream_rss": (rss1 - rss0) / parked / 1024 if parked else None,
            "kib_per_stream_uss": (uss1 - uss0) / parked / 1024 if parked else None,
            "park_wall_s": park["wall_s"], "park_cpu_ms_per_stream": park_cpu / parked * 1000 if parked else None,
            "park_p99_ms": park["park_p99_ms"], "hold_cpu_pct": hold_cpu / hold_s * 100,
            "hold_redis_cpu_pct": hold_redis / hold_s * 100,
            "redis_clients_before": clients0, "redis_clients_parked": clients1,
            "unexpected_samples": released.get("unexpected_samples", []),
        }
        log(f"parked {kind} n={n}: {parked} parked, errors {row['errors_total']}, "
            f"{row['kib_per_stream_rss'] or 0:.1f} KiB/stream RSS, hold CPU {row['hold_cpu_pct']:.1f} %, "
            f"heartbeats min {row['heartbeats_min']}, redis clients {clients1}")
        return row

    def _redis_clients(self, server: S.Server) -> dict[str, int]:
        """The server's own connections to Redis, by client name (matched on its local ports)."""
        assert server.ps is not None
        ports = {f"127.0.0.1:{c.laddr.port}" for c in server.ps.net_connections(kind="tcp")
                 if c.raddr and c.raddr.port == self.redis.port}
        listing = self.redis.command("CLIENT", "LIST")
        lines = listing if isinstance(listing, list) else str(listing).splitlines()
        names: dict[str, int] = {"total": 0}
        for entry in lines:
            if isinstance(entry, dict):
                fields = entry
            else:
                fields = dict(part.split("=", 1) for part in str(entry).split() if "=" in part)
            if fields.get("addr") not in ports:
                continue  # another process's connection (or this very look-up)
            names["total"] += 1
            key = fields.get("name") or "(unnamed)"
            key = "signals (Pub/Sub)" if "signals" in key else key
            names[key] = names.get(key, 0) + 1
        return names


_APPROVAL_PREFIXES = ("hitl:", "aura:hitl:")


def _first_key(words: list[str]) -> str:
    name = words[0].upper()
    if name in ("EVALSHA", "EVAL", "FCALL"):
        return words[3] if len(words) > 3 and words[2] != "0" else ""
    return words[1] if len(words) > 1 else ""


def classify_approval_commands(entries: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, int]]:
    """MONITOR entries → (the approvals' commands by name, everything else's by name)."""
    approval: dict[str, int] = {}
    other: dict[str, int] = {}
    open_blocks: dict[str, list[str]] = {}  # client → its transaction so far
    script: list[str] = []  # the running script and its calls (scripts do not interleave)

    def count(names: list[str], keys: list[str]) -> None:
        target = approval if any(k.startswith(_APPROVAL_PREFIXES) for k in keys) else other
        for name in names:
            target[name] = target.get(name, 0) + 1

    script_keys: list[str] = []
    for entry in entries:
        words = str(entry.get("command", "")).split()
        if not words or words[0].upper() in ("INFO", "MONITOR", "PING", "CLIENT", "HELLO"):
            continue
        name, client = words[0].lower(), str(entry.get("client_address", ""))
        if entry.get("client_type") == "lua":
            script.append(name)
            script_keys.append(_first_key(words))
            continue
        if script:  # the script before this command has ended
            count(script, script_keys)
            script, script_keys = [], []
        if client in open_blocks:
            open_blocks[client].append(" ".join(words[:4]))
            if name in ("exec", "discard"):
                block = open_blocks.pop(client)
                count([b.split()[0].lower() for b in block], [_first_key(b.split()) for b in block])
            continue
        if name == "multi":
            open_blocks[client] = ["MULTI"]
            continue
        if name in ("evalsha", "eval"):
            script, script_keys = [name], [_first_key(words)]
            continue
        count([name], [_first_key(words)])
    if script:
        count(script, script_keys)
    return approval, other


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for package in ("quart", "hypercorn", "starlette", "sse-starlette", "uvicorn", "redis", "hiredis", "orjson",
                    "h11", "uvloop"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            versions[package] = None
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    memory_gib = round(psutil.virtual_memory().total / 2**30, 1)
    langgraph: dict[str, str] = {}
    lock = S.LANGGRAPH_APP / "uv.lock"
    if lock.exists():  # the versions `langgraph dev` runs with, from its lock
        import tomllib

        for package in tomllib.loads(lock.read_text())["package"]:
            if package["name"] in ("langgraph", "langgraph-api", "langgraph-cli", "langgraph-runtime-inmem"):
                langgraph[package["name"]] = package["version"]
    return {"host": platform.node(), "langgraph_packages": langgraph,
            "cpus": psutil.cpu_count(), "cpu_model": cpu_model, "memory_gib": memory_gib,
            "python": platform.python_version(), "kernel": platform.release(), "packages": versions,
            "redis_server": redis_version, "loadavg_start": list(psutil.getloadavg())}


def source_revision(revision: str | None = None) -> str | None:
    """The commit measured: `revision` resolved, or the checkout's HEAD with "+changes" when its
    tracked files other than bench/results differ from it (a result must say which code it
    measured; an earlier tool's result written in the same session is no change to the code)."""
    git = ["git", "-C", str(S.ROOT)]
    found = subprocess.run([*git, "rev-parse", "--short", revision or "HEAD"], capture_output=True, text=True)
    if found.returncode != 0:
        return None
    commit = found.stdout.strip()
    if revision is None and subprocess.run([*git, "diff", "--quiet", "HEAD", "--", ".", ":!bench/results"],
                                           capture_output=True).returncode:
        commit += "+changes"
    return commit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few minutes, for development")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--phases",
                        default="calibrate,redis,throughput,ttfe,approvals,follow,growth,options,embedded,parked",
                        help="comma-separated subset (calibrate is always run)")
    parser.add_argument("--parked-levels", help="comma-separated N, e.g. 1000,2000,5000,10000")
    parser.add_argument("--parked-rounds", type=int, default=1,
                        help="rounds of the parked phase (each level in each round, the servers' order rotating)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    parser.add_argument("--tag", default="", help="suffix of the result files' name")
    parser.add_argument("--against", metavar="REV",
                        help="also run Aura at git revision REV (a worktree) and compare it with the working "
                             "tree's Aura in the same run: CPU per event at 1 and 100 streams, 19-event runs, "
                             "time to first event (phase 'against'; the files get an against-<rev> tag); "
                             "with the throughput phase, also its loads beside the floor, same rounds "
                             "(rows 'aura@REV', each round's ratio to the floor)")
    parser.add_argument("--against-phases", default="streams",
                        help="what --against compares: 'streams' (the loads above), 'approvals' (a second pair "
                             "of instances at REV in the approvals phase, rows 'aura@REV'), 'parked' (Aura at REV "
                             "parked at each level beside Aura and the floor, rows 'aura@REV'), comma-separated")
    parser.add_argument("--no-langgraph", action="store_true",
                        help="leave LangGraph's Agent Server (`langgraph dev`) out of the baselines")
    parser.add_argument("--approval-run", choices=["full", "short"], default="full",
                        help="what the approvals phase's runs do after their decision: 'full' (the tool's "
                             "events, an answer of about 20 chunks, the end; the goal's measurement) or 'short' "
                             "(an answer in one chunk: how much A's work after a decision weighs)")
    args = parser.parse_args(argv)

    mode = MODES["quick" if args.quick else "full"]
    if args.rounds:
        mode.rounds = args.rounds
    if args.parked_levels:
        mode.parked_levels = [int(x) for x in args.parked_levels.split(",")]
    phases = set(args.phases.split(","))
    # a SIGTERM (from `timeout`, say) unwinds like Ctrl-C, so every server started is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    began = time.perf_counter()
    started_at = dt.datetime.now(dt.UTC)
    workdir = Path(tempfile.mkdtemp(prefix="aura-bench-"))
    langgraph: S.Server | None = None
    log(f"mode {mode.name}, {mode.rounds} rounds, logs in {workdir}")
    uvloop = S.uvloop_available()
    bench = Bench(mode, workdir, use_uvloop_client=uvloop, options=uvloop,
                  approval_prompt=SHORT_PARK_PROMPT if args.approval_run == "short" else PARK_PROMPT,
                  langgraph=not args.no_langgraph)
    if args.approval_run != "full":
        args.tag = "-".join(filter(None, [args.tag, f"approval-run-{args.approval_run}"]))
    if args.against and "streams" in args.against_phases.split(","):
        phases.add("against")
    if args.against:
        args.tag = "-".join(filter(None, [args.tag, "against-" + args.against.replace("/", "_").replace("~", "_")]))
    info = machine_info()
    info["open_files_limit"] = hard
    info["code"] = source_revision()
    if args.against:
        info["against_commit"] = source_revision(args.against)
    bench.results.update({"mode": asdict(mode), "machine": info, "started_at": started_at.isoformat(),
                          "approval_prompt": bench.approval_prompt,
                          "client_event_loop": "uvloop" if uvloop else "asyncio",
                          "command": ["python", "-m", "bench", *sys.argv[1:]]})
    try:
        aura_a = bench._start(S.aura_server("aura-a", workdir, bench.redis.url))
        aura_b = bench._start(S.aura_server("aura-b", workdir, bench.redis.url))
        peer = bench._start(S.peer_server(workdir))
        floor = bench._start(S.floor_server("floor", workdir, bench.redis.url))
        floor_b = bench._start(S.floor_server("floor-b", workdir, bench.redis.url))
        targets = [Target("aura", aura_a, "aura"), Target("peer", peer, "peer"), Target("floor", floor, "floor")]
        langgraph = bench._start(S.langgraph_server(workdir)) if bench.langgraph else None
        if langgraph is not None:
            targets.append(Target("langgraph", langgraph, "langgraph"))
        bench.calibrate(targets[0])
        bench.warm(targets)
        per_round_approvals = math.ceil(mode.approvals_total / mode.rounds)
        approval_pairs = [("aura", aura_a, aura_b), (FLOOR_SAME_FRAMES, floor, floor_b),
                          (FLOOR_WAKE_ONLY, floor, floor_b)]
        if langgraph is not None:  # one process parks and resumes: its in-memory runtime cannot be shared
            approval_pairs.append(("langgraph", langgraph, langgraph))
        other_pair: list[S.Server] = []
        if args.against and "approvals" in args.against_phases.split(",") and "approvals" in phases:
            source = bench.checkout(args.against)
            other_pair = [bench._start(S.aura_server(f"aura-against-{side}", workdir, bench.redis.url, source=source))
                          for side in ("a", "b")]
            approval_pairs.append((f"aura@{args.against}", other_pair[0], other_pair[1]))
        if "approvals" in phases:
            bench.measure_approval_shape(aura_a, aura_b)
            bench.phase_approval_commands(aura_a, aura_b)
        # Aura at REV beside the working tree's, in the throughput phase (against the floor, same
        # rounds) and in the `against` phase
        against = bench.against_target(args.against) if "against" in phases and args.against else None
        for round_no in range(mode.rounds):
            log(f"== round {round_no + 1} of {mode.rounds}")
            if "redis" in phases:
                bench.phase_redis_rtt(round_no, math.ceil(mode.redis_rtt_n / mode.rounds))
            if "throughput" in phases:
                bench.phase_throughput(targets + ([against] if against is not None else []), round_no)
            if "ttfe" in phases:
                bench.phase_ttfe(targets, round_no)
            if "approvals" in phases:
                bench.phase_approvals(approval_pairs, round_no, per_round_approvals)
            if "follow" in phases:
                bench.phase_follow(aura_a, aura_b, round_no)
            if "growth" in phases and round_no < mode.growth_rounds:
                bench.phase_growth(targets[:2], round_no)
        if against is not None:
            bench.phase_against(aura_a, against, args.against)
        if "options" in phases and bench.options:
            log("== options: plain asyncio instead of uvloop as the event loop of Aura and the peer")
            aura_aio = bench._start(S.aura_server("aura-asyncio", workdir, bench.redis.url, event_loop="asyncio"))
            peer_aio = bench._start(S.peer_server(workdir, event_loop="asyncio"))
            option_targets = [Target("aura (uvloop)", aura_a, "aura"), Target("aura (asyncio)", aura_aio, "aura"),
                              Target("peer (uvloop)", peer, "peer"), Target("peer (asyncio)", peer_aio, "peer")]
            bench.warm(option_targets[1:2] + option_targets[3:])
            for round_no in range(mode.rounds):
                for target in bench.rotate(option_targets, round_no):
                    spec = {**target.stream_spec(bench.cal, 200), "total": mode.options_runs, "concurrency": 100,
                            "connect_limit": 50}
                    bench.load(target, "options", round_no, spec, concurrency=100)
            aura_aio.stop()
            peer_aio.stop()
        if "embedded" in phases:
            bench.phase_embedded(aura_a)
        if "parked" in phases:
            log("== parked runs (the other servers are stopped first)")
            for server in (aura_a, aura_b, peer, floor, floor_b, *other_pair, *([langgraph] if langgraph else [])):
                server.stop()
            bench.phase_parked(args.parked_rounds,
                               args.against if args.against and "parked" in args.against_phases.split(",") else None)
    finally:
        bench.stop_all()
        bench.remove_checkouts()
    bench.results["duration_s"] = time.perf_counter() - began
    if langgraph is not None:
        bench.results["langgraph_remote_connections"] = bench.langgraph_remote
    bench.results["machine"]["loadavg_end"] = list(psutil.getloadavg())

    from bench.report import write_reports

    stamp = started_at.strftime("%Y-%m-%d") + (f"-{args.tag}" if args.tag else "") + \
        ("-quick" if mode.name == "quick" else "")
    paths = write_reports(bench.results, args.out, stamp)
    log(f"done in {bench.results['duration_s'] / 60:.1f} min: " + ", ".join(str(p) for p in paths))
    return 0
