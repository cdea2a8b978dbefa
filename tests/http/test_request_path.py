"""What every request pays before and after its route's own work: the body's validation gives
exactly pydantic's errors, and nothing is rebuilt per request (quart-schema built a pydantic
TypeAdapter of the body's model, and type-checked every returned Response, on each request)."""

from __future__ import annotations

from typing import Any

import pytest
import quart_schema.extension
from pydantic import TypeAdapter, ValidationError
from quart import Quart
from quart.typing import TestClientProtocol

from adapters.http.routes.stream import StreamRequest
from tests.support import bearer

STREAM = "/aura/test/stream"


@pytest.mark.parametrize("body", [
    {}, {"prompt": ""}, {"prompt": "   "}, {"prompt": 5}, {"prompt": "x", "context": []},
    {"prompt": "x", "context": {"selectedItemIds": "a,b", "metadata": 3}},
    {"prompt": "x", "thread_id": "has spaces", "onDisconnect": "explode"}, ["prompt"], "prompt", None,
])
async def test_an_invalid_body_is_answered_with_exactly_pydantics_errors(client: TestClientProtocol,
                                                                        body: Any) -> None:
    with pytest.raises(ValidationError) as expected:
        TypeAdapter(StreamRequest).validate_python(body)

    response = await client.post(STREAM, json=body, headers=bearer())

    assert response.status_code == 422
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = await response.get_json()
    assert (problem["code"], problem["title"], problem["detail"]) == (
        "validation_error", "Unprocessable Entity", "The request body is not valid.")
    assert problem["errors"] == [{"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]}
                                 for error in expected.value.errors(include_input=False, include_url=False)]


@pytest.fixture
def type_adapters_built(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    built: list[object] = []
    real = TypeAdapter.__init__

    def counted(self: TypeAdapter[Any], *args: Any, **kwargs: Any) -> None:
        built.append(args[0] if args else kwargs.get("type"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(TypeAdapter, "__init__", counted)
    return built


@pytest.fixture
def responses_converted(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    converted: list[object] = []
    real = quart_schema.extension.convert_response_return_value

    def counted(result: Any) -> Any:
        converted.append(result)
        return real(result)

    monkeypatch.setattr(quart_schema.extension, "convert_response_return_value", counted)
    return converted


async def post_json(client: TestClientProtocol, body: bytes, headers: dict[str, str]) -> Any:
    # Raw bytes: the test client's `json=` itself goes through quart-schema's TypeAdapter.
    return await client.post(STREAM, data=body, headers={"Content-Type": "application/json", **headers})


async def test_a_stream_post_rebuilds_nothing_per_request(client: TestClientProtocol, type_adapters_built: list[object],
                                                          responses_converted: list[object]) -> None:
    started = await post_json(client, b'{"prompt": "hi"}', bearer())
    assert started.status_code == 200
    await started.get_data()
    refused = await post_json(client, b'{"prompt": ""}', bearer())
    assert refused.status_code == 422
    unauthenticated = await post_json(client, b'{"prompt": "hi"}', {})
    assert unauthenticated.status_code == 401

    assert type_adapters_built == []
    assert responses_converted == []


async def test_a_route_returning_a_plain_value_is_still_converted_by_quart_schema(
        client: TestClientProtocol, responses_converted: list[object]) -> None:
    response = await client.get("/ready")

    assert response.status_code == 200 and (await response.get_json())["status"] == "ready"
    assert len(responses_converted) == 1


def test_no_route_resolves_its_services_through_a_wrapper_per_call(app: Quart) -> None:
    """Routes call their services' providers; dependency-injector's @inject wrapped each call in a
    coroutine (`_patched`) that resolved every `Provide[...]` default again."""
    wrapped = []
    for endpoint, view in app.view_functions.items():
        layer = view
        while layer is not None:
            if layer.__code__.co_name == "_patched":
                wrapped.append(endpoint)
            layer = getattr(layer, "__wrapped__", None)
    assert "stream.stream" in app.view_functions and "hitl.approve" in app.view_functions
    assert wrapped == []
