"""What a parked run holds: Aura served in this process, N runs parked on an approval, memory by
allocation site and by object type.

    python -m bench.memory [--n 2000] [--target aura|floor] [--no-trace] [--top 40] [--frames 1]

Starts a real `redis-server` on a free port (stopped at the end, by pid), serves Aura (or the bare
Quart floor of `bench/apps/floor.py`) with hypercorn *in this process*, and drives it from the
bench's load generator (`bench/client.py`, a separate process, so the client's memory is not
counted). Aura gets the settings the bench gives it (`bench/servers.py:aura_server`) and its
production start-up (gc threshold, `gc.freeze`). After a warm-up batch it parks `--n` streams
(Aura: the bench's `@git_commit` prompt, waiting for approval; floor: `/idle`) and reports, per
parked stream:

- RSS growth, before and after a full `gc.collect()` (what uncollected garbage accounts for);
- with tracemalloc (unless `--no-trace`): Python heap growth by allocation site (file:line, or the
  innermost `--frames` frames), so Aura's own sites can be told from hypercorn's, h11's, asyncio's;
- live objects by type (`gc.get_objects()`, before/after) with their `sys.getsizeof` bytes.

tracemalloc slows the process and raises its RSS; take RSS figures from a `--no-trace` run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import signal
import sys
import tempfile
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from bench import servers as S
from bench.run import PARK_PROMPT, STREAM_PATH, Client


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _types() -> tuple[Counter[str], Counter[str]]:
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        module = getattr(type(obj), "__module__", "")
        key = f"{module}.{name}" if module not in ("builtins", None) else name
        counts[key] += 1
        try:
            sizes[key] += sys.getsizeof(obj)
        except TypeError:
            pass
    return counts, sizes


def _aura_app(redis_url: str, workdir: Path) -> tuple[Any, Any]:
    workspace = workdir / "workspace"
    workspace.mkdir(exist_ok=True)
    os.environ.update({
        "AURA_AUTH__JWT_SECRET": S.SECRET, "AURA_REDIS__URL": redis_url,
        "AURA_TOOLS__WORKSPACE_ROOT": str(workspace),
        "AURA_RUNS__MAX_PER_USER": "1000000", "AURA_RUNS__MAX_PER_TENANT": "1000000",
        "AURA_STREAM__MAX_PER_USER": "1000000",
        "AURA_RUNS__INSTANCE_ID": "memory", "AURA_HITL__TIMEOUT_SECONDS": "1800",
        "AURA_HITL__SEAL_KEY": S.SEAL_KEY,
        "AURA_STREAM__HEARTBEAT_SECONDS": "5", "AURA_EVENTS__RETENTION_SECONDS": "60",
        "AURA_LOG__LEVEL": "WARNING",
    })
    from app.container import Container
    from app.factory import create_app
    from app.logging_setup import configure_logging
    from app.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log.level, settings.log.format)
    if settings.server.gc_threshold:
        _, middle, oldest = gc.get_threshold()
        gc.set_threshold(settings.server.gc_threshold, max(middle, 20), max(oldest, 100))
    container = Container(settings=settings)
    return create_app(settings, container), container


def _floor_app() -> Any:
    from bench.apps.floor import app

    return app


async def _serve(app: Any, port: int, stop: asyncio.Event) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.keep_alive_timeout = 75
    await serve(app, config, shutdown_trigger=stop.wait)


def _site_table(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int, top: int,
                key: str) -> list[dict[str, Any]]:
    stats = after.compare_to(before, key)
    rows = []
    for stat in stats[:top]:
        frames = " <- ".join(f"{_short(f.filename)}:{f.lineno}" for f in stat.traceback)
        rows.append({"site": frames, "bytes_per_run": stat.size_diff / n, "blocks_per_run": stat.count_diff / n})
    return rows


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/lib/python3.11/", "/src/", "/bench/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _by_own_site(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int,
                 top: int) -> list[dict[str, Any]]:
    """Each allocation charged to the innermost frame of Aura's own code (src/) on its stack, or to
    "(not under Aura's code)": what Aura's code causes, wherever the allocator was called."""
    totals: Counter[str] = Counter()
    blocks: Counter[str] = Counter()
    for stat in after.compare_to(before, "traceback"):
        site = "(not under Aura's code)"
        for frame in reversed(stat.traceback):  # innermost first
            if "/src/" in frame.filename:
                site = f"{_short(frame.filename)}:{frame.lineno}"
                break
        totals[site] += stat.size_diff
        blocks[site] += stat.count_diff
    return [{"site": site, "bytes_per_run": size / n, "blocks_per_run": blocks[site] / n}
            for site, size in totals.most_common(top)]


