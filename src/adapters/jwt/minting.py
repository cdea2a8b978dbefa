"""Minting tokens the way the DWP backend does: for the `aura token` command line and for tests."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from jose import jwt

from adapters.jwt.verifier import SUPPORTED_ALGORITHMS

# Claims set from the named arguments; `extra` may not override them behind the caller's back.
_RESERVED_CLAIMS = frozenset({"sub", "tenant_id", "exp", "iat", "role", "email", "iss", "aud"})


def mint_token(
    *,
    key: str,
    algorithm: str = "HS256",
    sub: str,
    tenant_id: str,
    role: str | None = None,
    email: str | None = None,
    ttl_seconds: int = 3600,
    issuer: str | None = None,
    audience: str | None = None,
    extra: Mapping[str, Any] | None = None,
    now: int | None = None,
    key_id: str | None = None,
) -> str:
    """A signed compact JWT. `key` is the HS* secret or the RS* private key in PEM format.

    `iat` is `now` (default: the current time), `exp` is `now + ttl_seconds`; `key_id` becomes the
    `kid` header. Raises ValueError for an unsupported algorithm, a reserved claim in `extra`,
    empty `sub`/`tenant_id` or a non-positive TTL.
    """
    if algorithm not in SUPPORTED_ALGORITHMS:
        supported = sorted(SUPPORTED_ALGORITHMS)
        raise ValueError(f"unsupported JWT algorithm {algorithm!r}; supported: {supported}")
    if not sub.strip() or not tenant_id.strip():
        raise ValueError("sub and tenant_id must be non-empty")
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    overridden = sorted(_RESERVED_CLAIMS.intersection(extra or {}))
    if overridden:
        raise ValueError(f"extra must not set {overridden}; use the named arguments")

    issued_at = int(time.time()) if now is None else now
    claims: dict[str, Any] = dict(extra or {})
    claims.update(sub=sub, tenant_id=tenant_id, iat=issued_at, exp=issued_at + ttl_seconds)
    optional = {"role": role, "email": email, "iss": issuer, "aud": audience}
    claims.update({name: value for name, value in optional.items() if value is not None})
    headers = None if key_id is None else {"kid": key_id}
    token: str = jwt.encode(claims, key, algorithm=algorithm, headers=headers)
    return token
