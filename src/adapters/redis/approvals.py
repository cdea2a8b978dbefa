"""Approval requests in Redis, in the exact layout the DWP backend reads (contract section 4).

Keys:
- `hitl:request:{requestId}`  the domain's request record as compact UTF-8 JSON, TTL 1800 s;
- `hitl:session:{sessionId}`  the session record (which request is pending), TTL 3600 s;
- `aura:hitl:pending:{tenant}:{user}`  Aura's own sorted set of the user's pending request ids
  (score `createdAt`), so consoles can list them without scanning; tenant and user are
  percent-encoded so that ids containing `:` can never collide. Its TTL is pushed to the request
  TTL on every create, so it never outlives the newest request it names.

Decisions are compare-and-set with WATCH/MULTI and the JSON is written from Python: a Lua script
would have to round-trip the record through cjson, which turns `{}` into `[]` and reformats large
numbers, and the record must stay byte-for-byte what `ApprovalRequest.to_record()` says.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from domain.approval import ApprovalRequest, ApprovalStatus, DecisionResult
from domain.errors import StoreUnavailable
from domain.ports import ApprovalStore

_log = logging.getLogger(__name__)

DEFAULT_REQUEST_TTL_SECONDS = 1800
DEFAULT_SESSION_TTL_SECONDS = 3600
# Each failed attempt means another writer changed the request or its session in between; the
# next attempt then normally sees the decided state and stops. This only bounds a pathology.
MAX_DECIDE_ATTEMPTS = 32


def request_key(request_id: str) -> str:
    return f"hitl:request:{request_id}"


def session_key(session_id: str) -> str:
    return f"hitl:session:{session_id}"


def pending_index_key(tenant_id: str, user_id: str) -> str:
    return f"aura:hitl:pending:{quote(tenant_id, safe='')}:{quote(user_id, safe='')}"


def encode_json(record: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON, the same form as `Signal.to_json()`."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _decode_request(raw: bytes | str, key: str) -> ApprovalRequest | None:
    try:
        record = json.loads(raw)
        return ApprovalRequest.from_record(record)
    except (ValueError, KeyError, TypeError) as exc:
        # Someone else wrote this key; treat it as absent rather than guess, but say so.
        _log.warning("unreadable approval record at %s: %s", key, exc)
        return None


def _as_text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class RedisApprovalStore(ApprovalStore):
    def __init__(
        self,
        redis: Redis,
        *,
        request_ttl_seconds: int = DEFAULT_REQUEST_TTL_SECONDS,
        session_ttl_seconds: int = DEFAULT_SESSION_TTL_SECONDS,
    ) -> None:
        self._redis = redis
        self._request_ttl_seconds = request_ttl_seconds
        self._session_ttl_seconds = session_ttl_seconds

    async def create(self, request: ApprovalRequest) -> None:
        index_key = pending_index_key(request.tenant_id, request.user_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(
                    request_key(request.request_id), encode_json(request.to_record()), ex=self._request_ttl_seconds
                )
                pipe.set(
                    session_key(request.session_id), encode_json(request.session_record()), ex=self._session_ttl_seconds
                )
                if request.status is ApprovalStatus.PENDING:
                    pipe.zadd(index_key, {request.request_id: request.created_at})
                    pipe.expire(index_key, self._request_ttl_seconds)
                await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc

    async def get(self, request_id: str) -> ApprovalRequest | None:
        key = request_key(request_id)
        try:
            raw = await self._redis.get(key)
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc
        return None if raw is None else _decode_request(raw, key)

    async def pending_for_user(self, tenant_id: str, user_id: str) -> list[ApprovalRequest]:
        index_key = pending_index_key(tenant_id, user_id)
        try:
            members = await self._redis.zrange(index_key, 0, -1)
            ids = [_as_text(member) for member in members if isinstance(member, bytes | str)]
            if not ids:
                return []
            raws = await self._redis.mget([request_key(request_id) for request_id in ids])
            pending: list[ApprovalRequest] = []
            stale: list[str] = []
            for request_id, raw in zip(ids, raws, strict=True):
                request = None if raw is None else _decode_request(raw, request_key(request_id))
                if request is None or request.status.is_decided:
                    stale.append(request_id)
                elif request.tenant_id == tenant_id and request.user_id == user_id:
                    pending.append(request)
            if stale:
                await self._redis.zrem(index_key, *stale)
            return pending
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc

    async def decide(
        self,
        request_id: str,
        status: ApprovalStatus,
        *,
        decided_by: str | None,
        decided_at: int,
        reason: str | None,
    ) -> DecisionResult | None:
        if not status.is_decided:
            raise ValueError("a decision must leave the pending state")
        try:
            for _ in range(MAX_DECIDE_ATTEMPTS):
                try:
                    return await self._try_decide(request_id, status, decided_by, decided_at, reason)
                except WatchError:
                    continue
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc
        raise StoreUnavailable(f"approval {request_id} is changing too often to decide")

    async def _try_decide(
        self,
        request_id: str,
        status: ApprovalStatus,
        decided_by: str | None,
        decided_at: int,
        reason: str | None,
    ) -> DecisionResult | None:
        """One optimistic attempt; raises WatchError when another writer got in between."""
        key = request_key(request_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            raw = await pipe.get(key)
            current = None if raw is None else _decode_request(raw, key)
            if current is None:
                return None
            if current.status.is_decided:
                return DecisionResult(applied=False, request=current)
            decided = current.decide(status, by=decided_by, at=decided_at, reason=reason)

            # The session points at its latest request; only update it while it still points here.
            sess_key = session_key(current.session_id)
            await pipe.watch(sess_key)
            session_raw = await pipe.get(sess_key)
            session_update = (
                None if session_raw is None else _session_with_status(session_raw, request_id, decided.status, sess_key)
            )

            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            # XX: never resurrect a key that expired after WATCH; KEEPTTL: the decision does not
            # extend the request's life.
            pipe.set(key, encode_json(decided.to_record()), xx=True, keepttl=True)
            if session_update is not None:
                pipe.set(sess_key, session_update, xx=True, keepttl=True)
            pipe.zrem(pending_index_key(current.tenant_id, current.user_id), request_id)
            request_written = (await pipe.execute())[0]
        if not request_written:
            return None  # expired between our read and the write: there is nothing to decide
        return DecisionResult(applied=True, request=decided)


def _session_with_status(raw: bytes | str, request_id: str, status: ApprovalStatus, key: str) -> bytes | None:
    """The session record with its status replaced (other fields kept as they are), or None when
    it no longer refers to this request or cannot be read."""
    try:
        record = json.loads(raw)
    except ValueError as exc:
        _log.warning("unreadable session record at %s: %s", key, exc)
        return None
    if not isinstance(record, dict) or record.get("requestId") != request_id:
        return None
    record["status"] = status.value
    return encode_json(record)
