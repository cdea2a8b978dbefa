"""The service's front door: GET / points to the console and the API docs, and the docs page's
Swagger UI assets are served by Aura itself (from the swagger-ui-py package), so /docs works
without reaching a CDN."""

from __future__ import annotations

import asyncio
from pathlib import Path

import swagger_ui
from quart import Blueprint, Response, request
from quart_schema import hide

from adapters.http.problems import Problem
from adapters.http.web import json_response

bp = Blueprint("docs", __name__)

SWAGGER_UI_DIR = Path(swagger_ui.__file__).resolve().parent / "static"
# relative to /docs, so the page also works behind the gateway's /api prefix
SWAGGER_JS_URL = "docs/assets/swagger-ui-bundle.js"
SWAGGER_CSS_URL = "docs/assets/swagger-ui.css"
_ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8"}
_LINKS = {"console": "aura/console", "docs": "docs", "openapi": "openapi.json",
          "events": "aura/schema/events.json", "health": "health"}


@bp.get("/")
async def index() -> Response:
    """Where to go from here: a page for a browser, links as JSON for anything else."""
    if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
        items = "".join(f'<li><a href="{href}">{name}</a></li>' for name, href in _LINKS.items())
        page = (f"<!doctype html><html lang=en><meta charset=utf-8><title>Aura</title>"
                f"<h1>Aura</h1><p>The agent service of the DWP.</p><ul>{items}</ul></html>")
        return Response(page, content_type="text/html; charset=utf-8")
    return json_response({"service": "aura", "links": {name: f"/{href}" for name, href in _LINKS.items()}})


@bp.get("/docs/assets/<name>")
@hide
async def swagger_asset(name: str) -> Response:
    content_type = _ASSETS.get(name)
    if content_type is None:
        raise Problem(404, "not_found", "The docs page has no such file.")
    body = await asyncio.to_thread((SWAGGER_UI_DIR / name).read_bytes)
    return Response(body, content_type=content_type, headers={"Cache-Control": "public, max-age=86400"})
