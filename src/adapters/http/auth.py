"""Authentication of every protected route: Bearer JWT, then the X-Tenant-ID / X-User-ID rules."""

from __future__ import annotations

from collections.abc import Collection

from quart import Request

from domain.model.errors import AuthError
from domain.model.identity import Principal, resolve_principal
from domain.model.ports import TokenVerifier


class RequestAuthenticator:
    def __init__(self, verifier: TokenVerifier, trusted_service_roles: Collection[str]) -> None:
        self._verifier = verifier
        self._trusted = frozenset(trusted_service_roles)

    @staticmethod
    def bearer_token(request: Request) -> str:
        header = single_header(request, "Authorization")
        if header is None:
            raise AuthError("missing_token", "An Authorization: Bearer <token> header is required.")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("malformed_token", "The Authorization header must be 'Bearer <token>'.")
        return token.strip()

    def authenticate(self, request: Request, token: str | None = None) -> Principal:
        claims = self._verifier.verify(self.bearer_token(request) if token is None else token)
        return resolve_principal(
            claims,
            tenant_header=single_header(request, "X-Tenant-ID"),
            user_header=single_header(request, "X-User-ID"),
            trusted_service_roles=self._trusted,
        )


def single_header(request: Request, name: str) -> str | None:
    """The header's value; AuthError 400 `conflicting_headers` when it is sent more than once with
    different values (a proxy or backend that reads the last one would act for someone else than
    Aura, which would read the first)."""
    values = request.headers.getlist(name)
    if any(value != values[0] for value in values[1:]):
        raise AuthError("conflicting_headers", f"{name} is sent more than once with different values.", status=400)
    return values[0] if values else None


def forget_authorization(request: Request) -> None:
    """Drop the Authorization header from the request once its token is verified and kept.

    Quart's headers and the ASGI scope each hold a copy for as long as the response lives, which for
    a stream waiting on an approval is minutes to hours (and a DWP token is often a kilobyte): the
    run's request keeps the one copy its tools forward, and nothing later can log the header."""
    request.headers.pop("Authorization", None)
    scope = request.scope
    scope["headers"] = [header for header in scope["headers"] if header[0].lower() != b"authorization"]
