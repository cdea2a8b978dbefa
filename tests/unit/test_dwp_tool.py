"""The dwp_request tool against the local fake DWP backend (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import logging
import socket
import unicodedata
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from jose import jwt

from adapters.tools.dwp import DwpRequestTool, dwp_tools
from domain.model.errors import InvalidInput, ToolFailure
from domain.model.identity import Principal
from domain.model.tools import ToolContext, ToolRegistry
from tests.defaults import DWP_LIMITS
from tests.fake_dwp import FakeDwp, FakeResponse

# A real JWT (its expiry is read before each call); the claim makes it easy to spot in logs.
TOKEN = jwt.encode({"sub": "alice", "tenant_id": "acme", "exp": 4_000_000_000, "marker": "secret-user-token"},
                   "x" * 32, algorithm="HS256")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
# The DWP backend acting for alice: the effective user is alice, the actor the service.
PRINCIPAL = Principal(user_id="alice", tenant_id="acme", actor_id="dwp-backend")
CONTEXT = ToolContext(principal=PRINCIPAL, trace_id="trace-1", run_id="run-1", bearer_token=TOKEN,
                      extra_headers={"traceparent": TRACEPARENT})
WRITE_METHODS = ["POST", "PUT", "PATCH", "DELETE"]


def dwp_tool(base_url: str, **options: Any) -> DwpRequestTool:
    """The tool with the settings' defaults for what a case does not name."""
    return DwpRequestTool(base_url, **(DWP_LIMITS | options))


@pytest.fixture
def dwp() -> Iterator[FakeDwp]:
    with FakeDwp() as fake:
        yield fake


@pytest.fixture
def tool(dwp: FakeDwp) -> DwpRequestTool:
    return dwp_tool(dwp.base_url)


async def failure_of(tool: DwpRequestTool, args: dict[str, Any], context: ToolContext = CONTEXT) -> ToolFailure:
    with pytest.raises(ToolFailure) as caught:
        await tool.run(args, context)
    return caught.value


# --- what is sent ----------------------------------------------------------------------------

async def test_get_forwards_the_callers_identity_and_trace_headers_exactly(dwp: FakeDwp, tool: DwpRequestTool) -> None:
    dwp.respond("GET", "/orders/42", FakeResponse.of_json({"id": 42}))

    await tool.run({"method": "GET", "path": "/orders/42"}, CONTEXT)

    [request] = dwp.requests
    assert (request.method, request.path, request.query_string, request.body) == ("GET", "/orders/42", "", b"")
    assert request.headers == {
        "host": f"127.0.0.1:{dwp.port}",
        "accept": "application/json",
        "accept-encoding": "identity",
        "user-agent": "Aura",
        "authorization": f"Bearer {TOKEN}",
        "x-tenant-id": "acme",
        "x-user-id": "alice",
        "x-dwp-source": "AURA",
        "x-dwp-caller-type": "agent",
        "traceparent": TRACEPARENT,
    }


@pytest.mark.parametrize("extra_headers", [
    {},
    {"traceparent": "not-a-traceparent"},
    {"traceparent": TRACEPARENT + "\r\nX-Injected: 1"},
    {"traceparent": TRACEPARENT + "\n"},
    {"x-other": "value"},
])
async def test_only_a_well_formed_traceparent_is_forwarded(
    dwp: FakeDwp, tool: DwpRequestTool, extra_headers: dict[str, str],
) -> None:
    context = ToolContext(principal=PRINCIPAL, trace_id="t", run_id="r", bearer_token=TOKEN,
                          extra_headers=extra_headers)

    await tool.run({"path": "/orders"}, context)

    headers = dwp.requests[0].headers
    assert "traceparent" not in headers
    assert "x-other" not in headers
    assert "x-injected" not in headers


