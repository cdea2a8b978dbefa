"""RFC 9457 problem details: every HTTP error Aura answers, with a stable machine `code`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from pydantic import ValidationError
from quart import Quart, Response, g
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from domain.model.errors import (
    AuraError,
    AuthError,
    Conflict,
    Forbidden,
    Gone,
    InvalidInput,
    NotFound,
    StoreUnavailable,
)

log = logging.getLogger("aura.http")

PROBLEM_TYPE_BASE = "https://dwp.example/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"


class Problem(Exception):
    """Raise anywhere in a handler to answer with a problem document."""

    def __init__(self, status: int, code: str, detail: str, *, title: str | None = None,
                 headers: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def problem_body(problem: Problem) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + problem.code,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        "code": problem.code,
        "traceId": getattr(g, "trace_id", None),
    }
    body.update(problem.extra)
    return body


def problem_response(problem: Problem) -> Response:
    from quart import json as quart_json  # the app's JSON provider

    response = Response(quart_json.dumps(problem_body(problem)), status=problem.status,
                        content_type=PROBLEM_CONTENT_TYPE)
    for name, value in problem.headers.items():
        response.headers[name] = value
    if problem.status == 401:
        response.headers["WWW-Authenticate"] = f'Bearer error="invalid_token", error_description="{problem.code}"'
    return response


_DOMAIN_STATUS: list[tuple[type[AuraError], int]] = [
    (NotFound, 404), (Conflict, 409), (Gone, 410), (Forbidden, 403), (InvalidInput, 422), (StoreUnavailable, 503),
]


def problem_from_domain(error: AuraError) -> Problem:
    if isinstance(error, AuthError):
        return Problem(error.status, error.code, error.message)
    for kind, status in _DOMAIN_STATUS:
        if isinstance(error, kind):
            headers = {"Retry-After": "5"} if status == 503 else None
            return Problem(status, error.code, error.message, headers=headers)
    return Problem(500, error.code, error.message)


def _validation_errors(error: Exception) -> list[dict[str, Any]]:
    """Field locations and messages, never the offending input (it may be large or secret)."""
    if isinstance(error, ValidationError):
        return [{"loc": list(item["loc"]), "msg": item["msg"], "type": item["type"]}
                for item in error.errors(include_input=False, include_url=False)]
    return [{"loc": [], "msg": "The request body is not valid.", "type": "value_error"}]


_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
               415: "unsupported_media_type", 429: "too_many_requests"}


def register_problem_handlers(app: Quart) -> None:
    @app.errorhandler(Problem)
    async def _problem(error: Problem) -> Response:
        return problem_response(error)

    @app.errorhandler(AuraError)
    async def _domain(error: AuraError) -> Response:
        return problem_response(problem_from_domain(error))

    @app.errorhandler(RequestSchemaValidationError)
    async def _invalid_body(error: RequestSchemaValidationError) -> Response:
        return problem_response(Problem(422, "validation_error", "The request body is not valid.",
                                        extra={"errors": _validation_errors(error.validation_error)}))

    @app.errorhandler(UnicodeDecodeError)
    async def _undecodable(error: UnicodeDecodeError) -> Response:
        # Quart's get_data(as_text=True) / get_json() decode the body as UTF-8 and raise this
        # unhandled; a body that is not UTF-8 is the caller's error, not ours.
        return problem_response(Problem(400, "bad_request", "The request body is not valid UTF-8."))

    @app.errorhandler(HTTPException)
    async def _http(error: HTTPException) -> Response:
        status = error.code or 500
        if status == 413:
            detail = f"The request body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes."
        elif status == 400:
            detail = "The request could not be read (is the body valid JSON?)."
        else:
            detail = HTTPStatus(status).description or HTTPStatus(status).phrase
        return problem_response(Problem(status, _HTTP_CODES.get(status, f"http_{status}"), detail))

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error")
        return problem_response(Problem(500, "internal_error", "An internal error occurred."))
