"""Approval requests in Redis, in the exact layout the DWP backend reads (contract section 4).

Keys:
- `hitl:request:{requestId}`  the domain's request record as compact UTF-8 JSON, TTL 1800 s;
- `hitl:session:{sessionId}`  the session record (which request is pending), TTL 3600 s;
- `aura:hitl:pending:{tenant}:{user}`  Aura's own sorted set of the user's pending request ids
  (score `createdAt`), so consoles can list them without scanning; tenant and user are
  percent-encoded so that ids containing `:` can never collide. Its TTL is pushed to the request
  TTL on every create, so it never outlives the newest request it names.

A decision is one round trip: a Lua script (`_DECIDE`, loaded once, run by EVALSHA) compares the
request's current bytes with the bytes the caller read (or created) and, only when they are equal,
writes the decided request and session records (XX, KEEPTTL), removes the request from the pending
index and, for a decision with a signal, stores and publishes that signal (`hitl:signal:*` with its
TTL, `hitl:channel:*`, exactly as `RedisSignalBus.publish` does). Python computes every new record;
Lua only compares and copies bytes: decoding and re-encoding with cjson would turn `{}` into `[]`
and reformat large numbers, and the records must stay byte-for-byte what `to_record()` says. The
session record is updated only while it is still exactly the pending record Aura wrote for this
request (a session that moved on to a later request is left alone).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from redis.asyncio import Redis
from redis.exceptions import RedisError

from adapters.redis.client import LuaScript, arg, pack, raise_error, shared_connection
from adapters.redis.signals import DEFAULT_SIGNAL_TTL_SECONDS, channel_name, signal_key
from domain.approval import ApprovalRequest, ApprovalStatus, DecisionResult, Signal, StoredApproval
from domain.errors import StoreUnavailable
from domain.ports import ApprovalStore

_log = logging.getLogger(__name__)

DEFAULT_REQUEST_TTL_SECONDS = 1800
DEFAULT_SESSION_TTL_SECONDS = 3600
# A failed compare means another writer changed the request in between; the reply then carries
# the new bytes, which are normally decided, and the loop stops. This only bounds a pathology.
MAX_DECIDE_ATTEMPTS = 32

# KEYS: request, session, pending index[, signal]
# ARGV: expected request bytes, decided request bytes, expected session bytes, decided session
#       bytes, request id[, signal bytes, signal TTL, channel]
# Reply: 0 when the request does not exist; its current bytes when they are not the expected
# ones (nothing written); 1 when decided (and signalled); 2 when decided but the signal part
# failed (the decision stands: writes of a script are never rolled back, and pcall keeps going).
_DECIDE = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if current ~= ARGV[1] then return current end
redis.call('SET', KEYS[1], ARGV[2], 'XX', 'KEEPTTL')
if redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('SET', KEYS[2], ARGV[4], 'XX', 'KEEPTTL')
end
redis.call('ZREM', KEYS[3], ARGV[5])
if #KEYS < 4 then return 1 end
local stored = redis.pcall('SET', KEYS[4], ARGV[6], 'EX', ARGV[7])
if type(stored) == 'table' and stored.err then return 2 end
local published = redis.pcall('PUBLISH', ARGV[8], ARGV[6])
if type(published) == 'table' and published.err then return 2 end
return 1
"""
_DECIDED = 1
_DECIDED_SIGNAL_FAILED = 2


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
        signal_ttl_seconds: int = DEFAULT_SIGNAL_TTL_SECONDS,
    ) -> None:
        self._redis = redis
        # An approval's creation, read and decision are on the approval's path (a run parking, a
        # POST deciding): they go through the client's shared connection.
        self._shared = shared_connection(redis)
        self._request_ttl_seconds = request_ttl_seconds
        self._session_ttl_seconds = session_ttl_seconds
        self._signal_ttl_seconds = signal_ttl_seconds
        # EVALSHA, with the body once when the server does not know the script yet.
        self._decide_script = LuaScript.of(_DECIDE)

    async def create(self, request: ApprovalRequest) -> StoredApproval:
        index_key = pending_index_key(request.tenant_id, request.user_id)
        record = encode_json(request.to_record())
        try:
            commands = [
                pack(b"SET", request_key(request.request_id).encode(), record, b"EX", arg(self._request_ttl_seconds)),
                pack(b"SET", session_key(request.session_id).encode(), encode_json(request.session_record()),
                     b"EX", arg(self._session_ttl_seconds)),
            ]
            if request.status is ApprovalStatus.PENDING:
                commands.append(pack(b"ZADD", index_key.encode(), arg(request.created_at),
                                     request.request_id.encode()))
                commands.append(pack(b"EXPIRE", index_key.encode(), arg(self._request_ttl_seconds)))
            await self._shared.transaction(*commands)
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc
        return StoredApproval(request, record)

    async def get(self, request_id: str) -> ApprovalRequest | None:
        stored = await self.read(request_id)
        return None if stored is None else stored.request

    async def read(self, request_id: str) -> StoredApproval | None:
        key = request_key(request_id)
        try:
            (raw,) = await self._shared.execute(pack(b"GET", key.encode()), 1)
            raise_error(raw)
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc
        return None if raw is None else _stored(raw, key)

    async def get_many(self, request_ids: Sequence[str]) -> list[ApprovalRequest | None]:
        if not request_ids:
            return []
        keys = [request_key(request_id) for request_id in request_ids]
        try:
            raws = await self._redis.mget(keys)
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc
        return [None if raw is None else _decode_request(raw, key) for key, raw in zip(keys, raws, strict=True)]

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
        expected: StoredApproval | None = None,
        signal: Signal | None = None,
    ) -> DecisionResult | None:
        if not status.is_decided:
            raise ValueError("a decision must leave the pending state")
        if expected is not None and expected.request.request_id != request_id:
            raise ValueError(f"expected a record of {request_id}, got {expected.request.request_id}")
        seen = expected if expected is not None else await self.read(request_id)
        key = request_key(request_id)
        try:
            for _ in range(MAX_DECIDE_ATTEMPTS):
                if seen is None:
                    return None
                current = seen.request
                if current.status.is_decided:
                    return DecisionResult(applied=False, request=current)
                decided = current.decide(status, by=decided_by, at=decided_at, reason=reason)
                keys = [key, session_key(current.session_id), pending_index_key(current.tenant_id, current.user_id)]
                args: list[bytes | str | int] = [
                    seen.version,
                    encode_json(decided.to_record()),
                    encode_json(current.session_record()),
                    encode_json(decided.session_record()),
                    request_id,
                ]
                if signal is not None:
                    keys.append(signal_key(current.session_id))
                    args += [signal.to_json().encode("utf-8"), self._signal_ttl_seconds,
                             channel_name(current.session_id)]
                reply = await self._decide_script.run(self._shared, keys, args)
                if isinstance(reply, bytes | str):
                    seen = _stored(reply, key)  # changed since it was read: decide on what is there now
                    continue
                if not reply:
                    return None  # expired (or deleted) since it was read: there is nothing to decide
                if signal is not None and reply == _DECIDED_SIGNAL_FAILED:
                    _log.warning("decided %s but could not store or publish its signal", request_id)
                return DecisionResult(applied=True, request=decided,
                                      signalled=signal is not None and reply == _DECIDED)
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc
        raise StoreUnavailable(f"approval {request_id} is changing too often to decide")


def _stored(raw: bytes | str, key: str) -> StoredApproval | None:
    request = _decode_request(raw, key)
    return None if request is None else StoredApproval(request, raw.encode("utf-8") if isinstance(raw, str) else raw)