async def test_post_sends_query_parameters_and_a_compact_json_body(dwp: FakeDwp, tool: DwpRequestTool) -> None:
    dwp.respond("POST", "/orders", FakeResponse.of_json({"id": 7}, status=201))

    result = await tool.run({
        "method": "POST",
        "path": "/orders",
        "query": {"status": "open", "limit": 20, "ratio": 0.5, "dryRun": False, "q": "a b&c"},
        "body": {"item": "Stuhl", "size": "groß", "count": 2, "tags": ["x"], "note": None},
    }, CONTEXT)

    [request] = dwp.requests
    assert request.query_string == "status=open&limit=20&ratio=0.5&dryRun=false&q=a+b%26c"
    assert request.query == {"status": "open", "limit": "20", "ratio": "0.5", "dryRun": "false", "q": "a b&c"}
    assert request.body == '{"item":"Stuhl","size":"groß","count":2,"tags":["x"],"note":null}'.encode()
    assert request.headers["content-type"] == "application/json"
    assert request.headers["content-length"] == str(len(request.body))
    assert result == {"status": 201, "headers": {"content-type": "application/json"}, "body": {"id": 7},
                      "truncated": False, "summary": "POST /orders → 201"}


@pytest.mark.parametrize("method", WRITE_METHODS)
async def test_each_write_method_is_sent_as_given(dwp: FakeDwp, tool: DwpRequestTool, method: str) -> None:
    dwp.respond(method, "/orders/42", FakeResponse(status=204))

    result = await tool.run({"method": method, "path": "/orders/42", "body": {"state": "closed"}}, CONTEXT)

    assert [(r.method, r.path, r.json) for r in dwp.requests] == [(method, "/orders/42", {"state": "closed"})]
    assert result == {"status": 204, "headers": {}, "body": None, "truncated": False,
                      "summary": f"{method} /orders/42 → 204"}


async def test_a_null_body_is_no_body(dwp: FakeDwp, tool: DwpRequestTool) -> None:
    await tool.run({"method": "GET", "path": "/orders", "body": None}, CONTEXT)

    assert dwp.requests[0].body == b""
    assert "content-type" not in dwp.requests[0].headers


async def test_paths_are_relative_to_the_base_urls_own_path(dwp: FakeDwp) -> None:
    tool = dwp_tool(f"{dwp.base_url}/api/v1/")
    dwp.respond("GET", "/api/v1/orders/42", FakeResponse.of_json({"id": 42}))

    result = await tool.run({"path": "/orders/42"}, CONTEXT)

    assert [r.path for r in dwp.requests] == ["/api/v1/orders/42"]
    assert result["body"] == {"id": 42}
    assert result["summary"] == "GET /orders/42 → 200"


@pytest.mark.parametrize(("path", "sent"), [
    ("/orders/..draft", "/orders/..draft"),
    ("/a%20b/%C3%BC", "/a%20b/%C3%BC"),
    ("/kunden/müller", "/kunden/m%C3%BCller"),
    ("/orders/", "/orders/"),
])
async def test_ordinary_paths_are_sent_percent_encoded(dwp: FakeDwp, tool: DwpRequestTool, path: str,
                                                       sent: str) -> None:
    await tool.run({"path": path}, CONTEXT)

    assert [r.path for r in dwp.requests] == [sent]


async def test_get_with_a_body_is_refused_before_sending(dwp: FakeDwp, tool: DwpRequestTool) -> None:
    failure = await failure_of(tool, {"method": "GET", "path": "/orders", "body": {"a": 1}})

    assert failure.code == "invalid_tool_arguments"
    assert dwp.requests == []


async def test_a_call_without_a_caller_token_is_not_made(dwp: FakeDwp, tool: DwpRequestTool) -> None:
    context = ToolContext(principal=PRINCIPAL, trace_id="t", run_id="r", bearer_token=None)

    failure = await failure_of(tool, {"path": "/orders"}, context)

    assert failure.code == "missing_credentials"
    assert dwp.requests == []


