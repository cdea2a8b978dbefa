"""Every default is written once, in the settings model: the value objects and constructors that
take a setting have no default of their own (a second copy drifts, and a caller that forgets the
setting silently gets it), and each value object carries the settings it is built from."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import pytest

from adapters.http.streams import StreamConfig, StreamSlots
from adapters.jwt import JoseTokenVerifier
from adapters.models.openai_compatible import OpenAICompatibleChatModel, OpenAICompatibleConfig
from adapters.models.profile import ServerModelProfile
from adapters.redis.conversations import RedisConversationStore
from adapters.redis.events import RedisEventLog
from adapters.redis.limits import RedisStartRateLimiter
from adapters.redis.runs import RedisRunDirectory
from adapters.tools.dwp import DwpRequestTool, dwp_tools
from adapters.tools.git import git_tools
from app import values
from app.settings import Settings
from domain.services.access import RunAccess
from domain.services.agent import Agent, AgentLimits, TokenBudgets
from domain.services.gate import ApprovalGate, GateSettings
from domain.services.runs import RunLimits, RunService

VALUE_OBJECTS = [RunLimits, AgentLimits, TokenBudgets, GateSettings, StreamConfig]

TAKES_A_SETTING: list[tuple[Callable[..., Any], list[str]]] = [
    (RedisEventLog, ["max_length", "retention_seconds"]),
    (RedisRunDirectory, ["max_log_length"]),
    (RedisConversationStore, ["ttl_seconds", "max_turns", "max_turn_bytes", "max_user_bytes"]),
    (RedisStartRateLimiter, ["limit", "window_seconds"]),
    (JoseTokenVerifier, ["leeway_seconds", "max_token_age_seconds", "verified_cache_size"]),
    (git_tools, ["timeout_seconds", "max_output_bytes"]),
    (dwp_tools, ["timeout_seconds", "max_response_bytes"]),
    (DwpRequestTool, ["timeout_seconds", "max_response_bytes"]),
    (ServerModelProfile, ["context_window", "default_context_window", "tokenizer"]),
    (StreamSlots, ["per_user", "per_run"]),
    (RunAccess, ["retention_seconds"]),
]

TAKES_ITS_DEPENDENCIES: list[tuple[Callable[..., Any], list[str]]] = [
    (Agent, ["telemetry", "profile", "budgets", "tool_calls"]),
    (ApprovalGate, ["telemetry", "recheck"]),
    (RunService, ["telemetry"]),
    (JoseTokenVerifier, ["clock"]),
    (OpenAICompatibleChatModel, ["client"]),
    (RedisStartRateLimiter, ["now"]),
    (DwpRequestTool, ["now"]),
    (dwp_tools, ["now"]),
]


@pytest.mark.parametrize("value_object", VALUE_OBJECTS, ids=lambda cls: cls.__name__)
def test_value_objects_built_from_settings_have_no_defaults(value_object: type) -> None:
    defaulted = [f.name for f in dataclasses.fields(value_object)
                 if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert defaulted == []


def test_the_model_adapters_config_has_no_default_for_a_setting() -> None:
    from_settings = {"api_key", "flavour", "azure_deployment", "azure_api_version", "temperature",
                     "timeout_seconds", "max_retries", "structured_output", "messages"}
    defaulted = {f.name for f in dataclasses.fields(OpenAICompatibleConfig)
                 if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    assert defaulted & from_settings == set()


@pytest.mark.parametrize(("target", "names"), TAKES_A_SETTING + TAKES_ITS_DEPENDENCIES,
                         ids=[f"{target.__qualname__}({', '.join(names)})"
                              for target, names in TAKES_A_SETTING + TAKES_ITS_DEPENDENCIES])
def test_constructors_take_settings_and_dependencies_without_defaults(target: Callable[..., Any],
                                                                      names: list[str]) -> None:
    parameters = inspect.signature(target).parameters
    assert {name: parameters[name].default for name in names
            if parameters[name].default is not inspect.Parameter.empty} == {}


def test_each_value_object_carries_the_settings_it_is_built_from() -> None:
    settings = Settings(
        agent={"max_steps": 3, "max_tool_calls": 5, "max_tool_calls_per_step": 2, "max_run_seconds": 61.0,
               "tool_timeout_seconds": 7.0},
        stream={"watcher_buffer": 100, "disconnect_grace_seconds": 4.0, "heartbeat_seconds": 9.0,
                "max_context_bytes": 1000, "max_prompt_chars": 900, "on_disconnect": "continue",
                "max_stream_seconds": 120.0, "reconnect_hint_ms": 250, "max_per_user": 8, "max_per_run": 3},
        runs={"lease_seconds": 6.0, "max_per_user": 4, "max_per_tenant": 40},
        events={"retention_seconds": 900},
        hitl={"timeout_seconds": 42.0},
        model={"plan_max_tokens": 100, "step_max_tokens": 50, "answer_max_tokens": 200, "tool_calls": "planned"},
    )

    assert values.run_limits(settings) == RunLimits(
        max_run_seconds=61.0, watcher_buffer=100, lease_seconds=6.0, retention_seconds=900, max_runs_per_user=4,
        max_runs_per_tenant=40, disconnect_grace_seconds=4.0)
    assert values.agent_limits(settings.agent) == AgentLimits(
        max_steps=3, max_tool_calls=5, max_tool_calls_per_step=2, tool_timeout_seconds=7.0)
    assert values.token_budgets(settings.model) == TokenBudgets(plan=100, step=50, answer=200)
    assert values.tool_call_mode(settings.model).value == "planned"
    assert values.gate_settings(settings.hitl) == GateSettings(timeout_seconds=42.0)
    stream = values.stream_config(settings, None)
    assert (stream.heartbeat_seconds, stream.max_context_bytes, stream.max_prompt_chars, stream.on_disconnect,
            stream.max_stream_seconds, stream.reconnect_hint_ms, stream.slots.per_user, stream.slots.per_run) == (
        9.0, 1000, 900, "continue", 120.0, 250, 8, 3)
