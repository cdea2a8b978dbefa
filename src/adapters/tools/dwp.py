"""The `dwp_request` tool: the agent calls the DWP backend's REST API as the user it works for.

Every call carries the caller's own bearer token and identity headers, so the backend applies that
user's permissions; the tool adds none of its own. The token only ever goes to the configured base
URL: paths are checked to stay relative to it, redirects are never followed, and proxy settings from
the environment are ignored. Reading answers is bounded in time and size. GET runs freely; every
other method waits for a human's approval first.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import json
import logging
import math
import re
import ssl
import time
import unicodedata
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import httpx
from jose import JOSEError, jwt

from domain.model.errors import ToolFailure
from domain.model.tools import Tool, ToolContext, ToolSpec

logger = logging.getLogger(__name__)

TOOL_NAME = "dwp_request"
ALL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_READ_METHOD = "GET"
_MAX_PATH_CHARS = 2048
_MAX_QUERY_PARAMETERS = 50
_MAX_SHOWN_PATH = 200
_READ_CHUNK = 16384
# A '%' not followed by two hex digits: servers disagree on what it means, so it is refused.
_MALFORMED_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 3986 pchar minus ';' and '%' (refused in segments) stays literal; everything else is escaped.
_SEGMENT_SAFE = "!$&'()*+,=:@-._~"
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
# application/json and structured suffixes such as application/problem+json.
_JSON_MEDIA_TYPE = re.compile(r"application/(?:[\w.!#$&^-]+\+)?json", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class _Answer:
    """What the backend answered, before the body is decoded."""

    status: int
    content_type: str | None
    raw: bytes
    charset: str
    # True when the body was longer than the limit; only the first `len(raw)` bytes were read.
    truncated: bool


def _invalid_arguments(message: str) -> ToolFailure:
    return ToolFailure(message, code="invalid_tool_arguments")


def _invalid_path(message: str) -> ToolFailure:
    return ToolFailure(message, code="invalid_path")


def _bounded(path: str) -> str:
    """A caller-given path, cut short for messages, summaries and logs."""
    return path if len(path) <= _MAX_SHOWN_PATH else path[:_MAX_SHOWN_PATH] + "…"


def _has_control_characters(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in text)


def _checked_path(value: object) -> str:
    """The `path` argument as the canonical, percent-encoded path to send after the API base, if it
    names something strictly under that base; ToolFailure `invalid_path` otherwise.

    What a Java backend behind a gateway may read differently from Aura is refused, not repaired, as
    Spring Security's StrictHttpFirewall does: escapes are decoded exactly once and must decode to
    valid UTF-8 (no overlong `%C0%AE`), and the decoded path may not contain `%` (double encoding such
    as `%252e`), `;` (Tomcat drops `;...` from a segment, so `..;` is `..`), backslashes, encoded
    slashes, empty segments or segments made only of dots, also after Unicode compatibility
    normalisation (fullwidth dots). The path sent is re-encoded from the decoded segments."""
    if not isinstance(value, str) or not value:
        raise _invalid_path("path must be a non-empty string such as '/orders/42'.")
    if len(value) > _MAX_PATH_CHARS:
        raise _invalid_path(f"path is longer than {_MAX_PATH_CHARS} characters.")
    if _has_control_characters(value):
        raise _invalid_path("path must not contain control characters.")
    if not value.startswith("/"):
        raise _invalid_path(f"path {_bounded(value)!r} must start with '/' and be relative to the DWP API, "
                            "not a full URL.")
    if "?" in value or "#" in value:
        raise _invalid_path("path must not contain '?' or '#'; pass query parameters in 'query'.")
    if _MALFORMED_ESCAPE.search(value):
        raise _invalid_path("path has a '%' that does not start a two-digit hex escape such as '%20'.")
    raw_segments = value.split("/")[1:]
    try:
        segments = [unquote_to_bytes(segment).decode("utf-8") for segment in raw_segments]
    except UnicodeDecodeError:
        raise _invalid_path("path escapes must decode to valid UTF-8 (overlong forms such as '%C0%AE' are "
                            "refused).") from None
    for segment in segments:
        _check_segment(segment)
        normalised = unicodedata.normalize("NFKC", segment)
        if normalised != segment:
            _check_segment(normalised)
    if any(not segment for segment in segments[:-1]):
        raise _invalid_path("path must not contain empty segments ('//').")
    if not segments[0]:
        raise _invalid_path("path must name something under the DWP API, not its root.")
    return "/" + "/".join(quote(segment, safe=_SEGMENT_SAFE) for segment in segments)


def _check_segment(segment: str) -> None:
    if _has_control_characters(segment):
        raise _invalid_path("path must not contain control characters.")
    if "/" in segment:
        raise _invalid_path("path must not contain encoded slashes ('%2F').")
    if "\\" in segment:
        raise _invalid_path("path must not contain backslashes.")
    if "%" in segment:
        raise _invalid_path("path must not contain '%' after decoding (double-encoded escapes such as "
                            "'%252e' are refused).")
    if ";" in segment:
        raise _invalid_path("path must not contain ';' (matrix parameters such as '..;' are refused).")
    if segment and not segment.strip(". "):
        raise _invalid_path("path must not contain '.' or '..' segments.")


def _query_value(name: str, value: object) -> str:
    # Spelled as in JSON (true, 1.5), which is what a Java backend parses.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return json.dumps(value)
    raise _invalid_arguments(f"query parameter {name!r} must be a string, a finite number or a boolean.")


def _query_parameters(value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise _invalid_arguments("query must be an object of parameter names and values.")
    if len(value) > _MAX_QUERY_PARAMETERS:
        raise _invalid_arguments(f"query must not have more than {_MAX_QUERY_PARAMETERS} parameters.")
    parameters = []
    for name, item in value.items():
        if not isinstance(name, str) or not name:
            raise _invalid_arguments("query parameter names must be non-empty strings.")
        parameters.append((name, _query_value(name, item)))
    return tuple(parameters)


def _request_body(method: str, body: object) -> bytes | None:
    """The JSON body to send, or None. A null body counts as no body."""
    if body is None:
        return None
    if method == _READ_METHOD:
        raise _invalid_arguments("body is only allowed with POST, PUT, PATCH or DELETE, not with GET.")
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError):
        raise _invalid_arguments("body must be a JSON value.") from None


def _base_url(value: str) -> httpx.URL:
    try:
        url = httpx.URL(value.strip())
    except httpx.InvalidURL:
        raise ValueError("the DWP base URL is not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("the DWP base URL must be an absolute http(s) URL")
    if url.userinfo or url.query or url.fragment:
        raise ValueError("the DWP base URL must not contain credentials, a query or a fragment")
    return url


def _schema(methods: tuple[str, ...]) -> dict[str, Any]:
    method: dict[str, Any] = {"type": "string", "enum": list(methods),
                              "description": "HTTP method. GET runs at once; any other method first waits for "
                                             "the user's approval."}
    if _READ_METHOD in methods:
        method["default"] = _READ_METHOD
    return {
        "type": "object",
        "properties": {
            "method": method,
            # No `pattern` here: the tool's own check answers with `invalid_path` and says what is wrong.
            "path": {"type": "string", "minLength": 1, "maxLength": _MAX_PATH_CHARS,
                     "description": "Path relative to the DWP API, starting with '/', e.g. '/orders/42'. "
                                    "No full URLs, no '..' segments, no query string."},
            "query": {"type": "object", "maxProperties": _MAX_QUERY_PARAMETERS,
                      "additionalProperties": {"type": ["string", "number", "boolean"]},
                      "description": "Query parameters, e.g. {\"status\": \"open\", \"limit\": 20}."},
            "body": {"description": "JSON request body; only for POST, PUT, PATCH and DELETE."},
        },
        "required": ["path"] if _READ_METHOD in methods else ["method", "path"],
        "additionalProperties": False,
    }


class DwpRequestTool(Tool):
    """Calls the DWP backend's REST API on behalf of the calling user.

    Without `client`, each call opens and closes its own connection pool: calls are few, and a pool
    shared across event loops breaks. An injected `client` (owned and closed by the caller) serves as
    transport only: its base URL, default headers, auth and redirect setting are not used.
    """

    def __init__(
        self,
        base_url: str,
        *,
        client: httpx.AsyncClient | None = None,
        timeout_seconds: float,
        max_response_bytes: int,
        allowed_methods: Collection[str] = ALL_METHODS,
        now: Callable[[], float],
    ) -> None:
        self._now = now
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        if max_response_bytes <= 0:
            raise ValueError("max_response_bytes must be positive")
        methods = tuple(method for method in ALL_METHODS if method in set(allowed_methods))
        unknown = set(allowed_methods) - set(ALL_METHODS)
        if unknown or not methods:
            raise ValueError(f"allowed_methods must be a non-empty subset of {', '.join(ALL_METHODS)}")
        self._base = _base_url(base_url)
        self._base_path = self._base.raw_path.decode("ascii").rstrip("/")
        self._client = client
        self._timeout_seconds = timeout_seconds
        self._max_response_bytes = max_response_bytes
        self._methods = methods
        self.spec = ToolSpec(
            name=TOOL_NAME,
            description="Call the DWP backend's REST API as the current user (with the user's own permissions) "
                        "and get back the HTTP status and the response body. Error statuses such as 404 are "
                        "answers too.",
            parameters=_schema(methods),
            requires_approval=False,  # decided per call by needs_approval
            action_type=TOOL_NAME,
        )

    def needs_approval(self, args: Mapping[str, Any]) -> bool:
        # Anything but a plain GET (including an unexpected value) waits for a human.
        method: object = args.get("method", _READ_METHOD)
        return method != _READ_METHOD

    async def run(self, args: Mapping[str, Any], context: ToolContext) -> dict[str, Any]:
        method = args.get("method", _READ_METHOD)
        if method not in self._methods:
            raise _invalid_arguments(f"method must be one of {', '.join(self._methods)}.")
        path = _checked_path(args.get("path"))
        query = _query_parameters(args.get("query"))
        content = _request_body(method, args.get("body"))
        if not context.bearer_token:
            raise ToolFailure("There is no caller token to forward to the DWP backend, so the call was not made.",
                              code="missing_credentials")
        request = httpx.Request(
            method, self._url(path), params=query, headers=self._headers(context, has_body=content is not None),
            content=content,
            extensions={"timeout": httpx.Timeout(self._timeout_seconds).as_dict()},
        )
        # Last, right before sending: the token may have expired while the call waited for approval.
        self._check_not_expired(context.bearer_token)
        target = f"{method} {_bounded(path)}"
        started = time.monotonic()
        try:
            # httpx's timeouts bound each read; this bounds the whole exchange (a slow drip included).
            async with asyncio.timeout(self._timeout_seconds):
                answer = await self._exchange(request)
        except (TimeoutError, httpx.TimeoutException):
            logger.warning("dwp_request %s timed out after %g s [trace %s]", target, self._timeout_seconds,
                           context.trace_id)
            raise ToolFailure(f"The DWP backend did not answer {target} within {self._timeout_seconds:g} s.",
                              code="tool_timeout", retryable=True) from None
        except httpx.HTTPError as exc:
            # Only the exception's class: its text may quote the URL, and nothing here is worth the risk.
            logger.warning("dwp_request %s failed: %s [trace %s]", target, type(exc).__name__, context.trace_id)
            raise ToolFailure(f"The DWP backend could not be reached for {target} ({type(exc).__name__}).",
                              code="dwp_unavailable", retryable=True) from None
        elapsed_ms = (time.monotonic() - started) * 1000
        logger.info("dwp_request %s → %d, %d bytes%s in %.0f ms [trace %s]", target, answer.status,
                    len(answer.raw), " (truncated)" if answer.truncated else "", elapsed_ms, context.trace_id)
        summary = f"{target} → {answer.status}"
        if answer.truncated:
            summary += f" (response truncated at {self._max_response_bytes} bytes)"
        return {
            "status": answer.status,
            "headers": {"content-type": answer.content_type} if answer.content_type is not None else {},
            "body": _parsed_body(answer),
            "truncated": answer.truncated,
            "summary": summary,
        }

    def _check_not_expired(self, token: str) -> None:
        """A call is never made with a token that has expired (e.g. during a long approval wait):
        the backend would refuse it, or worse, one that trusts the gateway might not. The token was
        verified when the run started; only its `exp` is read again here."""
        try:
            expires_at = jwt.get_unverified_claims(token).get("exp")
        except JOSEError:
            expires_at = None
        if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
            raise ToolFailure("The caller's token has no readable expiry, so the call was not made.",
                              code="credentials_expired")
        now = self._now()
        if expires_at <= now:
            raise ToolFailure(f"The caller's token expired {now - expires_at:.0f} s ago (while the run waited), "
                              "so the call to the DWP backend was not made; start the request again with a "
                              "fresh session.", code="credentials_expired")

    def _url(self, path: str) -> httpx.URL:
        try:
            url = self._base.copy_with(path=self._base_path + path)
        except httpx.InvalidURL:
            raise _invalid_path(f"path {_bounded(path)!r} is not a valid URL path.") from None
        # The checks above should make this impossible; the token must never reach another origin, nor
        # a path httpx rewrote (it normalises dot segments) to something outside the base path.
        if (url.scheme, url.host, url.port) != (self._base.scheme, self._base.host, self._base.port) or \
                url.raw_path.decode("ascii") != self._base_path + path:
            raise _invalid_path("path must stay under the DWP API's base path.")
        return url

    @staticmethod
    def _headers(context: ToolContext, *, has_body: bool) -> dict[str, str]:
        headers = {
            "Accept": "application/json",
            # Uncompressed, so the size bound applies to what crosses the wire (no decompression bombs).
            "Accept-Encoding": "identity",
            "User-Agent": "Aura",
            "Authorization": f"Bearer {context.bearer_token}",
            "X-Tenant-ID": context.principal.tenant_id,
            "X-User-ID": context.principal.user_id,
            "X-DWP-Source": "AURA",
            "X-DWP-Caller-Type": "agent",
        }
        traceparent = next((value for name, value in context.extra_headers.items()
                            if name.lower() == "traceparent"), None)
        if traceparent is not None and _TRACEPARENT.fullmatch(traceparent):
            headers["traceparent"] = traceparent
        if has_body:
            headers["Content-Type"] = "application/json"
        for name, value in headers.items():
            # Refused here rather than by httpx (UnicodeEncodeError) or h11 deep inside the send; the
            # message names the header, never its value (it may be the token).
            if not _HEADER_VALUE.fullmatch(value):
                raise ToolFailure(f"The caller's {name} cannot be sent in an HTTP header (it holds non-ASCII "
                                  "or control characters), so the call was not made.", code="invalid_identity")
        return headers

    async def _exchange(self, request: httpx.Request) -> _Answer:
        if self._client is not None:
            return await self._send(self._client, request)
        async with httpx.AsyncClient(verify=_tls_context(), trust_env=False, follow_redirects=False) as client:
            return await self._send(client, request)

    async def _send(self, client: httpx.AsyncClient, request: httpx.Request) -> _Answer:
        # auth=None: an injected client's own credentials must not be added to the user's call.
        response = await client.send(request, stream=True, follow_redirects=False, auth=None)
        try:
            raw, truncated = await _read_bounded(response, self._max_response_bytes)
        finally:
            await response.aclose()
        return _Answer(response.status_code, response.headers.get("content-type"), raw,
                       response.charset_encoding or "utf-8", truncated)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Loading the CA bundle takes tens of milliseconds; the context is not tied to an event loop,
    # so one serves every per-call client.
    return httpx.create_ssl_context()


async def _read_bounded(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes of the body, and whether there was more. The rest is never read."""
    kept = bytearray()
    async for chunk in response.aiter_bytes(_READ_CHUNK):
        kept.extend(chunk)
        if len(kept) > limit:
            return bytes(kept[:limit]), True
    return bytes(kept), False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parsed_body(answer: _Answer) -> Any:
    """Parsed JSON when the answer is complete JSON, else text; None for an empty body."""
    if not answer.raw:
        return None
    try:
        decoder = codecs.getincrementaldecoder(answer.charset)(errors="replace")
    except LookupError:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    # Not final when truncated: a multi-byte character cut in half is dropped, not garbled.
    text = decoder.decode(answer.raw, final=not answer.truncated)
    media_type = (answer.content_type or "").split(";", 1)[0].strip()
    if not answer.truncated and _JSON_MEDIA_TYPE.fullmatch(media_type):
        try:
            return json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            pass  # a body that claims to be JSON but is not: the model still sees it as text
    return text


def dwp_tools(
    base_url: str | None,
    *,
    client: httpx.AsyncClient | None = None,
    timeout_seconds: float,
    max_response_bytes: int,
    allowed_methods: Collection[str] = ALL_METHODS,
    now: Callable[[], float],
) -> list[Tool]:
    """The DWP tool when a backend is configured; none (the model is not offered it) otherwise."""
    if base_url is None or not base_url.strip():
        return []
    return [DwpRequestTool(base_url, client=client, timeout_seconds=timeout_seconds,
                           max_response_bytes=max_response_bytes, allowed_methods=allowed_methods, now=now)]