@pytest.mark.parametrize(("principal", "token", "header"), [
    (PRINCIPAL, TOKEN + "\r\nX-Injected: 1", "Authorization"),
    (Principal(user_id="müller", tenant_id="acme", actor_id="müller"), TOKEN, "X-User-ID"),
    (Principal(user_id="alice", tenant_id="acme\n", actor_id="alice"), TOKEN, "X-Tenant-ID"),
])
async def test_identity_values_that_cannot_be_headers_are_refused_before_sending(
    dwp: FakeDwp, tool: DwpRequestTool, principal: Principal, token: str, header: str,
) -> None:
    context = ToolContext(principal=principal, trace_id="t", run_id="r", bearer_token=token)

    failure = await failure_of(tool, {"path": "/orders"}, context)

    assert failure.code == "invalid_identity"
    assert failure.message == (f"The caller's {header} cannot be sent in an HTTP header (it holds non-ASCII or "
                               "control characters), so the call was not made.")
    assert dwp.requests == []


# --- approval and schema ---------------------------------------------------------------------

def test_spec_is_a_per_call_approval_tool(tool: DwpRequestTool) -> None:
    assert (tool.spec.name, tool.spec.requires_approval, tool.spec.action_type) == ("dwp_request", False,
                                                                                     "dwp_request")
    assert tool.spec.parameters["properties"]["method"]["enum"] == ["GET", "POST", "PUT", "PATCH", "DELETE"]
    assert tool.spec.parameters["additionalProperties"] is False


@pytest.mark.parametrize("given", [{"path": "/orders"}, {"method": "GET", "path": "/orders"}])
def test_get_runs_without_approval(tool: DwpRequestTool, given: dict[str, Any]) -> None:
    registry = ToolRegistry([tool])

    args = registry.validate("dwp_request", given)

    assert args["method"] == "GET"
    assert registry.needs_approval("dwp_request", args) is False


@pytest.mark.parametrize("method", WRITE_METHODS)
def test_every_other_method_needs_approval(tool: DwpRequestTool, method: str) -> None:
    registry = ToolRegistry([tool])

    args = registry.validate("dwp_request", {"method": method, "path": "/orders/42", "body": {"x": 1}})

    assert registry.needs_approval("dwp_request", args) is True


@pytest.mark.parametrize("method", ["get", "HEAD", None, 1])
def test_anything_but_a_plain_get_needs_approval_even_unvalidated(tool: DwpRequestTool, method: object) -> None:
    assert tool.needs_approval({"method": method, "path": "/x"}) is True


@pytest.mark.parametrize("args", [
    {"path": "/orders", "extra": 1},
    {"path": "/orders", "method": "HEAD"},
    {"path": "/orders", "query": {"filter": {"nested": 1}}},
    {"path": "/orders", "query": {"ids": [1, 2]}},
    {"method": "GET"},
])
def test_schema_refuses_malformed_arguments(tool: DwpRequestTool, args: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput) as caught:
        ToolRegistry([tool]).validate("dwp_request", args)

    assert caught.value.code == "invalid_tool_arguments"


async def test_allowed_methods_narrow_the_schema_and_the_tool(dwp: FakeDwp) -> None:
    tool = dwp_tool(dwp.base_url, allowed_methods=("GET",))

    assert tool.spec.parameters["properties"]["method"]["enum"] == ["GET"]
    with pytest.raises(InvalidInput):
        ToolRegistry([tool]).validate("dwp_request", {"method": "POST", "path": "/orders"})
    failure = await failure_of(tool, {"method": "POST", "path": "/orders"})
    assert failure.code == "invalid_tool_arguments"
    assert dwp.requests == []


