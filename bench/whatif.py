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
    from domain.identity import resolve_principal

    original = factory.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)
        container = app.extensions["aura_container"]
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
                      f"(thresholds {gc.get_threshold()})", file=sys.stderr, flush=True)

    gc.callbacks.append(timed)
    atexit.register(report)


FIXES = {"blocking_pool": blocking_pool, "raw_approve": raw_approve, "gc_trace": gc_trace}


def main() -> int:
    for name in sys.argv[1].split(","):
        FIXES[name]()
    from app.cli import main as aura

    return aura(["serve"])


if __name__ == "__main__":
    sys.exit(main())
