"""The OpenAPI description: quart-schema's, completed with what it cannot infer — the problem
responses of every operation, the SSE responses, the bearer requirement and the event schema."""

from __future__ import annotations

import json
from typing import Any

from quart_schema import OpenAPIProvider

from adapters.http.event_schema import events_json_schema

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details",
    "required": ["type", "title", "status", "code"],
    "properties": {
        "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
        "detail": {"type": "string"}, "code": {"type": "string", "description": "stable machine code"},
        "traceId": {"type": ["string", "null"]},
        "errors": {"type": "array", "items": {"type": "object"}},
        "requestStatus": {"type": "string"}, "decidedBy": {"type": ["string", "null"]},
        "decidedAt": {"type": ["integer", "null"]},
    },
}
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_DESCRIPTIONS = {
    400: "The body could not be read", 401: "Missing or invalid token", 403: "Not allowed",
    404: "Not found (also for another tenant's ids)",
    409: "Already decided, or a retried POST's Last-Event-ID names a run started with another body",
    410: "Expired", 413: "Body too large", 422: "Invalid input",
    429: "Too many concurrent runs, run starts, or open streams per user or per run",
    503: "Not ready or shutting down", 500: "Internal error",
}
PUBLIC_PATHS = frozenset({"/"})
PUBLIC_PREFIXES = ("/health", "/ready", "/metrics", "/openapi.json", "/docs", "/aura/console", "/aura/schema")
SSE_PATHS = {"/aura/test/stream": "post", "/aura/runs/{run_id}/events": "get"}


def _problems(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": _DESCRIPTIONS[s], "content": {"application/problem+json": {"schema": _PROBLEM_REF}}}
            for s in statuses}


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _statuses(path: str, method: str) -> tuple[int, ...]:
    if _public(path):
        return (503, 500) if path == "/ready" else (404, 500) if path.startswith("/aura/console") else (500,)
    common: tuple[int, ...] = (401, 403, 500)
    if path == "/aura/test/stream":
        return (*common, 400, 404, 409, 413, 422, 429, 503)
    if "/hitl/approve/" in path or "/hitl/reject/" in path:
        return (*common, 404, 409, 410, 413, 422)
    if path.startswith("/aura/runs/"):
        return (*common, 404, 422, 429, 503) if path.endswith("/events") else (*common, 404, 422, 503)
    return (*common, 404, 503)


class AuraOpenAPIProvider(OpenAPIProvider):
    def schema(self) -> dict[str, Any]:
        spec = super().schema()
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas["Problem"] = PROBLEM_SCHEMA
        # the event schema's own references point at $defs; here they live under components
        events = json.loads(json.dumps(events_json_schema()).replace("#/$defs/", "#/components/schemas/"))
        schemas["Event"] = {"description": "See /aura/schema/events.json", "oneOf": events["oneOf"]}
        schemas.update(events["$defs"])
        for path, operations in spec.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                if SSE_PATHS.get(path) == method:
                    responses["200"] = {
                        "description": "Server-Sent Events: `id: <runId>:<seq>`, `event: <type>`, "
                                       "`data: <envelope>`; heartbeats are `: ping` comment lines; ends with "
                                       "`data: [DONE]`. Send the last id back as Last-Event-ID to resume the run.",
                        "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/Event"}}},
                    }
                elif path == "/metrics":
                    responses["200"] = {"description": "Prometheus text exposition",
                                        "content": {"text/plain": {"schema": {"type": "string"}}}}
                elif not any(code.startswith("2") for code in responses):
                    responses["200" if method != "post" or "/cancel" not in path else "202"] = {
                        "description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
                responses.update(_problems(*_statuses(path, method)))
                if not _public(path):
                    operation["security"] = [{"bearer": []}]
        return spec
