"""Liveness and readiness, without authentication."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from quart import Blueprint, Response, request

from adapters.http.auth import RequestAuthenticator
from adapters.http.event_schema import events_json_schema
from adapters.http.problems import Problem
from domain.model.ports import HealthProbe
from domain.services.runs import RunService


class MetricsExposition(Protocol):
    """The metrics as a scraper reads them (the Prometheus adapter's registry)."""

    content_type: str

    def exposition(self) -> bytes: ...


def blueprint(probe: Callable[[], HealthProbe], runs: Callable[[], RunService],
              exposition: Callable[[], MetricsExposition], metrics_require_auth: Callable[[], bool],
              authenticator: Callable[[], RequestAuthenticator]) -> Blueprint:
    """Liveness, readiness, metrics and the event schema, given their services' providers."""
    bp = Blueprint("health", __name__)

    @bp.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @bp.get("/ready")
    async def ready() -> dict[str, str]:
        """Readiness: Redis answers and the instance takes new runs."""
        if not runs().accepting:
            raise Problem(503, "shutting_down", "Aura is shutting down.", headers={"Retry-After": "1"})
        reason = await probe().check()
        if reason is not None:
            raise Problem(503, "not_ready", reason, headers={"Retry-After": "5"})
        return {"status": "ready"}

    @bp.get("/metrics")
    async def metrics() -> Response:
        """Prometheus exposition of Aura's metrics; behind a token when configured (any valid Aura
        token may scrape)."""
        if metrics_require_auth():
            authenticator().authenticate(request)
        exposed = exposition()
        return Response(exposed.exposition(), content_type=exposed.content_type)

    @bp.get("/aura/schema/events.json")
    async def event_schema() -> dict[str, Any]:
        """JSON Schema of the SSE envelope and of every event type's `data`."""
        return events_json_schema()

    return bp