# --- refused paths ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "",
    "orders/42",
    "http://evil.example/steal",
    "https://evil.example/steal",
    "//evil.example/steal",
    "/%2Fevil.example/steal",
    "/..",
    "/orders/../admin",
    "/orders/./42",
    "/orders/%2e%2e/admin",
    "/orders%2F..%2Fadmin",
    "/orders\\..\\admin",
    "\\\\evil.example\\share",
    "/orders%5cadmin",
    "/orders\nX-Injected: 1",
    "/orders%0d%0aX-Injected: 1",
    "/orders\x00",
    "/orders\x7f",
    "/orders\u0085",
    "/orders?status=open",
    "/orders#top",
    "/" + "a" * 2048,
])
async def test_unsafe_paths_are_refused_before_sending(dwp: FakeDwp, tool: DwpRequestTool, path: str) -> None:
    failure = await failure_of(tool, {"path": path})

    assert failure.code == "invalid_path"
    assert dwp.requests == []


# Paths a backend behind a gateway (Tomcat/Spring, a lenient proxy) may read as outside the base
# path although Aura's own decoding did not. Each must be refused before anything is sent.
PATH_ESCAPES = [
    "/..;/actuator/env",
    "/orders/..;/..;/actuator/env",
    "/orders/..;jsessionid=x/admin",
    "/orders;x=1/../admin",
    "/orders/%2e%2e;/admin",
    "/%252e%252e/actuator/env",
    "/orders/%252e%252e/%252e%252e/admin",
    "/%25252e%25252e/admin",
    "/orders/%252fadmin",
    "/%C0%AE%C0%AE/actuator/env",
    "/%c0%ae%c0%ae%c0%af%c0%ae%c0%ae/admin",
    "/%E0%80%AE%E0%80%AE/admin",
    "/%F0%80%80%AE./admin",
    "/%C0%2E%C0%2E/admin",
    "/%c0%af../admin",
    "/orders/%2e%2e%2fadmin",
    "/orders/%2E%2E%5Cadmin",
    "/orders/.%2e/admin",
    "/orders/%2e./admin",
    "/orders/%2e",
    "/orders/...",
    "/orders/.. /admin",
    "/orders/\uff0e\uff0e/admin",
    "/orders/%EF%BC%8E%EF%BC%8E/admin",
    "/orders/\ufe52\ufe52/admin",
    "/orders/\uff3cadmin",
    "/orders/\uff1b/admin",
    "/orders\\..\\..\\admin",
    "/orders/%5c..%5cadmin",
    "/orders//admin",
    "/%2f%2fevil.example/x",
    "/orders/%",
    "/orders/%zz",
    "/orders/%2",
    "/orders/%ff",
    "/",
    "/orders/%00",
    "/orders/%u002e%u002e/admin",
]


@pytest.mark.parametrize("path", PATH_ESCAPES)
async def test_paths_that_may_leave_the_base_path_are_refused_and_never_sent(dwp: FakeDwp, path: str) -> None:
    tool = dwp_tool(f"{dwp.base_url}/api")

    failure = await failure_of(tool, {"path": path})

    assert failure.code == "invalid_path"
    assert failure.message.startswith("path ")
    assert dwp.requests == []


def _as_a_lenient_backend_reads(sent: str) -> list[str]:
    """The segments of `sent` as the most lenient server might read them: escapes decoded until
    nothing changes, backslashes as slashes, `;...` dropped, Unicode compatibility-normalised."""
    text = sent
    for _ in range(5):
        text = unquote(text, errors="replace")
    text = unicodedata.normalize("NFKC", text).replace("\\", "/")
    return [segment.split(";", 1)[0] for segment in text.split("/")]


