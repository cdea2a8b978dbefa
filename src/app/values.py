"""The value objects the domain and the adapters take, each built from its settings group in one
function. The settings model (app/settings.py) is the one place a default is written: these classes
have no defaults of their own, so a setting cannot be forgotten on the way in."""

from __future__ import annotations

from adapters.http.streams import StreamConfig, StreamSlots
from adapters.models.openai_compatible import OpenAICompatibleConfig
from app.settings import AgentSettings, HitlSettings, ModelSettings, Settings
from domain.model.telemetry import Telemetry
from domain.services.agent import AgentLimits, TokenBudgets, ToolCallMode
from domain.services.gate import GateSettings
from domain.services.runs import RunLimits


def run_limits(settings: Settings) -> RunLimits:
    return RunLimits(
        max_run_seconds=settings.agent.max_run_seconds,
        watcher_buffer=settings.stream.watcher_buffer,
        lease_seconds=settings.runs.lease_seconds,
        retention_seconds=settings.events.retention_seconds,
        max_runs_per_user=settings.runs.max_per_user,
        max_runs_per_tenant=settings.runs.max_per_tenant,
        disconnect_grace_seconds=settings.stream.disconnect_grace_seconds,
    )


def agent_limits(agent: AgentSettings) -> AgentLimits:
    return AgentLimits(max_steps=agent.max_steps, max_tool_calls=agent.max_tool_calls,
                       max_tool_calls_per_step=agent.max_tool_calls_per_step,
                       tool_timeout_seconds=agent.tool_timeout_seconds)


def token_budgets(model: ModelSettings) -> TokenBudgets:
    return TokenBudgets(plan=model.plan_max_tokens, step=model.step_max_tokens, answer=model.answer_max_tokens)


def tool_call_mode(model: ModelSettings) -> ToolCallMode:
    return ToolCallMode(model.tool_calls)


def gate_settings(hitl: HitlSettings) -> GateSettings:
    return GateSettings(timeout_seconds=hitl.timeout_seconds)


def stream_config(settings: Settings, metrics: Telemetry | None) -> StreamConfig:
    stream = settings.stream
    return StreamConfig(
        heartbeat_seconds=stream.heartbeat_seconds,
        max_context_bytes=stream.max_context_bytes,
        max_prompt_chars=stream.max_prompt_chars,
        on_disconnect=stream.on_disconnect,
        max_stream_seconds=stream.max_stream_seconds,
        reconnect_hint_ms=stream.reconnect_hint_ms,
        metrics=metrics,
        slots=StreamSlots(per_user=stream.max_per_user, per_run=stream.max_per_run),
    )


def model_config(model: ModelSettings) -> OpenAICompatibleConfig:
    if model.base_url is None:
        raise ValueError("AURA_MODEL__BASE_URL is required when AURA_MODEL__PROVIDER is 'openai'.")
    return OpenAICompatibleConfig(
        base_url=model.base_url,
        model=model.name,
        api_key=model.api_key.get_secret_value() if model.api_key else None,
        flavour=model.flavour,
        azure_deployment=model.azure_deployment,
        azure_api_version=model.azure_api_version,
        temperature=model.temperature,
        timeout_seconds=model.timeout_seconds,
        max_retries=model.max_retries,
        structured_output=model.structured_output,
        messages=model.messages,
    )
