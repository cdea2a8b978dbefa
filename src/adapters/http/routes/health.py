"""Liveness and readiness, without authentication."""

from __future__ import annotations

from dependency_injector.wiring import Provide, inject
from quart import Blueprint

from adapters.http.problems import Problem
from domain.ports import HealthProbe
from domain.service import RunService

bp = Blueprint("health", __name__)


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
