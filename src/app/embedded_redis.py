"""The embedded mode's Redis: an in-process fakeredis server, chosen here at the composition root
(no adapter imports fakeredis). One `FakeServer` per client, so plain commands, Lua and Pub/Sub of
every connection the client opens share one keyspace, as on a real server."""

from __future__ import annotations

import fakeredis
from redis.asyncio import Redis

from adapters.redis.client import RESP_PROTOCOL


def embedded_redis() -> Redis:
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=False, protocol=RESP_PROTOCOL)
