"""schemathesis against the running service's own /openapi.json: every operation, a bounded budget of
generated requests each, valid and invalid ones (positive and negative modes, with a valid bearer
token): no 5xx, and every error a valid problem document."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.aura_process import AuraProcess
from tests.redis_server import RedisServer
from tests.support import bearer

EXAMPLES_PER_OPERATION = 25
SRC = Path(__file__).resolve().parents[2] / "src"


def check_response(case: Any, response: Any, failures: list[str]) -> None:
    where = f"{case.method} {case.formatted_path}"
    if response.status_code >= 500:
        failures.append(f"{where} -> {response.status_code}: {response.text[:300]}")
        return
    if response.status_code >= 400:
        kind = (response.headers.get("content-type") or [""])[0]  # schemathesis: lists of values
        if not kind.startswith("application/problem+json"):
            failures.append(f"{where} -> {response.status_code} with content-type {kind!r}: {response.text[:200]}")
            return
        problem = response.json()
        missing = {"type", "title", "status", "code"} - problem.keys()
        if missing or problem["status"] != response.status_code or not isinstance(problem["code"], str):
            failures.append(f"{where} -> {response.status_code}: not a problem document: {problem}")


def test_every_operation_survives_generated_requests(start_aura: Callable[..., AuraProcess],
                                                     own_redis: list[RedisServer]) -> None:
    aura = start_aura(redis_url=own_redis[0].url, env={
        "AURA_HITL__TIMEOUT_SECONDS": "1", "AURA_RUNS__MAX_PER_USER": "1000", "AURA_RUNS__MAX_PER_TENANT": "1000",
        "AURA_STREAM__MAX_PER_USER": "1000",
        "AURA_LOG__LEVEL": "WARNING", "PYTHONPATH": str(SRC)})  # this working tree, not another install
    schema = schemathesis.openapi.from_url(f"{aura.url}/openapi.json")
    failures: list[str] = []
    operations = []
    for result, mode in [(r, m) for r in schema.get_all_operations() for m in GenerationMode]:
        operation = result.ok()
        operations.append(f"{operation.method.upper()} {operation.path} ({mode.value})")

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(case=operation.as_strategy(generation_mode=mode))
        def exercise(case: Any) -> None:
            headers = {**(case.headers or {}), **bearer()}
            response = case.call(headers=headers, timeout=15)
            check_response(case, response, failures)

        try:
            exercise()
        except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
            operations[-1] += " [no invalid input exists]"
    print(f"schemathesis: {len(operations)} operations x {EXAMPLES_PER_OPERATION} examples: {operations}")
    assert len(operations) == 32, operations  # 16 operations, positive and negative
    assert failures == [], "\n".join(sorted(set(failures))[:30])
