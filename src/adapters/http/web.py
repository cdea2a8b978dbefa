"""Cross-cutting HTTP concerns: trace ids, request ids, CORS, and per-request authentication."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, cast

import orjson
from quart import Quart, Request, Response, g, request

from adapters.http.auth import RequestAuthenticator, forget_authorization
from adapters.http.problems import Problem
from domain.model.errors import AuthError
from domain.model.identity import Principal
from domain.model.telemetry import bind_log_context

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
CORS_ALLOWED_HEADERS = ("Authorization, Content-Type, X-Tenant-ID, X-User-ID, X-DWP-Source, X-DWP-Caller-Type, "
                       "Last-Event-ID, Idempotency-Key, traceparent, tracestate, X-Request-ID")
CORS_EXPOSED_HEADERS = "X-Request-ID, X-Aura-Run-ID, Retry-After, WWW-Authenticate"


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON body, encoded once with orjson. A plain dict returned from a route instead goes
    through quart-schema, which builds a pydantic TypeAdapter for it on every response (its
    schema generation showed in the approve POST's profile)."""
    return Response(orjson.dumps(body), status=status, content_type="application/json")


def pass_responses_through(app: Quart) -> None:
    """Hand a Response a route or error handler returns straight to Quart. quart-schema wraps the
    app's `make_response` to turn returned pydantic models and dataclasses into JSON, and runs its
    type checks on every result; a Response (what every route of the run and approval paths
    returns) needs none of them. Install after QuartSchema."""
    converting = app.make_response
    plain = type(app).make_response

    async def make_response(result: Any) -> Any:
        if isinstance(result, Response):
            return await plain(app, result)
        return await converting(result)

    app.make_response = make_response  # type: ignore[method-assign]


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    origins: frozenset[str]
    max_age_seconds: int = 600

    def allows(self, origin: str | None) -> bool:
        return origin is not None and ("*" in self.origins or origin in self.origins)


def header(req: Request, name: str) -> str | None:
    """The header's first value, or None. werkzeug's `Headers.get` raises and catches an exception
    (a KeyError that is also an HTTPException) for every header that is not there, which is most
    of the optional ones on most requests; `getlist` does not."""
    values = req.headers.getlist(name)
    return values[0] if values else None


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _has_body(req: Request) -> bool:
    return bool(req.content_length) or "chunked" in (header(req, "Transfer-Encoding") or "").lower()


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def install_request_context(app: Quart, cors: CorsPolicy) -> None:
    # The hooks run on every request: each takes the request and `g` from their context proxies
    # once (a proxy resolves its context variable on every attribute access) and asks the OS for
    # randomness once.
    @app.before_request
    async def _identify() -> Response | None:
        req: Request = cast(Any, request)._get_current_object()
        context = cast(Any, g)._get_current_object()
        fresh = os.urandom(32).hex()  # a trace id (16 bytes), a span id and a request id (8 each)
        match = _TRACEPARENT.match((header(req, "traceparent") or "").strip().lower())
        context.trace_id = trace_id = match.group(1) if match else fresh[:32]
        # Propagate the caller's trace with a new span of ours, as W3C trace context asks.
        context.traceparent = f"00-{trace_id}-{fresh[32:48]}-01"
        given = header(req, "X-Request-ID") or ""
        context.request_id = request_id = given if _REQUEST_ID.match(given) else fresh[48:]
        bind_log_context(traceId=trace_id, requestId=request_id)
        method = req.method
        if method == "OPTIONS" and "Access-Control-Request-Method" in req.headers:
            origin = header(req, "Origin")
            if not cors.allows(origin):
                raise Problem(403, "cors_origin_refused", "This origin may not call Aura.")
            response = Response("", status=204)
            response.headers["Access-Control-Allow-Origin"] = origin or ""
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = CORS_ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = str(cors.max_age_seconds)
            response.headers["Vary"] = "Origin"
            return response
        if method in _BODY_METHODS and _has_body(req) and not _is_json(req.mimetype):
            raise Problem(415, "unsupported_media_type", "Send the body as JSON, with Content-Type: application/json.")
        return None

    @app.after_request
    async def _decorate(response: Response) -> Response:
        response.headers["X-Request-ID"] = getattr(g, "request_id", "")
        if cors.origins:
            origin = header(request, "Origin")
            if cors.allows(origin) and "Access-Control-Allow-Origin" not in response.headers:
                response.headers["Access-Control-Allow-Origin"] = origin or ""
                response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED_HEADERS
                response.headers.add("Vary", "Origin")
        return response


def install_authentication(app: Quart, authenticator: RequestAuthenticator,
                           protected_blueprints: Collection[str],
                           on_failure: Callable[[str], None] | None = None) -> None:
    """Authenticate every request to a protected blueprint before its body is read or validated."""
    protected = frozenset(protected_blueprints)

    @app.before_request
    async def _authenticate() -> None:
        req: Request = cast(Any, request)._get_current_object()
        if req.blueprint not in protected or req.method == "OPTIONS":
            return
        try:
            token = authenticator.bearer_token(req)
            principal = authenticator.authenticate(req, token)
        except AuthError as error:
            if on_failure is not None:
                on_failure(error.code)
            raise
        context = cast(Any, g)._get_current_object()
        context.principal = principal
        context.bearer_token = token
        bind_log_context(tenantId=principal.tenant_id, userId=principal.user_id)  # joins _identify's traceId
        forget_authorization(req)


def current_principal() -> Principal:
    principal: Principal = g.principal
    return principal
