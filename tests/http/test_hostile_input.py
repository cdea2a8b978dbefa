"""Hostile request shapes get a clear problem document: never a 500, never a traceback."""

from __future__ import annotations

import logging

import pytest
from quart.typing import TestClientProtocol
from werkzeug.datastructures import Headers

from adapters.http.json_depth import MAX_JSON_DEPTH, too_deep
from tests.support import bearer, token

JSON = {"Content-Type": "application/json"}


def nested(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


def stream_body(depth: int) -> str:
    # Arrays in an extra context key, and objects: both shapes the attack used.
    return '{"prompt": "x", "context": {"deep": ' + nested(depth) + '}}'


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 255, 300, 999, 1000, 5000, 100_000])
@pytest.mark.parametrize(("path", "build"), [
    ("/aura/test/stream", stream_body),
    ("/aura/test/stream", lambda depth: '{"prompt": "x", "context": ' + '{"a":' * depth + "1" + "}" * depth + "}"),
    ("/aura/hitl/approve/hitl_unknown", lambda depth: '{"comment": ' + nested(depth) + "}"),
    ("/aura/hitl/reject/hitl_unknown", lambda depth: '{"reason": ' + nested(depth) + "}"),
])
async def test_deeply_nested_json_is_a_clear_422(client: TestClientProtocol, caplog: pytest.LogCaptureFixture,
                                                  path: str, build: object, depth: int) -> None:
    caplog.set_level(logging.DEBUG)
    body = build(depth)  # type: ignore[operator]

    response = await client.post(path, data=body, headers={**bearer(), **JSON})

    assert response.status_code == 422
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = await response.get_json()
    assert problem["code"] == "json_too_deep"
    assert problem["detail"] == f"The request body nests JSON arrays or objects more than {MAX_JSON_DEPTH} levels deep."
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_nesting_within_the_bound_is_accepted(client: TestClientProtocol) -> None:
    body = '{"prompt": "x", "context": {"deep": ' + nested(MAX_JSON_DEPTH - 3) + "}}"

    response = await client.post("/aura/test/stream", data=body, headers={**bearer(), **JSON})

    assert response.status_code == 200
    await response.get_data()


@pytest.mark.parametrize(("text", "deep"), [
    ('"' + "[" * 100 + '"', False),       # brackets inside a string do not nest
    ('["\\"' + "[" * 100 + '"]', False),  # nor after an escaped quote
    ("[" * 65, True),
    ("[" * 64 + "]" * 64, False),
    ('{"a": "\\\\"}' + "[" * 65, True),    # an escaped backslash ends the string
])
def test_depth_is_counted_outside_strings(text: str, deep: bool) -> None:
    assert too_deep(text) is deep


SERVICE_TOKEN = token("dwp-backend", role="dwp-service")


@pytest.mark.parametrize("headers", [
    [("X-Tenant-ID", "acme"), ("X-Tenant-ID", "globex")],
    [("X-Tenant-ID", "globex"), ("X-Tenant-ID", "acme")],
    [("X-User-ID", "alice"), ("X-User-ID", "bob")],
    [("X-User-ID", "bob"), ("X-User-ID", "alice")],
    [("X-User-ID", "alice"), ("X-User-ID", "alice"), ("X-User-ID", "")],
    [("Authorization", f"Bearer {token('mallory')}")],  # a second, different token
])
async def test_conflicting_repeated_identity_headers_are_refused(
        client: TestClientProtocol, headers: list[tuple[str, str]]) -> None:
    sent = Headers([("Authorization", f"Bearer {SERVICE_TOKEN}"), *headers, ("Content-Type", "application/json")])

    response = await client.post("/aura/test/stream", data='{"prompt": "x"}', headers=sent)

    assert response.status_code == 400
    problem = await response.get_json()
    assert problem["code"] == "conflicting_headers"
    assert problem["detail"].endswith("is sent more than once with different values.")


async def test_identical_repeated_identity_headers_are_accepted(client: TestClientProtocol) -> None:
    sent = Headers([("Authorization", f"Bearer {SERVICE_TOKEN}"), ("X-Tenant-ID", "acme"), ("X-Tenant-ID", "acme"),
                    ("X-User-ID", "alice"), ("X-User-ID", "alice"), ("Content-Type", "application/json")])

    response = await client.post("/aura/test/stream", data='{"prompt": "x"}', headers=sent)

    assert response.status_code == 200
    body = await response.get_data(as_text=True)
    assert body.endswith("data: [DONE]\n\n")
