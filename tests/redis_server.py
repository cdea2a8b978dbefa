"""A real `redis-server` for tests, and a real Redis Cluster of such servers (tests/redis_nodes.py
starts them): a server or a cluster that cannot start fails the test with the reason.

Used by the integration tests (next to fakeredis) and by the end-to-end tests of several Aura
instances. A missing binary fails the run: these tests exist to prove Aura against the real thing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import pytest

from tests import redis_nodes
from tests.redis_nodes import (
    RedisCluster,
    RedisServer,
    _drain,
    flush_redis_cluster,
    free_port,
    stop_redis_cluster,
    stop_redis_server,
)

__all__ = ["RedisCluster", "RedisServer", "_drain", "flush_redis_cluster", "free_port", "restart_redis_server",
           "start_redis_cluster", "start_redis_server", "stop_redis_cluster", "stop_redis_server"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _failing_the_test(start: Callable[_P, _R]) -> Callable[_P, _R]:
    @functools.wraps(start)
    def started(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return start(*args, **kwargs)
        except redis_nodes.RedisStartError as error:
            pytest.fail(str(error), pytrace=False)

    return started


start_redis_server = _failing_the_test(redis_nodes.start_redis_server)
restart_redis_server = _failing_the_test(redis_nodes.restart_redis_server)
start_redis_cluster = _failing_the_test(redis_nodes.start_redis_cluster)
