"""Ids containing ':' (or any other character) never make two tenants or users share a key."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from adapters.redis.keys import key_part
from domain.model.runs import RunRecord
from tests.defaults import run_directory

# Pairs of (tenant, user) that joined with ':' spell the same text.
COLLIDING = [(("a:b", "c"), ("a", "b:c")), (("acme", "bob:x"), ("acme:bob", "x")), (("t%3Au", "v"), ("t:u", "v"))]


def record(run_id: str, tenant: str, user: str) -> RunRecord:
    return RunRecord(run_id=run_id, session_id=f"ses_{run_id}", thread_id=f"thr_{run_id}", trace_id="t" * 32,
                     tenant_id=tenant, user_id=user, instance_id="aura-a", created_at=1767000000000)


@pytest.mark.parametrize(("first", "second"), COLLIDING)
async def test_run_slots_are_counted_per_real_tenant_and_user(
        redis_client: Redis, first: tuple[str, str], second: tuple[str, str]) -> None:
    directory = run_directory(redis_client)

    assert await directory.admit(record("run_1", *first), user_limit=1, tenant_limit=1, slot_seconds=60,
                                 lease_seconds=15) is None
    # keys built by plain concatenation would give the second pair the first's slots: 429 for nothing
    assert await directory.admit(record("run_2", *second), user_limit=1, tenant_limit=1, slot_seconds=60,
                                 lease_seconds=15) is None


@pytest.mark.parametrize(("first", "second"), COLLIDING)
async def test_idempotency_keys_are_per_real_tenant_and_user(
        redis_client: Redis, first: tuple[str, str], second: tuple[str, str]) -> None:
    directory = run_directory(redis_client)

    assert await directory.claim_idempotency(*first, "key-1", "run_1", "f1", 60) is None
    # keys built by plain concatenation would attach the second caller to the first caller's run
    assert await directory.claim_idempotency(*second, "key-1", "run_2", "f2", 60) is None
    claim = await directory.claim_idempotency(*first, "key-1", "run_3", "f1", 60)
    assert claim is not None and claim.run_id == "run_1"


def test_generated_ids_stay_readable_in_keys() -> None:
    assert key_part("run_0123abc-DEF.x~y") == "run_0123abc-DEF.x~y"
    assert key_part("a:b") == "a%3Ab" and key_part("a%3Ab") == "a%253Ab"
