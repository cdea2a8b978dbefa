"""Runs after the fact: snapshot, resume (replay + live follow) and cancel, on any instance."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from quart import Blueprint, Response, request

from adapters.http.problems import Problem
from adapters.http.streams import StreamConfig, resumed_frames, sse_response
from adapters.http.web import current_principal, header, json_response
from domain.services.access import RunAccess


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a client resumes: the run its Last-Event-ID names (None for a bare seq) and the seq."""

    run_id: str | None
    seq: int


_LAST_EVENT_ID = re.compile(r"^(?:([A-Za-z0-9_.\-]{1,128}):)?([0-9]{1,18})$")


def last_event_id() -> ResumePoint:
    """Where to resume: the Last-Event-ID header (EventSource and fetch-event-source set it), or
    ?lastEventId=. Aura's ids are `<runId>:<seq>`; a bare `<seq>` is accepted too."""
    raw = header(request, "Last-Event-ID") or (request.args.get("lastEventId") if request.query_string else None) or "0"
    match = _LAST_EVENT_ID.match(raw.strip())
    if match is None:
        raise Problem(422, "invalid_last_event_id",
                      "Last-Event-ID must be an event id Aura sent (<runId>:<seq>) or a non-negative integer.")
    return ResumePoint(match.group(1), int(match.group(2)))


def blueprint(access: Callable[[], RunAccess], config: Callable[[], StreamConfig]) -> Blueprint:
    """The run routes, given their services' providers at app creation."""
    bp = Blueprint("runs", __name__)

    @bp.get("/aura/runs/<run_id>")
    async def run_snapshot(run_id: str) -> Response:
        """The run's current state: status, plan with step statuses, timeline, pending approval, answer so far."""
        return json_response(await access().snapshot(current_principal(), run_id))

    @bp.get("/aura/runs/<run_id>/events")
    async def run_events(run_id: str) -> Response:
        """Replay every event after Last-Event-ID, then follow the live run until `end` and [DONE]."""
        return await resume_run(run_id, access(), config())

    @bp.post("/aura/runs/<run_id>/cancel")
    async def cancel_run(run_id: str) -> Response:
        """Cancel the run wherever it runs; its watchers get `end` (cancelled, user_cancelled) and [DONE]."""
        outcome = await access().cancel(current_principal(), run_id)
        return json_response({"runId": run_id, "status": outcome}, 202 if outcome == "cancelling" else 200)

    return bp


async def resume_run(run_id: str, access: RunAccess, config: StreamConfig) -> Response:
    after = last_event_id()
    if after.run_id not in (None, run_id):
        raise Problem(422, "invalid_last_event_id", "Last-Event-ID names another run.")
    principal = current_principal()
    await access.record_for(principal, run_id)  # 404 before the stream starts
    slot = config.slots.take(principal.tenant_id, principal.user_id, run_id)  # 429 beyond the caps
    items = access.resume(principal, run_id, after.seq, config.heartbeat_seconds)
    return sse_response(resumed_frames(items, config, slot))