def _by_package(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int) -> list[tuple[str, float]]:
    totals: Counter[str] = Counter()
    for stat in after.compare_to(before, "filename"):
        name = _short(stat.traceback[0].filename)
        package = name.split("/", 1)[0] if "/" in name else name
        totals[package] += stat.size_diff
    return [(pkg, size / n) for pkg, size in totals.most_common()]


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="aura-memory-"))
    redis = S.redis_server(workdir).start()
    client = Client(workdir, S.uvloop_available())
    stop = asyncio.Event()
    port = S.free_port()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGTERM cancels the run: its `finally` stops the servers and the load generator it started
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    server: asyncio.Task[None] | None = None
    try:
        app, container = _aura_app(redis.url, workdir) if args.target == "aura" else (_floor_app(), None)
        gc.collect()
        gc.freeze()
        server = asyncio.create_task(_serve(app, port, stop))
        for _ in range(200):
            await asyncio.sleep(0.05)
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                continue
        if args.target == "aura":
            spec: dict[str, Any] = {"port": port, "path": STREAM_PATH, "method": "POST", "until": "hitl",
                                    "body": {"prompt": PARK_PROMPT},
                                    "auth": {"secret": S.SECRET, "tenant": S.TENANT, "users": 10**9},
                                    "connect_limit": 50}
        else:
            spec = {"port": port, "path": "/idle", "method": "GET", "until": "ready", "connect_limit": 50}

        async def call(cmd: str, **more: Any) -> dict[str, Any]:
            return await loop.run_in_executor(None, lambda: client(cmd, **more))

        await call("park", **{**spec, "n": 50})  # warm the code paths and the allocator
        await call("release")
        await asyncio.sleep(1.0)
        if args.trace:
            tracemalloc.start(args.frames)
        gc.collect()
        rss0 = _rss()
        types0 = _types() if args.types else None
        snap0 = tracemalloc.take_snapshot() if args.trace else None
        park = await call("park", **{**spec, "n": args.n})
        parked = int(park["parked"])
        await asyncio.sleep(1.0)
        rss1 = _rss()
        gc.collect()
        await asyncio.sleep(0.2)
        rss1c = _rss()
        snap1 = tracemalloc.take_snapshot() if args.trace else None
        types1 = _types() if args.types else None
        result: dict[str, Any] = {
            "target": args.target, "n": args.n, "parked": parked, "failures": park["failures"],
            "failure_kinds": park.get("failure_kinds"),
            "rss_kib_per_run": (rss1 - rss0) / max(parked, 1) / 1024,
            "rss_kib_per_run_after_collect": (rss1c - rss0) / max(parked, 1) / 1024,
        }
        if snap0 is not None and snap1 is not None:
            traced = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
            result["traced_kib_per_run"] = traced / max(parked, 1) / 1024
            result["by_package"] = _by_package(snap0, snap1, max(parked, 1))
            if args.frames > 1:
                result["own_sites"] = _by_own_site(snap0, snap1, max(parked, 1), args.top)
            result["sites"] = _site_table(snap0, snap1, max(parked, 1), args.top,
                                          "traceback" if args.frames > 1 else "lineno")
        if types0 is not None and types1 is not None:
            counts0, sizes0 = types0
            counts1, sizes1 = types1
            diff = [(name, (counts1[name] - counts0[name]) / max(parked, 1),
                     (sizes1[name] - sizes0[name]) / max(parked, 1)) for name in counts1]
            diff.sort(key=lambda row: -row[2])
            result["types"] = [{"type": name, "objects_per_run": c, "getsizeof_bytes_per_run": b}
                               for name, c, b in diff[:args.top] if c > 0]
        if args.inspect:
            _inspect(parked)
        await call("release")
        if container is not None:  # Aura's: let the released runs end while Redis is still there
            runs = container.run_service()
            for _ in range(200):
                if not runs.active():
                    break
                await asyncio.sleep(0.05)
        return result
    finally:
        stop.set()
        if server is not None:
            await asyncio.wait([server], timeout=20)
        client.stop()
        redis.stop()


