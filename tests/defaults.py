"""The settings model's defaults, for tests that build domain objects and adapters by hand: their
values come from the one place a default is written (app/settings.py), through the same functions
the container uses (app/values.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from adapters.http.streams import StreamConfig
from adapters.models.openai_compatible import OpenAICompatibleConfig
from adapters.redis.approvals import RedisApprovalStore
from adapters.redis.client import RedisClient, create_redis
from adapters.redis.durability import ReplicaConfirmation
from adapters.redis.health import RedisHealthProbe
from adapters.redis.runs import RedisRunDirectory, RedisRunFollower
from adapters.system import SystemClock
from app import values
from app.settings import Settings

DEFAULTS = Settings.model_construct()  # the model's own defaults: no environment, no settings file

RUN_LIMITS = values.run_limits(DEFAULTS)
AGENT_LIMITS = values.agent_limits(DEFAULTS.agent)
GATE_SETTINGS = values.gate_settings(DEFAULTS.hitl)
TOKEN_BUDGETS = values.token_budgets(DEFAULTS.model)
TOOL_CALLS = values.tool_call_mode(DEFAULTS.model)
EVENT_LOG = {"max_length": DEFAULTS.events.max_length, "retention_seconds": DEFAULTS.events.retention_seconds,
             "active_ttl_seconds": DEFAULTS.events.active_ttl_seconds}
THREADS = DEFAULTS.threads.model_dump()
GIT_LIMITS = {"timeout_seconds": DEFAULTS.tools.timeout_seconds, "max_output_bytes": DEFAULTS.tools.max_output_bytes}
DWP_LIMITS = {"timeout_seconds": DEFAULTS.tools.dwp_timeout_seconds,
              "max_response_bytes": DEFAULTS.tools.max_output_bytes, "now": SystemClock().now}


def stream_config(**fields: Any) -> StreamConfig:
    return replace(values.stream_config(DEFAULTS, None), **fields)


def model_config(**fields: Any) -> OpenAICompatibleConfig:
    """An OpenAI-compatible adapter's config as the default settings make it, with `fields` on top."""
    return replace(values.model_config(DEFAULTS.model.model_copy(update={"base_url": "http://model.test/v1"})),
                   **fields)


def client_of(url: str, **options: Any) -> RedisClient:
    """A client of `url` with the default settings' pool, `options` on top."""
    pool = {"max_connections": DEFAULTS.redis.model_copy(update={"url": url}).pool_size,
            "pool_timeout_seconds": DEFAULTS.redis.pool_timeout_seconds}
    return create_redis(url, **(pool | options))


def run_directory(redis: RedisClient, confirmation: ReplicaConfirmation | None = None) -> RedisRunDirectory:
    """A run directory as the container builds it, over `redis`."""
    return RedisRunDirectory(redis, max_log_length=DEFAULTS.events.max_length, approvals=RedisApprovalStore(redis),
                             confirmation=confirmation, presence_seconds=DEFAULTS.runs.follower_presence_seconds)


def run_follower(redis: RedisClient, **fields: Any) -> RedisRunFollower:
    """A run follower as the container builds it, over `redis`, `fields` on top."""
    return RedisRunFollower(redis, **({"block_ms": DEFAULTS.events.follow_idle_ms, "page": DEFAULTS.events.follow_page,
                                       "reader_ttl_seconds": DEFAULTS.runs.follower_presence_seconds,
                                       "confirmation": None, "instance_id": "aura"} | fields))


def health_probe(redis: RedisClient, **fields: Any) -> RedisHealthProbe:
    """A health probe as the container builds it on one server, `fields` on top."""
    return RedisHealthProbe(redis, **({"timeout_seconds": DEFAULTS.redis.health_timeout_seconds,
                                       "required_replicas": 0} | fields))
