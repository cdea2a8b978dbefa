"""The dependency-injector container: which adapter serves each port, built from Settings."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TypeVar

import httpx
from dependency_injector import containers, providers

from adapters.http.auth import RequestAuthenticator
from adapters.http.routes.console import ConsoleConfig
from adapters.jwt import JoseTokenVerifier, mint_token
from adapters.metrics.prometheus import PrometheusMetrics
from adapters.models.openai_compatible import OpenAICompatibleChatModel
from adapters.models.profile import ServerModelProfile
from adapters.offline import OfflineChatModel
from adapters.redis.approvals import RedisApprovalStore
from adapters.redis.client import RedisClient, close_redis, create_redis
from adapters.redis.conversations import RedisConversationStore
from adapters.redis.durability import replica_confirmation
from adapters.redis.events import RedisEventLog
from adapters.redis.health import RedisHealthProbe
from adapters.redis.limits import RedisStartRateLimiter
from adapters.redis.runs import RedisRunControl, RedisRunDirectory, RedisRunFollower
from adapters.redis.signals import RedisSignalBus
from adapters.system import SecureIdFactory, SystemClock
from adapters.tools.dwp import dwp_tools
from adapters.tools.git import git_tools
from adapters.tools.workspace import Workspace
from app import values
from app.embedded_redis import embedded_redis
from app.settings import ModelSettings, RedisSettings, Settings, ThreadSettings
from domain.model.approval import DecisionSeal
from domain.model.chat import EstimatedModelProfile, ModelProfile
from domain.model.ports import ChatModel, Clock
from domain.model.tools import ToolRegistry
from domain.services.access import RunAccess
from domain.services.agent import Agent
from domain.services.desk import ApprovalDesk
from domain.services.gate import ApprovalGate
from domain.services.recheck import ApprovalRecheck
from domain.services.runs import RunService


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
        verified_cache_size=auth.verified_token_cache_size,
        key_id=auth.key_id or None,
        allow_short_secret=auth.dev_mode,
        clock=clock,
    )


def _tool_registry(settings: Settings, clock: Clock) -> ToolRegistry:
    tools = settings.tools
    workspace = Workspace(Path(tools.workspace_root))
    return ToolRegistry(
        [
            *git_tools(workspace, timeout_seconds=tools.timeout_seconds, max_output_bytes=tools.max_output_bytes),
            *dwp_tools(tools.dwp_base_url, timeout_seconds=tools.dwp_timeout_seconds,
                       max_response_bytes=tools.max_output_bytes, now=clock.now),
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


# The model server's HTTP client is made only for a model server (an httpx client loads the CA
# bundle: tens of milliseconds and memory the offline model has no use for).
_HttpClient = Callable[[], httpx.AsyncClient]


def _chat_model(model: ModelSettings, http_client: _HttpClient) -> ChatModel:
    if model.provider == "offline":
        return OfflineChatModel()
    return OpenAICompatibleChatModel(values.model_config(model), http_client())


def _model_profile(model: ModelSettings, http_client: _HttpClient) -> ModelProfile:
    if model.provider == "offline":
        # the offline model reads no prompt: a window only limits it where one is configured
        return EstimatedModelProfile(model.context_window or OFFLINE_CONTEXT_WINDOW)
    return ServerModelProfile(values.model_config(model), http_client(), context_window=model.context_window,
                              default_context_window=model.default_context_window, tokenizer=model.tokenizer)


def _decision_seal(settings: Settings) -> DecisionSeal:
    key = settings.hitl.seal_key
    # Without a shared key each process seals for itself: its own API decisions skip the second
    # record, and other instances' signals are recorded as the DWP backend's are (still correct).
    return DecisionSeal(key.get_secret_value().encode("utf-8") if key else secrets.token_bytes(32))


_Closable = TypeVar("_Closable")


def _closed_at_shutdown(closing: AsyncExitStack, resource: _Closable, close: str = "aclose") -> _Closable:
    """`resource`, closed by `shutdown`. A resource is registered after everything it was built
    from, so shutdown closes it before them (a run service before its event log, the event log
    before the Redis client)."""
    closing.push_async_callback(getattr(resource, close))
    return resource


def _redis(settings: RedisSettings, closing: AsyncExitStack) -> RedisClient:
    """The Redis of `redis.url` (one server, a cluster or a Sentinel group's master, by its scheme);
    without a URL, the embedded mode's in-process Redis. Closed at shutdown with every connection it
    opened (under Sentinel, the sentinels' too)."""
    redis = embedded_redis() if settings.url is None else create_redis(
        settings.url, max_connections=settings.pool_size, pool_timeout_seconds=settings.pool_timeout_seconds)
    closing.push_async_callback(close_redis, redis)
    return redis


def _conversations(redis: RedisClient, threads: ThreadSettings) -> RedisConversationStore:
    return RedisConversationStore(redis, **threads.model_dump())


class Container(containers.DeclarativeContainer):
    settings = providers.Dependency(instance_of=Settings)
    # What the container opened (clients, background tasks), closed in reverse order by `shutdown`.
    closing: providers.Singleton[AsyncExitStack[bool | None]] = providers.Singleton(AsyncExitStack)

    clock = providers.Singleton(SystemClock)
    metrics_require_auth = providers.Callable(lambda settings: settings.server.metrics_require_auth, settings)
    instance_id = providers.Singleton(_instance_id, settings)
    ids = providers.Singleton(SecureIdFactory)

    redis = providers.Singleton(_redis, settings.provided.redis, closing)
    http_client = providers.Singleton(_closed_at_shutdown, closing, providers.Factory(httpx.AsyncClient))
    # The writes Aura acknowledges wait for this many replicas (None: no WAIT).
    replica_confirmation = providers.Singleton(replica_confirmation, settings.provided.redis.confirming_replicas,
                                               settings.provided.redis.wait_timeout_ms)
    approval_store = providers.Singleton(RedisApprovalStore, redis, confirmation=replica_confirmation)
    signal_bus = providers.Singleton(_closed_at_shutdown, closing, providers.Factory(RedisSignalBus, redis), "close")
    event_log = providers.Singleton(
        _closed_at_shutdown, closing,
        providers.Factory(RedisEventLog, redis, max_length=settings.provided.events.max_length,
                          retention_seconds=settings.provided.events.retention_seconds,
                          active_ttl_seconds=settings.provided.events.active_ttl_seconds, owner=instance_id,
                          confirmation=replica_confirmation),
    )
    health_probe = providers.Singleton(RedisHealthProbe, redis,
                                       timeout_seconds=settings.provided.redis.health_timeout_seconds,
                                       required_replicas=settings.provided.redis.confirming_replicas)
    run_directory = providers.Singleton(RedisRunDirectory, redis, max_log_length=settings.provided.events.max_length,
                                        approvals=approval_store, confirmation=replica_confirmation,
                                        presence_seconds=settings.provided.runs.follower_presence_seconds)
    conversations = providers.Singleton(_conversations, redis, settings.provided.threads)
    start_limiter = providers.Singleton(RedisStartRateLimiter, redis,
                                        limit=settings.provided.runs.max_starts_per_window,
                                        window_seconds=settings.provided.runs.start_window_seconds,
                                        now=clock.provided.now)
    run_follower = providers.Singleton(_closed_at_shutdown, closing,
                                       providers.Factory(RedisRunFollower, redis, confirmation=replica_confirmation,
                                                         instance_id=instance_id,
                                                         reader_ttl_seconds=settings.provided.runs.follower_presence_seconds,
                                                         block_ms=settings.provided.events.follow_idle_ms,
                                                         page=settings.provided.events.follow_page))
    run_control = providers.Singleton(_closed_at_shutdown, closing,
                                      providers.Factory(RedisRunControl, redis, instance_id))

    token_verifier = providers.Singleton(_token_verifier, settings, clock)
    authenticator = providers.Singleton(RequestAuthenticator, token_verifier,
                                        settings.provided.auth.trusted_service_roles)

    tools = providers.Singleton(_tool_registry, settings, clock)
    metrics = providers.Singleton(PrometheusMetrics, tool_names=providers.Callable(ToolRegistry.names, tools))
    model = providers.Singleton(_chat_model, settings.provided.model, http_client.provider)
    model_profile = providers.Singleton(_model_profile, settings.provided.model, http_client.provider)

    # The key that tells this process's waiting runs which signals Aura's API already stored.
    decision_seal = providers.Singleton(_decision_seal, settings)
    # One re-check of every waiting run's request per interval for the whole process.
    approval_recheck = providers.Singleton(ApprovalRecheck, approval_store, clock,
                                           settings.provided.hitl.recheck_seconds)
    gate = providers.Singleton(
        ApprovalGate, approval_store, signal_bus, clock, ids,
        providers.Callable(values.gate_settings, settings.provided.hitl),
        metrics, approval_recheck, seal=decision_seal,
    )
    approval_desk = providers.Singleton(ApprovalDesk, approval_store, signal_bus, clock,
                                        settings.provided.hitl.approver_roles, decision_seal)
    agent = providers.Singleton(
        Agent, model, tools, gate, providers.Callable(values.agent_limits, settings.provided.agent), metrics,
        profile=model_profile,
        budgets=providers.Callable(values.token_budgets, settings.provided.model),
        tool_calls=providers.Callable(values.tool_call_mode, settings.provided.model),
    )
    run_service = providers.Singleton(
        _closed_at_shutdown, closing,
        providers.Factory(RunService, agent, clock, ids, event_log, run_directory,
                          providers.Callable(values.run_limits, settings), instance_id, conversations, metrics,
                          start_limiter),
        "shutdown",
    )
    run_access = providers.Singleton(
        _closed_at_shutdown, closing,
        providers.Factory(RunAccess, run_service, run_directory, event_log, run_follower, run_control, clock,
                          conversations=conversations, approvals=approval_store,
                          retention_seconds=settings.provided.events.retention_seconds),
    )
    console_config = providers.Singleton(_console_config, settings)
    stream_config = providers.Singleton(values.stream_config, settings, metrics)


async def shutdown(container: Container) -> None:
    """Close everything the container opened, each before what it was built from."""
    await container.closing().aclose()
