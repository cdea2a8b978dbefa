"""The dependency-injector container: which adapter serves each port, built from Settings."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import httpx
from dependency_injector import containers, providers

from adapters.http.auth import RequestAuthenticator
from adapters.http.routes.console import ConsoleConfig
from adapters.http.streams import StreamConfig, StreamSlots
from adapters.jwt import JoseTokenVerifier, mint_token
from adapters.metrics.prometheus import PrometheusMetrics
from adapters.models.openai_compatible import OpenAICompatibleChatModel, OpenAICompatibleConfig
from adapters.models.profile import ServerModelProfile
from adapters.offline import OfflineChatModel
from adapters.redis.approvals import RedisApprovalStore
from adapters.redis.client import RedisClient, create_redis
from adapters.redis.conversations import RedisConversationStore
from adapters.redis.events import RedisEventLog
from adapters.redis.health import RedisHealthProbe
from adapters.redis.limits import RedisStartRateLimiter
from adapters.redis.runs import RedisRunControl, RedisRunDirectory, RedisRunFollower
from adapters.redis.signals import RedisSignalBus
from adapters.system import SecureIdFactory, SystemClock
from adapters.tools.dwp import dwp_tools
from adapters.tools.git import git_tools
from adapters.tools.workspace import Workspace
from app.embedded_redis import embedded_redis
from app.settings import Settings
from domain.model.approval import DecisionSeal
from domain.model.chat import EstimatedModelProfile, ModelProfile
from domain.model.ports import ChatModel, Clock
from domain.model.tools import ToolRegistry
from domain.services.access import RunAccess
from domain.services.agent import Agent, AgentLimits, TokenBudgets, ToolCallMode
from domain.services.desk import ApprovalDesk
from domain.services.gate import ApprovalGate, GateSettings
from domain.services.recheck import ApprovalRecheck
from domain.services.runs import RunLimits, RunService


def _token_verifier(settings: Settings, clock: Clock) -> JoseTokenVerifier:
    auth = settings.auth
    public_key = Path(auth.public_key_file).read_text() if auth.public_key_file else None
    return JoseTokenVerifier(
        algorithms=[auth.algorithm],
        secret=auth.jwt_secret.get_secret_value() if auth.jwt_secret else None,
        public_key=public_key if auth.algorithm.startswith("RS") else None,
        issuer=auth.issuer or None,
        audience=auth.audience or None,
        leeway_seconds=auth.leeway_seconds,
        max_token_age_seconds=auth.max_token_age_seconds,
        key_id=auth.key_id or None,
        allow_short_secret=auth.dev_mode,
        clock=clock,
    )


def _tool_registry(settings: Settings) -> ToolRegistry:
    tools = settings.tools
    workspace = Workspace(Path(tools.workspace_root))
    return ToolRegistry(
        [
            *git_tools(workspace, timeout_seconds=tools.timeout_seconds, max_output_bytes=tools.max_output_bytes),
            *dwp_tools(tools.dwp_base_url, timeout_seconds=tools.dwp_timeout_seconds,
                       max_response_bytes=tools.max_output_bytes),
        ],
        approval_overrides=tools.approval_overrides,
    )


def _console_config(settings: Settings) -> ConsoleConfig:
    """The console mints dev tokens only in dev mode, and only with an HS* secret to sign them (the
    settings give dev mode a throw-away one); never with a role that acts for or decides for others."""
    auth = settings.auth
    withheld = frozenset(auth.trusted_service_roles) | frozenset(settings.hitl.approver_roles)
    if not auth.dev_mode or auth.jwt_secret is None or not auth.algorithm.startswith("HS"):
        return ConsoleConfig(dev_mode=auth.dev_mode, mint_dev_token=None, withheld_roles=withheld)
    secret = auth.jwt_secret.get_secret_value()

    def mint(user: str, tenant: str, role: str | None) -> str:
        return mint_token(key=secret, algorithm=auth.algorithm, sub=user, tenant_id=tenant, role=role,
                          ttl_seconds=3600, issuer=auth.issuer or None, audience=auth.audience or None,
                          key_id=auth.key_id or None)

    return ConsoleConfig(dev_mode=True, mint_dev_token=mint, withheld_roles=withheld)


def _instance_id(settings: Settings) -> str:
    return settings.runs.instance_id or f"{socket.gethostname()}-{secrets.token_hex(4)}"


OFFLINE_CONTEXT_WINDOW = 10_000_000


def _redis(settings: Settings) -> RedisClient:
    """The Redis of `redis.url` (one server or a cluster, by its scheme); without a URL, the
    embedded mode's in-process Redis."""
    if settings.redis.url is None:
        return embedded_redis()
    return create_redis(settings.redis.url, max_connections=settings.redis.max_connections,
                        pool_timeout_seconds=settings.redis.pool_timeout_seconds)


def _model_config(settings: Settings) -> OpenAICompatibleConfig:
    model = settings.model
    assert model.base_url is not None  # enforced by Settings
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


def _chat_model(settings: Settings) -> ChatModel:
    if settings.model.provider == "offline":
        return OfflineChatModel()
    return OpenAICompatibleChatModel(_model_config(settings))


def _model_profile(settings: Settings) -> ModelProfile:
    model = settings.model
    if model.provider == "offline":
        # the offline model reads no prompt: a window only limits it where one is configured
        return EstimatedModelProfile(model.context_window or OFFLINE_CONTEXT_WINDOW)
    return ServerModelProfile(_model_config(settings), httpx.AsyncClient(), context_window=model.context_window,
                              default_context_window=model.default_context_window, tokenizer=model.tokenizer)


