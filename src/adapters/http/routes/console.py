"""The Aura console: a static, framework-free page for trying runs and approvals in a browser.

The page and its assets need no authentication (they hold no data); every API call the page makes
carries the bearer token the user pastes. In dev mode the page may also ask for a dev token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, Response
from quart_schema import document_request, hide

from adapters.http.bodies import optional_body
from adapters.http.problems import Problem

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"

# The only files served, so no request path can reach anything else on disk.
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "aura-client.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}

# Same-origin scripts, styles and fetches only: no inline code, no third party, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Small files that change with every deploy: revalidate instead of serving a stale console.
    "Cache-Control": "no-cache",
}
_IDENTIFIER = r"^[A-Za-z0-9_.@:\-]{1,128}$"

DEV_USER, DEV_TENANT = "dev-user", "dev-tenant"


@dataclass(frozen=True)
class ConsoleConfig:
    """What the console may offer. `mint_dev_token(user, tenant, role)` returns a signed token; it
    is None whenever tokens must not be minted (always outside dev mode). `withheld_roles` are never
    minted: roles that act for other users (trusted services) or decide their approvals (approvers)."""

    dev_mode: bool
    mint_dev_token: Callable[[str, str, str | None], str] | None
    withheld_roles: frozenset[str] = frozenset()

    @property
    def can_mint(self) -> bool:
        return self.dev_mode and self.mint_dev_token is not None


class DevTokenRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    user: str = Field(DEV_USER, pattern=_IDENTIFIER, description="The token's `sub`.")
    tenant: str = Field(DEV_TENANT, pattern=_IDENTIFIER, description="The token's `tenant_id`.")
    role: str | None = Field(None, pattern=_IDENTIFIER,
                             description="The token's `role`, or null for none; never a trusted-service or "
                                         "approver role (403 `role_not_mintable`).")


# Kept here rather than as a file: setuptools packages only the console's *.html, *.js and *.css.
FAVICON = "favicon.svg"
FAVICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    '<rect width="32" height="32" rx="7" fill="#16202c"/>'
    '<path d="M9 25 16 7l7 18M11.6 19h8.8" fill="none" stroke="#f0a500" stroke-width="3" stroke-linejoin="round"/>'
    "</svg>"
)


async def _asset(name: str) -> Response:
    if name == FAVICON:
        return Response(FAVICON_SVG, status=200, content_type="image/svg+xml", headers=_SECURITY_HEADERS)
    content_type = ASSETS.get(name)
    if content_type is None:
        raise Problem(404, "not_found", "The console has no such file.")
    body = await asyncio.to_thread((CONSOLE_DIR / name).read_bytes)
    return Response(body, status=200, content_type=content_type, headers=_SECURITY_HEADERS)


def blueprint(config: Callable[[], ConsoleConfig]) -> Blueprint:
    """The console's page, assets and dev-token routes, given the console settings' provider."""
    bp = Blueprint("console", __name__)

    @bp.get("/aura/console")
    @hide
    async def page() -> Response:
        """The console page."""
        return await _asset("index.html")

    @bp.get("/aura/console/")
    @hide
    async def page_with_slash() -> Response:
        # A relative Location keeps working behind the gateway's /api prefix; the page's relative
        # asset URLs only resolve from /aura/console itself.
        return Response("", status=308, headers={"Location": "../console"})

    @bp.get("/aura/console/<name>")
    @hide
    async def asset(name: str) -> Response:
        """The console's scripts and styles."""
        return await _asset(name)

    @bp.get("/aura/console/config")
    async def console_config() -> dict[str, Any]:
        """What the console page may offer: `devMode` is true when it may mint dev tokens."""
        return {"devMode": config().can_mint}

    @bp.post("/aura/console/dev-token")
    @document_request(DevTokenRequest)
    async def dev_token() -> tuple[dict[str, Any], int, dict[str, str]]:
        """Mint a short-lived token for the console. Dev mode only: 404 otherwise."""
        return await _dev_token(config())


    return bp


async def _dev_token(config: ConsoleConfig) -> tuple[dict[str, Any], int, dict[str, str]]:
    if not config.can_mint or config.mint_dev_token is None:
        raise Problem(404, "not_found", "Dev tokens are only minted when Aura runs in dev mode.")
    wanted = await optional_body(DevTokenRequest)
    if wanted.role is not None and wanted.role in config.withheld_roles:
        raise Problem(403, "role_not_mintable", f"Dev tokens never carry the role {wanted.role!r}: it acts "
                      "for other users or decides their approvals.")
    token = config.mint_dev_token(wanted.user, wanted.tenant, wanted.role)
    body = {"token": token, "tokenType": "Bearer", "user": wanted.user, "tenant": wanted.tenant, "role": wanted.role}
    # A token is a credential: never cached by the browser or anything in between.
    return body, 200, {"Cache-Control": "no-store"}
