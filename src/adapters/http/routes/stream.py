"""POST /aura/test/stream: validate, start a run, stream its events (contract section 3)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import Callable
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator
from quart import Blueprint, Response, g, request

from adapters.http.bodies import validate_body
from adapters.http.problems import Problem
from adapters.http.routes.runs import last_event_id
from adapters.http.streams import StreamConfig, live_frames, resumed_frames, sse_response
from adapters.http.web import current_principal, header
from domain.model.errors import RunStartsTooFrequent, ShuttingDown, TooManyRuns
from domain.model.run import DisconnectPolicy, RunRequest
from domain.services.access import Attached, RunAccess

SOURCES = ("AURA", "FRONTEND", "INTERNAL", "BATCH")
_HEADER_VALUE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


class PageContext(BaseModel):
    """What the DWP page tells Aura. Known keys are typed; any other key is kept and passed on."""

    model_config = ConfigDict(extra="allow")

    url: str | None = None
    path: str | None = None
    title: str | None = None
    activeApp: str | None = None
    itemId: str | int | None = None
    selectedItemIds: list[str | int] | None = None
    metadata: dict[str, Any] | None = None


class StreamRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    prompt: str = Field(min_length=1, description="What the user asks.")
    context: PageContext = Field(default_factory=PageContext, description="The page the user is on.")
    thread_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:\-]{1,128}$",
                                  description="Continue this conversation.")
    on_disconnect: Literal["cancel", "continue"] | None = Field(
        None, alias="onDisconnect", description="What happens to the run when this client goes away.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value


def _optional_header(name: str, allowed: tuple[str, ...] | None = None) -> str | None:
    value = header(request, name)
    if value is None:
        return None
    value = value.strip()
    if allowed is not None:
        value = value.upper()
        if value not in allowed:
            raise Problem(422, "invalid_header", f"{name} must be one of {', '.join(allowed)}.")
    elif not _HEADER_VALUE.match(value):
        raise Problem(422, "invalid_header", f"{name} must be 1-64 letters, digits or ._:-")
    return value


def forget_body() -> None:
    """Drop the request body Quart keeps, raw and parsed: it has been validated into the run's
    request, and Quart keeps its request object for as long as the stream is open (hours, for a
    run waiting on an approval)."""
    request.body.clear()
    cached = request._cached_json  # Quart's cache of get_json(), by `silent`; Ellipsis: not parsed
    cached[False] = cached[True] = Ellipsis


def blueprint(access: Callable[[], RunAccess], config: Callable[[], StreamConfig]) -> Blueprint:
    """The stream route, given its services' providers at app creation (each a cheap call per
    request: dependency-injector's @inject resolved them through a wrapper coroutine per call)."""
    bp = Blueprint("stream", __name__)

    @bp.post("/aura/test/stream")
    @validate_body(StreamRequest)
    async def stream(data: StreamRequest) -> Response:
        """Start an agent run and stream its events as Server-Sent Events."""
        return await start_stream(data, access(), config())

    return bp


async def start_stream(data: StreamRequest, access: RunAccess, config: StreamConfig) -> Response:
    if len(data.prompt) > config.max_prompt_chars:
        raise Problem(422, "prompt_too_long", f"prompt is longer than {config.max_prompt_chars} characters.")
    context = data.context.model_dump(exclude_unset=True)
    try:
        size = len(orjson.dumps(context))
    except TypeError:  # orjson, which writes every event, takes integers of up to 64 bits only
        raise Problem(422, "invalid_context", "context numbers must be integers of at most 64 bits "
                      "or floating point; send larger values as strings.") from None
    if size > config.max_context_bytes:
        raise Problem(422, "context_too_large",
                      f"context is {size} bytes of UTF-8 JSON; at most {config.max_context_bytes} are allowed.")
    run_request = RunRequest(
        prompt=data.prompt,
        context=context,
        thread_id=data.thread_id,
        source=_optional_header("X-DWP-Source", SOURCES),
        caller_type=_optional_header("X-DWP-Caller-Type"),
        bearer_token=g.bearer_token,
        on_disconnect=DisconnectPolicy(data.on_disconnect or config.on_disconnect),
        traceparent=g.traceparent,
    )
    # What the run was asked, so that a retried POST (an Idempotency-Key, or a Last-Event-ID that
    # names the run) attaches only when it asks the same.
    fingerprint = hashlib.sha256(orjson.dumps(data.model_dump(mode="json", by_alias=True),
                                              option=orjson.OPT_SORT_KEYS)).hexdigest()
    idempotency = None
    key = header(request, "Idempotency-Key")
    if key is not None:
        if not _IDEMPOTENCY_KEY.match(key):
            raise Problem(422, "invalid_header", "Idempotency-Key must be 1-255 visible ASCII characters.")
        idempotency = (key, fingerprint)
    resume_from = last_event_id()
    principal = current_principal()
    slot = config.slots.take(principal.tenant_id, principal.user_id, resume_from.run_id)  # 429 beyond the caps
    try:
        outcome = await access.start(principal, run_request, trace_id=g.trace_id, idempotency=idempotency,
                                     fingerprint=fingerprint, resume_run_id=resume_from.run_id,
                                     after_seq=resume_from.seq, heartbeat_seconds=config.heartbeat_seconds)
    except TooManyRuns as error:
        slot.release()
        raise Problem(429, error.code, error.message, headers={"Retry-After": "5"}) from None
    except RunStartsTooFrequent as error:
        raise Problem(429, error.code, error.message,
                      headers={"Retry-After": str(math.ceil(error.retry_after_seconds))}) from None
    except ShuttingDown as error:
        slot.release()
        raise Problem(503, error.code, error.message, headers={"Retry-After": "1"}) from None
    except BaseException:
        slot.release()
        raise
    forget_body()
    if isinstance(outcome, Attached):
        return sse_response(resumed_frames(outcome.items, config, slot), {"X-Aura-Run-ID": outcome.run_id})
    watch = outcome.watch
    slot.add_run(watch.run_id)
    watch.release_when_done(asyncio.current_task())  # even if the body never starts (client gone during headers)
    return sse_response(live_frames(watch, config, slot), {"X-Aura-Run-ID": watch.run_id})