def _decision_seal(settings: Settings) -> DecisionSeal:
    key = settings.hitl.seal_key
    # Without a shared key each process seals for itself: its own API decisions skip the second
    # record, and other instances' signals are recorded as the DWP backend's are (still correct).
    return DecisionSeal(key.get_secret_value().encode("utf-8") if key else secrets.token_bytes(32))


class Container(containers.DeclarativeContainer):
    settings = providers.Dependency(instance_of=Settings)

    clock = providers.Singleton(SystemClock)
    metrics_require_auth = providers.Callable(lambda settings: settings.server.metrics_require_auth, settings)
    instance_id = providers.Singleton(_instance_id, settings)
    ids = providers.Singleton(SecureIdFactory)

    redis = providers.Singleton(_redis, settings)
    approval_store = providers.Singleton(RedisApprovalStore, redis)
    signal_bus = providers.Singleton(RedisSignalBus, redis)
    event_log = providers.Singleton(
        RedisEventLog, redis,
        max_length=settings.provided.events.max_length,
        retention_seconds=settings.provided.events.retention_seconds,
        owner=instance_id,
    )
    health_probe = providers.Singleton(RedisHealthProbe, redis)
    run_directory = providers.Singleton(RedisRunDirectory, redis,
                                        max_log_length=settings.provided.events.max_length,
                                        approvals=approval_store)
    conversations = providers.Singleton(RedisConversationStore, redis,
                                        ttl_seconds=settings.provided.threads.ttl_seconds,
                                        max_turns=settings.provided.threads.max_turns,
                                        max_turn_bytes=settings.provided.threads.max_turn_bytes,
                                        max_user_bytes=settings.provided.threads.max_user_bytes)
    start_limiter = providers.Singleton(RedisStartRateLimiter, redis,
                                        limit=settings.provided.runs.max_starts_per_window,
                                        window_seconds=settings.provided.runs.start_window_seconds)
    run_follower = providers.Singleton(RedisRunFollower, redis)
    run_control = providers.Singleton(RedisRunControl, redis, instance_id)

    token_verifier = providers.Singleton(_token_verifier, settings, clock)
    authenticator = providers.Singleton(RequestAuthenticator, token_verifier,
                                        settings.provided.auth.trusted_service_roles)

    tools = providers.Singleton(_tool_registry, settings)
    metrics = providers.Singleton(PrometheusMetrics, tool_names=providers.Callable(ToolRegistry.names, tools))
    model = providers.Singleton(_chat_model, settings)
    model_profile = providers.Singleton(_model_profile, settings)

    # The key that tells this process's waiting runs which signals Aura's API already stored.
    decision_seal = providers.Singleton(_decision_seal, settings)
    # One re-check of every waiting run's request per interval for the whole process.
    approval_recheck = providers.Singleton(ApprovalRecheck, approval_store, clock,
                                           settings.provided.hitl.recheck_seconds)
    gate = providers.Singleton(
        ApprovalGate, approval_store, signal_bus, clock, ids,
        providers.Factory(GateSettings, timeout_seconds=settings.provided.hitl.timeout_seconds,
                          recheck_seconds=settings.provided.hitl.recheck_seconds),
        metrics,
        recheck=approval_recheck,
        seal=decision_seal,
    )
    approval_desk = providers.Singleton(ApprovalDesk, approval_store, signal_bus, clock,
                                        settings.provided.hitl.approver_roles, decision_seal)
    agent = providers.Singleton(
        Agent, model, tools, gate,
        providers.Factory(
            AgentLimits,
            max_steps=settings.provided.agent.max_steps,
            max_tool_calls=settings.provided.agent.max_tool_calls,
            max_tool_calls_per_step=settings.provided.agent.max_tool_calls_per_step,
            tool_timeout_seconds=settings.provided.agent.tool_timeout_seconds,
        ),
        metrics,
        profile=model_profile,
        budgets=providers.Factory(TokenBudgets, plan=settings.provided.model.plan_max_tokens,
                                  step=settings.provided.model.step_max_tokens,
                                  answer=settings.provided.model.answer_max_tokens),
        tool_calls=providers.Factory(ToolCallMode, settings.provided.model.tool_calls),
    )
    run_service = providers.Singleton(
        RunService, agent, clock, ids, event_log, run_directory,
        providers.Factory(RunLimits, max_run_seconds=settings.provided.agent.max_run_seconds,
                          watcher_buffer=settings.provided.stream.watcher_buffer,
                          lease_seconds=settings.provided.runs.lease_seconds,
                          retention_seconds=settings.provided.events.retention_seconds,
                          max_runs_per_user=settings.provided.runs.max_per_user,
                          max_runs_per_tenant=settings.provided.runs.max_per_tenant,
                          disconnect_grace_seconds=settings.provided.stream.disconnect_grace_seconds),
        instance_id,
        conversations,
        metrics,
        start_limiter,
    )
    run_access = providers.Singleton(RunAccess, run_service, run_directory, event_log, run_follower, run_control,
                                     clock,
                                     conversations=conversations, approvals=approval_store,
                                     retention_seconds=settings.provided.events.retention_seconds)
    console_config = providers.Singleton(_console_config, settings)
    stream_config = providers.Singleton(
        StreamConfig,
        heartbeat_seconds=settings.provided.stream.heartbeat_seconds,
        max_context_bytes=settings.provided.stream.max_context_bytes,
        max_prompt_chars=settings.provided.stream.max_prompt_chars,
        on_disconnect=settings.provided.stream.on_disconnect,
        max_stream_seconds=settings.provided.stream.max_stream_seconds,
        reconnect_hint_ms=settings.provided.stream.reconnect_hint_ms,
        retention_seconds=settings.provided.events.retention_seconds,
        metrics=metrics,
        slots=providers.Singleton(StreamSlots, per_user=settings.provided.stream.max_per_user,
                                  per_run=settings.provided.stream.max_per_run),
    )
