"""Typed settings: the one place a default is written. A YAML file named by AURA_CONFIG_FILE, if
any, overrides the defaults, and AURA_* environment variables (nested with `__`, e.g.
AURA_AUTH__JWT_SECRET) override both. Only the composition root reads them."""

from __future__ import annotations

import difflib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from adapters.redis.client import DEFAULT_SOCKET_TIMEOUT_SECONDS, parse_redis_url

MIN_SECRET_BYTES = 32
# AURA_* variables read by something other than the settings model
OTHER_ENVIRONMENT = {
    "AURA_CONFIG_FILE": "a YAML settings file (sections and keys as in docs/operators.md) read under the environment",
    "AURA_URL": "the service the client commands talk to",
    "AURA_TOKEN": "the bearer token of the client commands",  # nosec B105 # a description, not a token
}


class ConfigError(Exception):
    """Settings that would make the service unsafe or unable to start."""


def _list_from_env(value: Any) -> Any:
    """Accept a JSON list or a comma-separated string (what operators tend to type)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


StrList = Annotated[list[str], NoDecode]


class ServerSettings(BaseModel):
    host: str = "0.0.0.0"  # nosec B104 # a service behind a gateway, in a container: reached from outside
    port: int = Field(9000, ge=1, le=65535)
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Request body limit; 413 beyond it.")
    cors_origins: StrList = Field(default_factory=lambda: ["http://localhost:4200"])
    graceful_timeout_seconds: float = Field(10.0, gt=0)
    listen_backlog: int = Field(
        2048, ge=1, le=65535, description="Connections the listening socket queues until `aura serve` accepts them "
        "(the kernel caps it at `net.core.somaxconn`); hypercorn's 100 resets a burst of new streams.")
    keep_alive_timeout_seconds: float = Field(
        75.0, gt=0, description="How long an idle HTTP/1.1 connection stays open for its next request (above a "
        "gateway's or load balancer's idle timeout, so the proxy closes first).")
    metrics_require_auth: bool = False
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="`aura serve`'s event loop; auto = uvloop when installed (about a fifth less CPU).")
    gc_threshold: int = Field(
        50_000, ge=0, description="Allocations between young-generation garbage collections in `aura serve` "
        "(Python's default is 700; 0 keeps it). Fewer full scans of a large heap of open streams.")

    _split = field_validator("cors_origins", mode="before")(_list_from_env)


# A replica confirmation (`WAIT`) ends a batch of writes whose replies are read under one bound,
# the socket timeout: the WAIT may take at most half of it, leaving the other half to the batch
# itself (up to 2,048 appends) and the round trip on a busy server. Past the bound, the client
# would time out first: the connection dropped and a write the replicas did confirm, or were
# about to, reported as a connection failure instead of an unconfirmed write.
MAX_WAIT_TIMEOUT_MS = int(DEFAULT_SOCKET_TIMEOUT_SECONDS * 1000) // 2


class RedisSettings(BaseModel):
    url: str | None = Field(None, description="`redis://`, `rediss://` (TLS), `unix://` for one server; "
                            "`redis+cluster://host:port[,host:port…]` (`rediss+cluster://` for TLS) for a Redis "
                            "Cluster (see [Redis Cluster](#redis-cluster)); "
                            "`redis+sentinel://host:port[,host:port…]/<service-name>[/db]` (`rediss+sentinel://` "
                            "for TLS) for the master a Sentinel group names (see "
                            "[Redis Sentinel](#redis-sentinel-high-availability)); unset = in-process Redis "
                            "(fakeredis).")
    max_connections: int = Field(
        32, ge=4, description="Connection pool size for one server or a Sentinel group's master. Up to three "
        "are held for good (the hot-path writes; the run-control channel; the run-follower channel while this "
        "instance follows another's runs); when every one is busy a command waits for a free one (up to "
        "`pool_timeout_seconds`) rather than opening another, so a burst of new streams does not grow the pool "
        "past it. A parked run holds none. (16 delayed the first event of 100 streams opened at once by about a "
        "third; 32 did not.)")
    pool_timeout_seconds: float = Field(
        5.0, gt=0, description="How long a command waits for a pooled connection; past it the command fails as "
        "`store_unavailable` (retryable), never hangs.")
    health_timeout_seconds: float = Field(
        1.0, gt=0, description="How long `GET /ready` waits for Redis to answer its checks; past it the instance "
        "answers 503 `not_ready`.")
    cluster_max_connections: int = Field(
        256, ge=4, description="Connections per node of a Redis Cluster. redis-py's cluster client does not "
        "wait for a free connection: a command that finds a node's connections all busy at this cap fails "
        "(`store_unavailable`), so the cap is set above any burst.")
    wait_replicas: int | None = Field(
        None, ge=0, description="Replicas that must confirm (`WAIT`) a run's record before it starts, an event before "
        "it is streamed and an approval decision before it is answered 200; unset = 1 with a "
        "`redis+sentinel://` URL, 0 (no `WAIT`) otherwise.")
    wait_timeout_ms: int = Field(500, ge=1, description="How long Aura waits for those confirmations; past it the "
                                 "write is reported failed (a retryable error), never acknowledged. At most "
                                 f"{MAX_WAIT_TIMEOUT_MS} ms, half the Redis socket timeout "
                                 f"({DEFAULT_SOCKET_TIMEOUT_SECONDS:g} s), which also bounds the batch the `WAIT` "
                                 "ends.")

    @field_validator("wait_timeout_ms")
    @classmethod
    def _wait_within_the_socket_timeout(cls, timeout_ms: int) -> int:
        if timeout_ms > MAX_WAIT_TIMEOUT_MS:
            raise ValueError(
                f"{timeout_ms} ms is more than {MAX_WAIT_TIMEOUT_MS} ms, half the Redis socket timeout "
                f"({DEFAULT_SOCKET_TIMEOUT_SECONDS:g} s): the socket timeout bounds a whole batch, its WAIT "
                "included, and a WAIT that outlasted it would drop the connection and report a confirmed "
                "write as a lost one")
        return timeout_ms

    @field_validator("url")
    @classmethod
    def _known_url(cls, url: str | None) -> str | None:
        if url is not None:
            parse_redis_url(url)  # a malformed URL stops start-up with its reason
        return url

    @model_validator(mode="after")
    def _wait_on_one_server(self) -> RedisSettings:
        if self.wait_replicas and self.url is None:
            raise ValueError("wait_replicas needs a Redis URL: the in-process Redis has no replicas")
        if self.url is not None and self.wait_replicas and parse_redis_url(self.url).topology == "cluster":
            raise ValueError("wait_replicas applies to one server or a Sentinel group, not to a cluster")
        return self

    @property
    def pool_size(self) -> int:
        """The connection cap for the URL's topology: per node on a cluster, else the one pool's."""
        if self.url is not None and parse_redis_url(self.url).topology == "cluster":
            return self.cluster_max_connections
        return self.max_connections

    @property
    def confirming_replicas(self) -> int:
        """`wait_replicas`, or its default for the URL."""
        if self.wait_replicas is not None:
            return self.wait_replicas
        return 1 if self.url is not None and parse_redis_url(self.url).topology == "sentinel" else 0


class AuthSettings(BaseModel):
    jwt_secret: SecretStr | None = Field(None, description="HS* secret shared with the DWP backend (>= 32 bytes).")
    algorithm: Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512"] = "HS256"
    public_key_file: Path | None = Field(None, description="PEM public key for RS* tokens.")
    key_id: str | None = None
    issuer: str | None = None
    audience: str | None = None
    trusted_service_roles: StrList = Field(default_factory=lambda: ["dwp-service"])
    leeway_seconds: int = Field(30, ge=0, le=300)
    max_token_age_seconds: int = Field(86_400, ge=60, description="Longest token lifetime accepted: a token whose "
                                                                  "exp - iat, or exp - now, is longer is refused "
                                                                  "(401 token_lifetime_too_long).")
    verified_token_cache_size: int = Field(
        1024, ge=0, description="Verified tokens remembered (least recently used out), so a token sent again "
        "skips its signature and claim checks; its exp/nbf are checked on every use. ~0.7 KiB each; 0 turns "
        "the cache off.")
    dev_mode: bool = False

    _split = field_validator("trusted_service_roles", mode="before")(_list_from_env)


class ToolSettings(BaseModel):
    workspace_root: Path = Field(Path("."), description="Root of the git repositories tools may touch.")
    timeout_seconds: float = Field(10.0, gt=0)
    max_output_bytes: int = Field(65_536, ge=1024)
    approval_overrides: dict[str, bool] = Field(default_factory=dict,
                                                description="Per-tool override of 'needs approval'.")
    dwp_base_url: str | None = Field(None, description="DWP backend REST base URL; unset disables dwp_request.")
    dwp_timeout_seconds: float = Field(15.0, gt=0, description="Timeout of one dwp_request call.")


class ModelSettings(BaseModel):
    provider: Literal["offline", "openai"] = "offline"
    flavour: Literal["openai", "azure", "vllm", "ollama", "llamacpp"] = "openai"
    base_url: str | None = None
    api_key: SecretStr | None = None
    name: str = "gpt-4o-mini"
    temperature: float | None = 0.2
    context_window: int | None = Field(
        None, ge=256, description="The model's context window in tokens (prompt and answer together); unset = what "
        "the server reports (vLLM, llama-server), else `default_context_window`. Every request is fitted into it.")
    default_context_window: int = Field(
        4096, ge=256, description="The window assumed when neither `context_window` nor the server tells it.")
    tokenizer: Literal["auto", "tiktoken", "server", "estimate"] = Field(
        "auto", description="How tokens are counted: `tiktoken` (OpenAI, Azure), the `server`'s tokenizer endpoint "
        "(llama.cpp, vLLM), or a safe `estimate` (3 UTF-8 bytes a token); auto = by flavour.")
    plan_max_tokens: int = Field(768, ge=16, description="`max_tokens` of the planning call.")
    step_max_tokens: int = Field(384, ge=16, description="`max_tokens` of each model call of a plan step.")
    answer_max_tokens: int = Field(1024, ge=16, description="`max_tokens` of the answer; a longer answer ends the "
                                   "run `completed` with reason `answer_truncated`.")
    tool_calls: Literal["native", "planned"] = Field(
        "native", description="`native`: the model calls tools through the API's `tools` (the planned tool is "
        "forced on a step's first call); `planned`: the plan's tool calls run as planned, for servers without "
        "tool calling.")
    structured_output: Literal["auto", "json_schema", "json_object"] = Field(
        "auto", description="How the plan's JSON Schema is sent: `json_schema` (OpenAI, Azure, vLLM, Ollama) or "
        "`json_object` with a `schema` (llama.cpp); auto = by flavour.")
    messages: Literal["auto", "native", "plain"] = Field(
        "auto", description="How the conversation is sent: `native` (system, user, assistant with `tool_calls`, "
        "`tool`) or `plain` (user and assistant turns only: the system message opens the first user turn, tool "
        "calls and results are written out), for chat templates that know no other roles (Gemma's; "
        "llama-cpp-python's server drops `tool` messages); auto = plain for llama.cpp.")
    timeout_seconds: float = 60.0
    max_retries: int = Field(2, ge=0, le=10)
    azure_deployment: str | None = None
    azure_api_version: str | None = None


class StreamSettings(BaseModel):
    heartbeat_seconds: float = Field(15.0, gt=0)
    max_context_bytes: int = Field(262_144, ge=1)
    max_prompt_chars: int = Field(32_000, ge=1)
    on_disconnect: Literal["cancel", "continue"] = "cancel"
    disconnect_grace_seconds: float = Field(
        30.0, ge=0, description="With onDisconnect cancel, a run is cancelled only after no client read it this long.")
    watcher_buffer: int = Field(4096, ge=16, description="Events buffered per connection before it is dropped.")
    send_timeout_seconds: float = Field(30.0, gt=0, description="A client that reads nothing this long is dropped.")
    max_stream_seconds: float = Field(3600.0, gt=0, description="A connection ends after this; the client resumes.")
    reconnect_hint_ms: int = Field(1000, ge=0, description="The `retry:` hint sent when Aura ends a connection.")
    max_per_user: int = Field(50, ge=1, description="Open streams per user on one instance (429 beyond).")
    max_per_run: int = Field(10, ge=1, description="Open streams per run on one instance (429 beyond).")


class RunSettings(BaseModel):
    lease_seconds: float = Field(15.0, gt=0, description=(
        "Owner lease; a run whose lease lapsed is declared lost by the next sweep (every instance sweeps "
        "once a lease), and its followers then read `run_lost`."
    ))
    follower_presence_seconds: float = Field(30.0, gt=0, description=(
        "How long an instance that follows runs counts as present after it last said so (it does every "
        "third of this). A run whose client left (onDisconnect cancel) and that was followed only from an "
        "instance that died is cancelled once this lapsed and the grace period, counted from its last sign "
        "of life, is over."
    ))
    max_per_user: int = Field(10, ge=1, description="Concurrent runs per user (429 beyond).")
    max_per_tenant: int = Field(200, ge=1, description="Concurrent runs per tenant (429 beyond).")
    max_starts_per_window: int = Field(30, ge=1, description="Runs one user may start per rate-limit window "
                                                             "(429 with Retry-After beyond).")
    start_window_seconds: int = Field(60, ge=1, description="The rate-limit window of run starts.")
    instance_id: str | None = Field(None, description="This instance's id; unset = hostname + random suffix.")


class HitlSettings(BaseModel):
    # At most the 1800 s TTL the contract gives `hitl:request:*`: a wait longer than its request's
    # life would find the request gone from Redis while the run still waits for it.
    timeout_seconds: float = Field(300.0, gt=0, le=1800, description="How long a run waits for a decision; at most "
                                   "the contract's 1800 s life of an approval request.")
    approver_roles: StrList = Field(default_factory=lambda: ["admin", "manager"])
    recheck_seconds: float = Field(5.0, gt=0)
    seal_key: SecretStr | None = Field(
        None, description="Key (>= 32 bytes) all instances share to seal the signals of decisions made through "
                          "Aura's API, so the waiting run skips recording them again; unset = a random key per "
                          "process (a decision made on another instance then costs one Redis round trip more).")

    _split = field_validator("approver_roles", mode="before")(_list_from_env)

    @field_validator("seal_key")
    @classmethod
    def _long_enough(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and len(key.get_secret_value().encode("utf-8")) < MIN_SECRET_BYTES:
            raise ValueError(f"AURA_HITL__SEAL_KEY must be at least {MIN_SECRET_BYTES} bytes")
        return key


class AgentSettings(BaseModel):
    max_steps: int = Field(12, ge=1)
    max_tool_calls: int = Field(24, ge=1)
    max_tool_calls_per_step: int = Field(6, ge=1)
    max_run_seconds: float = Field(900.0, gt=0)
    tool_timeout_seconds: float = Field(30.0, gt=0)


class ThreadSettings(BaseModel):
    ttl_seconds: int = Field(7 * 86_400, ge=60, description="A thread's memory lives this long after its last turn.")
    max_turns: int = Field(20, ge=1, description="Turns of history kept per thread.")
    max_turn_bytes: int = Field(65_536, ge=1024, description="A turn larger than this is kept shortened.")
    max_user_bytes: int = Field(4_194_304, ge=1024, description="History one user may keep over all threads; "
                                                               "beyond it new turns are not kept.")


class EventLogSettings(BaseModel):
    retention_seconds: int = Field(3600, ge=1)
    max_length: int = Field(10_000, ge=100)
    active_ttl_seconds: int = Field(86_400, ge=60, description=(
        "How long a run's log lives from its first event while the run is open (its close cuts it to "
        "`retention_seconds`): the log of a run whose owner died without closing it expires then."))
    follow_idle_ms: int = Field(1000, ge=10, description=(
        "How long a stream served from another instance's run waits for the run's next event before it "
        "looks at its client and its subscription; also how often this instance's follows tidy their "
        "channels and refresh its presence."))
    follow_page: int = Field(500, ge=1, description="Events per log read when such a stream catches up.")


class LogSettings(BaseModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, level: Any) -> Any:
        return level.strip().upper() if isinstance(level, str) else level

    format: Literal["json", "console"] = "json"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AURA_", env_nested_delimiter="__", extra="ignore")

    server: ServerSettings = Field(default_factory=ServerSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    tools: ToolSettings = Field(default_factory=ToolSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    runs: RunSettings = Field(default_factory=RunSettings)
    threads: ThreadSettings = Field(default_factory=ThreadSettings)
    hitl: HitlSettings = Field(default_factory=HitlSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    events: EventLogSettings = Field(default_factory=EventLogSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        named = os.environ.get("AURA_CONFIG_FILE")
        if named:  # a file someone named must be read
            sources.append(_readable_yaml(settings_cls, Path(named)))
        return tuple(sources)

    @model_validator(mode="after")
    def _model_needs_endpoint(self) -> Settings:
        if self.model.provider == "openai" and not self.model.base_url:
            raise ValueError("AURA_MODEL__BASE_URL is required when AURA_MODEL__PROVIDER is 'openai'.")
        return self

    @model_validator(mode="after")
    def _dev_mode_signs_with_its_own_secret(self) -> Settings:
        """Dev mode mints tokens without credentials, so it never holds a key anything else trusts:
        whatever secret or key is configured, it signs and verifies with a throw-away HS256 secret
        that dies with the process."""
        if self.auth.dev_mode:
            self.auth = self.auth.model_copy(update={
                "jwt_secret": SecretStr(secrets.token_urlsafe(48)), "algorithm": "HS256",
                "public_key_file": None, "key_id": None})
        return self

    def check_startup(self) -> None:
        """Refuse to run with unsafe authentication settings (outside dev mode)."""
        auth = self.auth
        if auth.algorithm.startswith("HS"):
            secret = auth.jwt_secret.get_secret_value() if auth.jwt_secret else ""
            if len(secret.encode("utf-8")) < MIN_SECRET_BYTES and not auth.dev_mode:
                raise ConfigError(
                    "AURA_AUTH__JWT_SECRET is missing or shorter than 32 bytes. Set the secret shared "
                    "with the DWP backend, or run `aura serve --dev` for a throw-away dev secret.")
        else:
            if auth.public_key_file is None or not auth.public_key_file.is_file():
                raise ConfigError(f"AURA_AUTH__ALGORITHM is {auth.algorithm} but AURA_AUTH__PUBLIC_KEY_FILE "
                                  "does not name a readable PEM public key.")


def _readable_yaml(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    if not path.is_file():
        raise ConfigError(f"the settings file {path} (AURA_CONFIG_FILE) does not exist or is not a file")
    try:
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    except OSError as exc:
        raise ConfigError(f"cannot read the settings file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"the settings file {path} is not valid YAML{line}") from None


def _env_name(location: tuple[int | str, ...]) -> str:
    return "AURA_" + "__".join(str(part).upper() for part in location)


def load_settings(**overrides: Any) -> Settings:
    """The settings, or a ConfigError that says in one line what is wrong and where."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            message = error["msg"].removeprefix("Value error, ")
            location = error["loc"]
            problems.append(f"{_env_name(location)}: {message}" if location else message)
        raise ConfigError("; ".join(problems)) from None


def setting_names() -> Iterator[str]:
    """Every AURA_* variable the settings model reads."""
    for section, section_field in Settings.model_fields.items():
        model = section_field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for key in model.model_fields:
            yield _env_name((section, key))


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """One line for each AURA_* variable nothing reads (a misspelt setting is otherwise silently
    ignored), with the closest real name where there is one."""
    known = {*setting_names(), *OTHER_ENVIRONMENT}
    lines = []
    for name in sorted(environ):
        if name.startswith("AURA_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]}?)" if close else ""
            lines.append(f"{name} is not a setting{hint}; it is ignored")
    return lines
