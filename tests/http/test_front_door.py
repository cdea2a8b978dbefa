"""The front door: GET / points to the console and the docs, /docs works offline, and a body that is
not declared as JSON gets the documented 415."""

from __future__ import annotations

import re

import pytest
from quart.typing import TestClientProtocol

from tests.support import bearer


async def test_the_root_points_to_the_console_and_the_docs(client: TestClientProtocol) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert await response.get_json() == {"service": "aura", "links": {
        "console": "/aura/console", "docs": "/docs", "openapi": "/openapi.json",
        "events": "/aura/schema/events.json", "health": "/health"}}
    page = await client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.content_type == "text/html; charset=utf-8"
    html = await page.get_data(as_text=True)
    assert '<a href="aura/console">console</a>' in html and '<a href="docs">docs</a>' in html


async def test_the_docs_page_loads_nothing_from_outside(client: TestClientProtocol) -> None:
    page = await (await client.get("/docs")).get_data(as_text=True)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), page
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page)
    assert sorted(assets) == ["docs/assets/swagger-ui-bundle.js", "docs/assets/swagger-ui.css"]
    for asset in assets:
        response = await client.get(f"/{asset}")
        assert response.status_code == 200 and len(await response.get_data()) > 10_000
    assert (await client.get("/docs/assets/index.html")).status_code == 404


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_a_body_that_is_not_json_gets_415(client: TestClientProtocol, content_type: str | None) -> None:
    body = b'{"prompt": "hello"}'
    headers = {**bearer(), "Content-Length": str(len(body))}
    if content_type:
        headers["Content-Type"] = content_type
    response = await client.post("/aura/test/stream", data=body, headers=headers)
    assert response.status_code == 415
    problem = await response.get_json()
    assert (problem["code"], problem["detail"]) == (
        "unsupported_media_type", "Send the body as JSON, with Content-Type: application/json.")


async def test_json_types_and_empty_bodies_pass(client: TestClientProtocol) -> None:
    body = b'{"prompt": "@answer {\\"text\\": \\"ok\\"}"}'
    for content_type in ("application/json", "application/json; charset=utf-8", "application/merge-patch+json"):
        headers = {**bearer(), "Content-Type": content_type, "Content-Length": str(len(body))}
        response = await client.post("/aura/test/stream", data=body, headers=headers)
        assert response.status_code == 200, content_type
        await response.get_data()
    # an approval carries no body and needs no Content-Type
    approve = await client.post("/aura/hitl/approve/req_unknown", headers={**bearer(), "Content-Length": "0"})
    assert approve.status_code == 404
