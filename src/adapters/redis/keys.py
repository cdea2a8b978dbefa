"""Ids placed in Redis keys.

Tenant, user, thread and idempotency ids come from callers and may contain ':' (the separator of
Aura's key names) or any other character: `tenant "a:b", user "c"` and `tenant "a", user "b:c"`
must not name the same key. Each id is percent-encoded; ids made only of letters, digits and
`-._~` (every id Aura generates) are left as they are, so keys stay readable."""

from __future__ import annotations

from urllib.parse import quote


def key_part(value: str) -> str:
    """`value` as one unambiguous segment of a Redis key name."""
    return quote(value, safe="")