async def test_no_combination_of_tricks_reaches_outside_the_base_path(dwp: FakeDwp) -> None:
    tool = dwp_tool(f"{dwp.base_url}/api")
    dots = ["..", ".", "%2e%2e", "%2E.", "%252e%252e", "%c0%ae%c0%ae", "\uff0e\uff0e", "..;", "%2e%2e%3b", "...",
            "..%00", "..%20"]
    separators = ["/", "%2f", "%252f", "\\", "%5c", "%c0%af", "//", ";/"]
    attempts = [f"/orders{sep}{dot}{sep}{dot}{sep}admin" for dot in dots for sep in separators]
    attempts += [f"/{dot}/admin" for dot in dots] + [f"/orders/{dot}" for dot in dots]

    sent = []
    for path in attempts:
        try:
            await tool.run({"path": path}, CONTEXT)
        except ToolFailure as failure:
            assert failure.code == "invalid_path"
        else:
            sent.append(path)

    for request in dwp.requests:
        segments = _as_a_lenient_backend_reads(request.path)
        assert segments[:2] == ["", "api"] and len(segments) > 2, request.path
        assert all(segment.strip(". ") for segment in segments[2:-1]), request.path
    assert len(dwp.requests) == len(sent)


@pytest.mark.parametrize("path", [None, 42, ["/orders"]])
async def test_a_path_that_is_not_a_string_is_refused(dwp: FakeDwp, tool: DwpRequestTool, path: object) -> None:
    failure = await failure_of(tool, {"path": path})

    assert failure.code == "invalid_path"
    assert dwp.requests == []


# --- what comes back -------------------------------------------------------------------------

async def test_a_404_is_an_answer_not_a_failure(dwp: FakeDwp, tool: DwpRequestTool) -> None:
    problem = {"type": "about:blank", "title": "Not Found", "status": 404, "detail": "No order 99"}
    dwp.respond("GET", "/orders/99", FakeResponse(404, b'{"type": "about:blank", "title": "Not Found", '
                                                       b'"status": 404, "detail": "No order 99"}',
                                                  {"Content-Type": "application/problem+json"}))

    result = await tool.run({"path": "/orders/99"}, CONTEXT)

    assert result == {"status": 404, "headers": {"content-type": "application/problem+json"}, "body": problem,
                      "truncated": False, "summary": "GET /orders/99 → 404"}


async def test_a_500_with_a_text_body_is_returned_as_text(dwp: FakeDwp, tool: DwpRequestTool) -> None:
    dwp.respond("DELETE", "/orders/1", FakeResponse.of_text("database is down", status=500))

    result = await tool.run({"method": "DELETE", "path": "/orders/1"}, CONTEXT)

    assert result == {"status": 500, "headers": {"content-type": "text/plain; charset=utf-8"},
                      "body": "database is down", "truncated": False, "summary": "DELETE /orders/1 → 500"}


async def test_a_body_that_claims_json_but_is_not_is_returned_as_text(dwp: FakeDwp, tool: DwpRequestTool) -> None:
    dwp.respond("GET", "/broken", FakeResponse(200, b"{not json", {"Content-Type": "application/json"}),
                FakeResponse(200, b"NaN", {"Content-Type": "application/json"}))

    first = await tool.run({"path": "/broken"}, CONTEXT)
    second = await tool.run({"path": "/broken"}, CONTEXT)

    assert (first["body"], second["body"]) == ("{not json", "NaN")


async def test_only_the_content_type_header_is_returned(dwp: FakeDwp, tool: DwpRequestTool) -> None:
    dwp.respond("GET", "/orders", FakeResponse.of_json([], headers={"Set-Cookie": "SESSION=abc", "X-Debug": "1"}))

    result = await tool.run({"path": "/orders"}, CONTEXT)

    assert result["headers"] == {"content-type": "application/json"}
    assert result["body"] == []


async def test_a_long_answer_is_cut_at_the_limit_and_flagged(dwp: FakeDwp) -> None:
    tool = dwp_tool(dwp.base_url, max_response_bytes=16)
    dwp.respond("GET", "/orders", FakeResponse.of_json({"orders": ["0123456789", "abcdefghij"]}))

    result = await tool.run({"path": "/orders"}, CONTEXT)

    assert result == {"status": 200, "headers": {"content-type": "application/json"},
                      "body": '{"orders": ["012', "truncated": True,
                      "summary": "GET /orders → 200 (response truncated at 16 bytes)"}


