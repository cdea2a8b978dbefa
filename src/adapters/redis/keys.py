"""Ids placed in Redis keys, and the hash tags that keep related keys in one cluster slot.

Tenant, user, thread and idempotency ids come from callers and may contain ':' (the separator of
Aura's key names) or any other character: `tenant "a:b", user "c"` and `tenant "a", user "b:c"`
must not name the same key. Each id is percent-encoded; ids made only of letters, digits and
`-._~` (every id Aura generates) are left as they are, so keys stay readable. Percent-encoding
also encodes `{` and `}`, so an id can never open or close a hash tag of its own.

Hash tags (`{…}`): on a Redis Cluster a key's slot is the hash of its tag alone, so every key of a
run (`aura:run:{<runId>}:…`) lives in one slot and each of a run's atomic steps is a single-slot
script; a tenant's concurrency counters share the tag `{<tenant>}`, a user's conversation keys and
start counters the tag `{<tenant>:<user>}`. On a single server the braces are just characters."""

from __future__ import annotations

from urllib.parse import quote


def key_part(value: str) -> str:
    """`value` as one unambiguous segment of a Redis key name."""
    return quote(value, safe="")


def run_key(run_id: str, part: str) -> str:
    """One of a run's keys: `aura:run:{<runId>}:<part>`, all in the run's slot."""
    return f"aura:run:{{{key_part(run_id)}}}:{part}"


def user_tag(tenant_id: str, user_id: str) -> str:
    """The hash tag of one user's keys: `{<tenant>:<user>}` (both percent-encoded)."""
    return f"{{{key_part(tenant_id)}:{key_part(user_id)}}}"


def tenant_tag(tenant_id: str) -> str:
    """The hash tag of one tenant's keys: `{<tenant>}` (percent-encoded)."""
    return f"{{{key_part(tenant_id)}}}"
