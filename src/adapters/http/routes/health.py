"""Liveness and readiness, without authentication."""

from __future__ import annotations

from typing import Any, Protocol

from dependency_injector.wiring import Provide, inject
from quart import Blueprint, Response, request

from adapters.http.auth import RequestAuthenticator
from adapters.http.event_schema import events_json_schema
from adapters.http.problems import Problem
from domain.model.ports import HealthProbe
from domain.services.runs import RunService

bp = Blueprint("health", __name__)


class MetricsExposition(Protocol):
    """The metrics as a scraper reads them (the Prometheus adapter's registry)."""

    content_type: str

    def exposition(self) -> bytes: ...


@bp.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@bp.get("/ready")
@inject
async def ready(probe: HealthProbe = Provide["health_probe"],
                runs: RunService = Provide["run_service"]) -> dict[str, str]:
    """Readiness: Redis answers and the instance takes new runs."""
    if not runs.accepting:
        raise Problem(503, "shutting_down", "Aura is shutting down.", headers={"Retry-After": "1"})
    reason = await probe.check()
    if reason is not None:
        raise Problem(503, "not_ready", reason, headers={"Retry-After": "5"})
    return {"status": "ready"}


@bp.get("/metrics")
@inject
async def metrics(exposition: MetricsExposition = Provide["metrics"],
                  protected: bool = Provide["metrics_require_auth"],
                  authenticator: RequestAuthenticator = Provide["authenticator"]) -> Response:
    """Prometheus exposition of Aura's metrics; behind a token when configured (any valid Aura
    token may scrape)."""
    if protected:
        authenticator.authenticate(request)
    return Response(exposition.exposition(), content_type=exposition.content_type)


@bp.get("/aura/schema/events.json")
async def event_schema() -> dict[str, Any]:
    """JSON Schema of the SSE envelope and of every event type's `data`."""
    return events_json_schema()