async def test_an_answer_exactly_at_the_limit_is_whole(dwp: FakeDwp) -> None:
    body = b'{"id": 1234567}'
    tool = dwp_tool(dwp.base_url, max_response_bytes=len(body))
    dwp.respond("GET", "/orders/1", FakeResponse(200, body, {"Content-Type": "application/json"}))

    result = await tool.run({"path": "/orders/1"}, CONTEXT)

    assert (result["body"], result["truncated"]) == ({"id": 1234567}, False)


async def test_truncation_drops_a_character_cut_in_half(dwp: FakeDwp) -> None:
    tool = dwp_tool(dwp.base_url, max_response_bytes=5)
    dwp.respond("GET", "/name", FakeResponse.of_text("ääää"))  # two bytes each

    result = await tool.run({"path": "/name"}, CONTEXT)

    assert (result["body"], result["truncated"]) == ("ää", True)


# --- failures --------------------------------------------------------------------------------

async def test_a_backend_that_does_not_answer_in_time_is_a_tool_timeout(dwp: FakeDwp) -> None:
    tool = dwp_tool(dwp.base_url, timeout_seconds=0.2)
    dwp.respond("GET", "/slow", FakeResponse.hanging())

    failure = await failure_of(tool, {"path": "/slow"})

    assert (failure.code, failure.retryable) == ("tool_timeout", True)
    assert failure.message == "The DWP backend did not answer GET /slow within 0.2 s."


async def test_a_refused_connection_is_dwp_unavailable() -> None:
    # A bound socket that never listens: connecting to it is refused, and no other process can take the port.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        tool = dwp_tool(f"http://127.0.0.1:{unused.getsockname()[1]}")

        failure = await failure_of(tool, {"path": "/orders"})

    assert (failure.code, failure.retryable) == ("dwp_unavailable", True)
    assert failure.message == "The DWP backend could not be reached for GET /orders (ConnectError)."


async def test_redirects_are_never_followed(dwp: FakeDwp, tool: DwpRequestTool) -> None:
    with FakeDwp() as elsewhere:
        dwp.respond("GET", "/orders", FakeResponse.redirect(f"{elsewhere.base_url}/steal"))
        dwp.respond("GET", "/old", FakeResponse.redirect("/orders", status=301))

        away = await tool.run({"path": "/orders"}, CONTEXT)
        same_host = await tool.run({"path": "/old"}, CONTEXT)

        assert elsewhere.requests == []
    assert [r.path for r in dwp.requests] == ["/orders", "/old"]
    assert (away["status"], away["summary"]) == (302, "GET /orders → 302")
    assert (same_host["status"], same_host["summary"]) == (301, "GET /old → 301")


async def test_an_injected_client_is_only_a_transport(dwp: FakeDwp) -> None:
    async with httpx.AsyncClient(headers={"X-Client-Default": "1"}, auth=("service", "password"),
                                 follow_redirects=True, base_url="http://elsewhere.invalid") as client:
        tool = dwp_tool(dwp.base_url, client=client)
        dwp.respond("GET", "/orders", FakeResponse.redirect("/moved"))

        result = await tool.run({"path": "/orders"}, CONTEXT)

    assert result["status"] == 302
    [request] = dwp.requests
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert "x-client-default" not in request.headers


# --- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("base_url", [None, "", "   "])
def test_without_a_base_url_the_tool_is_not_offered(base_url: str | None) -> None:
    assert dwp_tools(base_url, **DWP_LIMITS) == []


def test_with_a_base_url_the_factory_offers_the_tool() -> None:
    tools = dwp_tools("http://dwp-backend:8080/api", timeout_seconds=5.0,
                      max_response_bytes=DWP_LIMITS["max_response_bytes"], now=DWP_LIMITS["now"])

    assert [tool.spec.name for tool in tools] == ["dwp_request"]
    assert isinstance(tools[0], DwpRequestTool)


