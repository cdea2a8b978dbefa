"""Launch `aura serve` with one proposed fix applied in-process, to measure the fix before it is
made in Aura's code. Nothing here changes Aura's source; results of such runs carry a `whatif-` tag.

    python -m bench.whatif blocking_pool     # then the usual `aura serve` (env settings as usual)

Fixes:
- blocking_pool: the Redis client waits for a free pooled connection (BlockingConnectionPool, same
  100 connections, 20 s timeout) instead of raising MaxConnectionsError when all are busy.
- raw_approve: an upper bound, not a fix to adopt as it is: `POST /aura/hitl/approve/{id}` answered
  by a bare ASGI handler in front of Quart (the token verified, the desk's decision, the decided
  record as JSON; no request id, trace context, CORS, problem documents or metrics), to measure
  what a cheaper request path than Quart + hooks + wiring could give the approval latency.
- gc_trace: not a fix; every garbage collection's pause is timed and, at exit, a line per
  generation (count, median, longest, total) goes to the server's log (`GCTRACE ...`).
- gc700, gc5000: Python's default young-generation threshold (700), or 5,000, instead of Aura's
  50,000 (`AURA_SERVER__GC_THRESHOLD`): more frequent, shorter collections.
- gc_garbage: not a fix; every object a garbage collection finds unreachable (a reference cycle)
  is kept instead of freed and, at exit, counted by type into the server's log (`GARBAGE <count>
  <type>`): what the process leaves for the collector, and so what its pauses are made of.
- cpu_marks: not a fix; the process's CPU time at each run's milestones (parks on an approval,
  decided, `end`, stream written to its end, run closed) goes to the server's log
  (`CPUMARK <milestone> <cpu s> <wall s> <runId>`); `python -m bench.run_phases` reads them.
"""

from __future__ import annotations

import sys
from typing import Any


def blocking_pool() -> None:
    from redis.asyncio import BlockingConnectionPool, Redis

    import adapters.redis.client as client

    original = client.create_redis

    def create_redis(url: str | None, **kwargs: Any) -> Redis:
        redis = original(url, **kwargs)
        if url is None:
            return redis
        pool = redis.connection_pool
        blocking = BlockingConnectionPool(connection_class=pool.connection_class, max_connections=100, timeout=20,
                                          **pool.connection_kwargs)
        return Redis(connection_pool=blocking)

    client.create_redis = create_redis


def raw_approve() -> None:
    import orjson

    import app.factory as factory
    from domain.model.identity import resolve_principal

    original = factory.create_app

    def create_app(settings: Any, container: Any) -> Any:  # as `aura serve` calls it
        app = original(settings, container)
        quart_app: Any = app.asgi_app

        async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
            path = scope.get("path", "")
            if scope["type"] != "http" or scope["method"] != "POST" or not path.startswith("/aura/hitl/approve/"):
                await quart_app(scope, receive, send)
                return
            token = dict(scope["headers"])[b"authorization"].decode().partition(" ")[2]
            principal = resolve_principal(container.token_verifier().verify(token), tenant_header=None,
                                          user_header=None, trusted_service_roles=frozenset())
            while (await receive()).get("more_body"):
                pass
            decided = await container.approval_desk().decide(principal, path.rsplit("/", 1)[1], approve=True)
            body = orjson.dumps(decided.to_record())
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})

        app.asgi_app = asgi  # type: ignore[assignment]
        return app

    factory.create_app = create_app


def gc_trace() -> None:
    import atexit
    import gc
    import os
    import time

    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append((time.perf_counter() - started[0]) * 1000)

    def report() -> None:
        for generation, values in pauses.items():
            if values:
                values.sort()
                print(f"GCTRACE pid {os.getpid()} generation {generation}: {len(values)} collections, median "
                      f"{values[len(values) // 2]:.3f} ms, longest {values[-1]:.3f} ms, total {sum(values):.1f} ms "
                      f"(thresholds {gc.get_threshold()}); over 1 ms: "
                      + (" ".join(f"{v:.1f}" for v in values if v > 1) or "none"), file=sys.stderr, flush=True)

    gc.callbacks.append(timed)
    atexit.register(report)


def _gc_threshold(allocations: int) -> None:
    import os

    os.environ["AURA_SERVER__GC_THRESHOLD"] = str(allocations)


def gc700() -> None:
    _gc_threshold(700)


def gc5000() -> None:
    _gc_threshold(5000)


def gc_garbage() -> None:
    import atexit
    import gc
    from collections import Counter

    def kind(thing: object) -> str:
        name = type(thing).__qualname__
        if name in ("function", "method", "coroutine"):
            return f"{name} {getattr(thing, '__qualname__', '?')}"
        if name == "frame":
            return f"frame {thing.f_code.co_qualname}"  # type: ignore[attr-defined]
        return name

    def report() -> None:
        gc.collect()
        counts = Counter(kind(thing) for thing in gc.garbage)
        print(f"GARBAGE {len(gc.garbage)} in all", file=sys.stderr)
        for name, count in counts.most_common(60):
            print(f"GARBAGE {count} {name}", file=sys.stderr, flush=True)

    gc.set_debug(gc.DEBUG_SAVEALL)
    atexit.register(report)


def cpu_marks() -> None:
    import time

    from adapters.http.routes import stream as stream_route
    from domain.model import run
    from domain.services import gate
    from domain.services import runs as service

    def mark(milestone: str, run_id: str) -> None:
        print(f"CPUMARK {milestone} {time.process_time():.6f} {time.perf_counter():.6f} {run_id}",
              file=sys.stderr, flush=True)

    await_decision = gate.ApprovalGate.await_decision

    async def marked_await_decision(self: Any, waiting: Any, *args: Any, **kwargs: Any) -> Any:
        mark("parked", waiting.ids.run_id)
        decided = await await_decision(self, waiting, *args, **kwargs)
        mark("decided", waiting.ids.run_id)
        return decided

    end = run.Run.end

    async def marked_end(self: Any, *args: Any, **kwargs: Any) -> None:
        mark("end", self.ids.run_id)
        await end(self, *args, **kwargs)

    drive = service.RunService._drive

    async def marked_drive(self: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        try:
            await drive(self, handle, *args, **kwargs)
        finally:
            mark("closed", handle.run.ids.run_id)

    live_frames = stream_route.live_frames  # type: ignore[attr-defined]

    async def marked_live_frames(release: Any, watcher: Any, config: Any) -> Any:
        run_id = release._handle.run.ids.run_id
        async for chunk in live_frames(release, watcher, config):
            yield chunk
        mark("streamed", run_id)

    gate.ApprovalGate.await_decision = marked_await_decision  # type: ignore[method-assign, assignment]
    run.Run.end = marked_end  # type: ignore[method-assign]
    service.RunService._drive = marked_drive  # type: ignore[method-assign]
    stream_route.live_frames = marked_live_frames  # type: ignore[attr-defined]


FIXES = {"blocking_pool": blocking_pool, "raw_approve": raw_approve, "gc_trace": gc_trace, "gc_garbage": gc_garbage,
         "gc700": gc700, "gc5000": gc5000,
         "cpu_marks": cpu_marks}


def main() -> int:
    for name in sys.argv[1].split(","):
        FIXES[name]()
    from app.cli import main as aura

    return aura(["serve"])


if __name__ == "__main__":
    sys.exit(main())
