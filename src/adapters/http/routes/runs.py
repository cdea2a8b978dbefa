"""Runs after the fact: snapshot, resume (replay + live follow) and cancel, on any instance."""

from __future__ import annotations

from dependency_injector.wiring import Provide, inject
from quart import Blueprint, Response, request

from adapters.http.problems import Problem
from adapters.http.routes.streaming import StreamConfig, resumed_frames, sse_response
from adapters.http.web import current_principal, json_response
from domain.access import RunAccess

bp = Blueprint("runs", __name__)


def last_event_id() -> int:
    """Where to resume: the Last-Event-ID header (EventSource sets it), or ?lastEventId=."""
    raw = request.headers.get("Last-Event-ID") or request.args.get("lastEventId") or "0"
    try:
        value = int(raw.strip())
    except ValueError:
        raise Problem(422, "invalid_last_event_id", "Last-Event-ID must be a non-negative integer.") from None
    if value < 0:
        raise Problem(422, "invalid_last_event_id", "Last-Event-ID must be a non-negative integer.")
    return value


@bp.get("/aura/runs/<run_id>")
@inject
async def run_snapshot(run_id: str, access: RunAccess = Provide["run_access"]) -> Response:
    """The run's current state: status, plan with step statuses, timeline, pending approval, answer so far."""
    return json_response(await access.snapshot(current_principal(), run_id))


@bp.get("/aura/runs/<run_id>/events")
@inject
async def run_events(run_id: str, access: RunAccess = Provide["run_access"],
                     config: StreamConfig = Provide["stream_config"]) -> Response:
    """Replay every event after Last-Event-ID, then follow the live run until `end` and [DONE]."""
    after = last_event_id()
    principal = current_principal()
    await access.record_for(principal, run_id)  # 404 before the stream starts
    items = access.resume(principal, run_id, after, config.heartbeat_seconds)
    return sse_response(resumed_frames(items, config))


@bp.post("/aura/runs/<run_id>/cancel")
@inject
async def cancel_run(run_id: str, access: RunAccess = Provide["run_access"]) -> Response:
    """Cancel the run wherever it runs; its watchers get `end` (cancelled, user_cancelled) and [DONE]."""
    outcome = await access.cancel(current_principal(), run_id)
    return json_response({"runId": run_id, "status": outcome}, 202 if outcome == "cancelling" else 200)