@pytest.mark.parametrize(("base_url", "options"), [
    ("dwp-backend:8080", {}),
    ("ftp://dwp-backend/api", {}),
    ("http://user:secret@dwp-backend/api", {}),
    ("http://dwp-backend/api?x=1", {}),
    ("http://dwp-backend/api#x", {}),
    ("http://dwp-backend", {"allowed_methods": ("GET", "HEAD")}),
    ("http://dwp-backend", {"allowed_methods": ()}),
    ("http://dwp-backend", {"timeout_seconds": 0}),
    ("http://dwp-backend", {"max_response_bytes": 0}),
])
def test_a_bad_configuration_fails_at_start_up(base_url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        dwp_tool(base_url, **options)


# --- logging ---------------------------------------------------------------------------------

async def test_the_token_never_reaches_the_logs(dwp: FakeDwp, tool: DwpRequestTool,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    dwp.respond("POST", "/orders", FakeResponse.of_text("boom", status=500))
    failures = []

    await tool.run({"path": "/orders/42"}, CONTEXT)
    await tool.run({"method": "POST", "path": "/orders", "body": {"a": 1}}, CONTEXT)
    for args in ({"path": "//evil.example/x"}, {"method": "GET", "path": "/x", "body": 1}):
        failures.append(await failure_of(tool, args))
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        failures.append(await failure_of(dwp_tool(f"http://127.0.0.1:{unused.getsockname()[1]}"),
                                         {"path": "/orders"}))

    messages = [record.getMessage() for record in caplog.records]
    assert "dwp_request GET /orders/42 → 404" in "\n".join(messages)
    assert any("dwp_request GET /orders failed: ConnectError [trace trace-1]" == m for m in messages)
    assert all(TOKEN not in message for message in messages)
    assert TOKEN not in caplog.text
    assert all(TOKEN not in failure.message for failure in failures)


# --- a token that expired while the call waited ------------------------------------------------

def _token(**claims: Any) -> str:
    return jwt.encode({"sub": "alice", "tenant_id": "acme", **claims}, "x" * 32, algorithm="HS256")


@pytest.mark.parametrize("method", ["GET", *WRITE_METHODS])
async def test_a_token_that_expired_before_sending_is_never_sent(dwp: FakeDwp, method: str) -> None:
    # The run started at 1000 with a token valid until 1300; the approval came at 1301.
    tool = dwp_tool(dwp.base_url, now=lambda: 1301.0)
    context = ToolContext(principal=PRINCIPAL, trace_id="t", run_id="r", bearer_token=_token(iat=1000, exp=1300))
    args: dict[str, Any] = {"method": method, "path": "/orders/42"}
    if method != "GET":
        args["body"] = {"state": "closed"}

    failure = await failure_of(tool, args, context)

    assert failure.code == "credentials_expired"
    assert failure.message == ("The caller's token expired 1 s ago (while the run waited), so the call to the DWP "
                               "backend was not made; start the request again with a fresh session.")
    assert failure.retryable is False
    assert dwp.requests == []


async def test_a_token_still_valid_at_sending_time_is_sent(dwp: FakeDwp) -> None:
    tool = dwp_tool(dwp.base_url, now=lambda: 1299.0)
    context = ToolContext(principal=PRINCIPAL, trace_id="t", run_id="r", bearer_token=_token(iat=1000, exp=1300))

    await tool.run({"path": "/orders/42"}, context)

    assert len(dwp.requests) == 1


@pytest.mark.parametrize("token", ["not-a-jwt", "a.b.c", _token(), _token(exp="4000000000"), _token(exp=True)])
async def test_a_token_without_a_readable_expiry_is_never_sent(dwp: FakeDwp, tool: DwpRequestTool,
                                                               token: str) -> None:
    context = ToolContext(principal=PRINCIPAL, trace_id="t", run_id="r", bearer_token=token)

    failure = await failure_of(tool, {"path": "/orders/42"}, context)

    assert failure.code == "credentials_expired"
    assert dwp.requests == []
