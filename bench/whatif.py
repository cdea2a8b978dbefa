"""Launch `aura serve` with one proposed fix applied in-process, to measure the fix before it is
made in Aura's code. Nothing here changes Aura's source; results of such runs carry a `whatif-` tag.

    python -m bench.whatif blocking_pool     # then the usual `aura serve` (env settings as usual)

Fixes:
- blocking_pool: the Redis client waits for a free pooled connection (BlockingConnectionPool, same
  100 connections, 20 s timeout) instead of raising MaxConnectionsError when all are busy.
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


FIXES = {"blocking_pool": blocking_pool}


def main() -> int:
    for name in sys.argv[1].split(","):
        FIXES[name]()
    from app.cli import main as aura

    return aura(["serve"])


if __name__ == "__main__":
    sys.exit(main())