def _inspect(parked: int) -> None:
    """Where a parked run's objects are: its tasks by coroutine, one task chain of each kind, the
    live events by type and what refers to them."""
    from domain.model.events import Event

    tasks = asyncio.all_tasks()
    kinds: Counter[str] = Counter(t.get_coro().__qualname__ for t in tasks)  # type: ignore[union-attr]
    print("\ntasks per parked run, by coroutine:")
    for name, count in kinds.most_common():
        print(f"  {count / parked:6.2f}  {name}")
    shown: set[str] = set()
    for task in tasks:
        name = task.get_coro().__qualname__  # type: ignore[union-attr]
        if name in shown or kinds[name] < parked // 2:
            continue
        shown.add(name)
        print(f"\nstack of a {name} task:")
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            code = frame.f_code if frame is not None else None
            print(f"  {type(coro).__name__} {getattr(coro, '__qualname__', '?')}"
                  + (f" ({_short(code.co_filename)}:{frame.f_lineno})" if frame is not None and code else "")
                  + (f" locals: {sorted(frame.f_locals)}" if frame is not None else ""))
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    events = [o for o in gc.get_objects() if isinstance(o, Event)]
    by_type: Counter[str] = Counter(e.type.value for e in events)
    print(f"\nlive events per parked run: {len(events) / parked:.2f} {dict(by_type)}")
    referrers: Counter[str] = Counter()
    for event in events[:20]:
        for ref in gc.get_referrers(event):
            if ref is events:
                continue
            what = type(ref).__name__
            if what == "frame":
                what = f"frame {ref.f_code.co_qualname}"
            elif what == "list":
                what = "list " + ",".join(type(r).__name__ + (f" {r.f_code.co_qualname}" if type(r).__name__ == "frame"
                                                               else "")
                                          for r in gc.get_referrers(ref) if r is not events)[:200]
            referrers[what] += 1
    print("what refers to them (sample of 20):")
    for what, count in referrers.most_common(15):
        print(f"  {count:4d}  {what}")


def _print(result: dict[str, Any]) -> None:
    print(f"{result['target']}: {result['parked']} of {result['n']} parked, {result['failures']} failures "
          f"{result.get('failure_kinds') or ''}")
    print(f"RSS per parked run: {result['rss_kib_per_run']:.1f} KiB "
          f"({result['rss_kib_per_run_after_collect']:.1f} KiB after gc.collect())")
    if "traced_kib_per_run" in result:
        print(f"Python heap (tracemalloc) per parked run: {result['traced_kib_per_run']:.1f} KiB")
        print("\nby package/file group (bytes per run):")
        for package, size in result["by_package"][:15]:
            print(f"  {size:10.0f}  {package}")
        if "own_sites" in result:
            print("\ncharged to the innermost frame of Aura's code (bytes, blocks per run):")
            for row in result["own_sites"]:
                print(f"  {row['bytes_per_run']:10.0f} {row['blocks_per_run']:7.2f}  {row['site']}")
        print("\nby allocation site (bytes, blocks per run):")
        for row in result["sites"]:
            print(f"  {row['bytes_per_run']:10.0f} {row['blocks_per_run']:7.2f}  {row['site']}")
    if "types" in result:
        print("\nlive objects by type (objects, getsizeof bytes per run):")
        for row in result["types"]:
            print(f"  {row['getsizeof_bytes_per_run']:10.0f} {row['objects_per_run']:7.2f}  {row['type']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--target", choices=("aura", "floor"), default="aura")
    parser.add_argument("--no-trace", dest="trace", action="store_false")
    parser.add_argument("--no-types", dest="types", action="store_false")
    parser.add_argument("--frames", type=int, default=1, help="traceback depth per allocation site")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--asyncio", action="store_true", help="plain asyncio instead of uvloop")
    parser.add_argument("--inspect", action="store_true", help="print tasks, stacks and live events")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop_factory = None
    if not args.asyncio and S.uvloop_available():
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(_main(args))
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
