"""Who is calling: verified token claims and the header rules of contract section 2."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from domain.model.errors import AuthError


@dataclass(frozen=True, slots=True)
class Claims:
    """Claims of a token whose signature, algorithm, expiry, issuer and audience were verified."""

    sub: str
    tenant_id: str
    exp: int
    iat: int | None = None
    email: str | None = None
    role: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Principal:
    """The effective user of a request. `actor_id` differs from `user_id` only when a trusted
    service (the DWP backend) acts on behalf of a user through `X-User-ID`."""

    user_id: str
    tenant_id: str
    actor_id: str
    role: str | None = None
    email: str | None = None

    @property
    def is_delegated(self) -> bool:
        return self.actor_id != self.user_id


def resolve_principal(
    claims: Claims,
    *,
    tenant_header: str | None,
    user_header: str | None,
    trusted_service_roles: Collection[str],
) -> Principal:
    """Apply the X-Tenant-ID / X-User-ID rules. The token's tenant always wins; a header may only
    confirm it. Only a trusted service role may name another user."""
    if tenant_header is not None and tenant_header != claims.tenant_id:
        raise AuthError("tenant_mismatch", "X-Tenant-ID does not match the token's tenant.", status=403)
    if user_header is not None and user_header != claims.sub:
        if claims.role is not None and claims.role in trusted_service_roles:
            if not user_header.strip():
                raise AuthError("invalid_user_header", "X-User-ID must not be empty.", status=403)
            return Principal(
                user_id=user_header,
                tenant_id=claims.tenant_id,
                actor_id=claims.sub,
                role=None,
                email=None,
            )
        raise AuthError("user_mismatch", "X-User-ID does not match the token's subject.", status=403)
    return Principal(
        user_id=claims.sub,
        tenant_id=claims.tenant_id,
        actor_id=claims.sub,
        role=claims.role,
        email=claims.email,
    )
