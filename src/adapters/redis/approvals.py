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

A decision without `expected` (the API's, the waiting run's) is one round trip without a read
first: `_DECIDE_IN_PLACE` checks that the request is pending and, with a `decider`, what
`Decider.may_decide` checks in Python (same tenant, the request's own user or an approver, not
expired at the decision's time), and builds the decided
record from the stored bytes by replacing exactly the parts a decision changes: the top-level
`"status"` (the last `,"status":"pending","userId":` of the record; everything after it is plain
strings and numbers, whose quotes are escaped) and the `"decidedAt":null,"decidedBy":null,
"reason":null}` tail, with values Python encoded. The result is the same bytes as `to_record()` of
the decided request; a record that is not in that layout (written by someone else) makes the
script answer with the stored bytes, and Python decides on them as above. The script derives the
session, pending-index, signal and channel keys from the record (so it is for a single Redis, not
a cluster, which is what the contract describes).
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
from adapters.redis.durability import ReplicaConfirmation
from adapters.redis.signals import (
    CHANNEL_PREFIX,
    DEFAULT_SIGNAL_TTL_SECONDS,
    SIGNAL_KEY_PREFIX,
    channel_name,
    signal_key,
)
from domain.model.approval import ApprovalRequest, ApprovalStatus, Decider, DecisionResult, Signal, StoredApproval
from domain.model.errors import StoreUnavailable
from domain.model.ports import ApprovalStore

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

SESSION_KEY_PREFIX = "hitl:session:"
PENDING_INDEX_PREFIX = "aura:hitl:pending:"
_PENDING_TAIL = ',"decidedAt":null,"decidedBy":null,"reason":null}'
_PENDING_STATUS = ',"status":"pending","userId":'

# KEYS: request
# ARGV: 1 decider tenant, 2 decider user, 3 '1' when the decider is an approver, '0' when not,
#       '-' for no decider (only "still pending" is checked), 4 decidedAt,
#       5 status, 6 decidedBy as JSON, 7 reason as JSON, 8 request id, 9 session key prefix,
#       10 pending index prefix[, 11 signal bytes, 12 signal TTL, 13 signal key prefix,
#       14 channel prefix]
# Reply: 0 when the request does not exist; its current bytes when the decider may not decide it
# now (or it is not in Aura's layout); {1 or 2 (as _DECIDE), the decided bytes} when decided.
_DECIDE_IN_PLACE = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local ok, record = pcall(cjson.decode, current)
if not ok or type(record) ~= 'table' or type(record.expiresAt) ~= 'number' then return current end
if record.status ~= 'pending' or type(record.sessionId) ~= 'string' or type(record.userId) ~= 'string'
    or type(record.tenantId) ~= 'string' then
  return current
end
if ARGV[3] ~= '-' and (record.tenantId ~= ARGV[1] or (ARGV[3] ~= '1' and record.userId ~= ARGV[2])
    or tonumber(ARGV[4]) >= record.expiresAt) then
  return current
end
local tail = '""" + _PENDING_TAIL + """'
local status = '""" + _PENDING_STATUS + """'
if string.sub(current, -#tail) ~= tail then return current end
local last, from = nil, 1
while true do
  local found = string.find(current, status, from, true)
  if not found then break end
  last, from = found, found + 1
end
if not last then return current end
local decided = string.sub(current, 1, last - 1) .. ',"status":"' .. ARGV[5] .. '","userId":'
  .. string.sub(current, last + #status, -#tail - 1)
  .. ',"decidedAt":' .. ARGV[4] .. ',"decidedBy":' .. ARGV[6] .. ',"reason":' .. ARGV[7] .. '}'
local check_ok, check = pcall(cjson.decode, decided)
if not check_ok or check.status ~= ARGV[5] then return current end
redis.call('SET', KEYS[1], decided, 'XX', 'KEEPTTL')
local session_key = ARGV[9] .. record.sessionId
local session = redis.call('GET', session_key)
local pending = ',"status":"pending"}'
if session and string.sub(session, -#pending) == pending then
  local s_ok, s = pcall(cjson.decode, session)
  if s_ok and type(s) == 'table' and s.requestId == ARGV[8] and s.status == 'pending' then
    redis.call('SET', session_key, string.sub(session, 1, -#pending - 1) .. ',"status":"' .. ARGV[5] .. '"}',
      'XX', 'KEEPTTL')
  end
end
local function quote(text)
  return (string.gsub(text, '[^%w_%.%-~]', function(c) return string.format('%%%02X', string.byte(c)) end))
end
redis.call('ZREM', ARGV[10] .. quote(record.tenantId) .. ':' .. quote(record.userId), ARGV[8])
if #ARGV < 11 then return {1, decided} end
local stored = redis.pcall('SET', ARGV[13] .. record.sessionId, ARGV[11], 'EX', ARGV[12])
if type(stored) == 'table' and stored.err then return {2, decided} end
local published = redis.pcall('PUBLISH', ARGV[14] .. record.sessionId, ARGV[11])
if type(published) == 'table' and published.err then return {2, decided} end
return {1, decided}
"""


def request_key(request_id: str) -> str:
    return f"hitl:request:{request_id}"


def session_key(session_id: str) -> str:
    return SESSION_KEY_PREFIX + session_id


def pending_index_key(tenant_id: str, user_id: str) -> str:
    return f"{PENDING_INDEX_PREFIX}{quote(tenant_id, safe='')}:{quote(user_id, safe='')}"


def encode_json(record: Mapping[str, Any] | str | None) -> bytes:
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
        confirmation: ReplicaConfirmation | None = None,
    ) -> None:
        self._redis = redis
        # A decision is reported applied only once this many replicas hold it.
        self._confirmation = confirmation
        # An approval's creation, read and decision are on the approval's path (a run parking, a
        # POST deciding): they go through the client's shared connection.
        self._shared = shared_connection(redis)
        self._request_ttl_seconds = request_ttl_seconds
        self._session_ttl_seconds = session_ttl_seconds
        self._signal_ttl_seconds = signal_ttl_seconds
        # EVALSHA, with the body once when the server does not know the script yet.
        self._decide_script = LuaScript.of(_DECIDE)
        self._decide_in_place_script = LuaScript.of(_DECIDE_IN_PLACE)

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
        decider: Decider | None = None,
    ) -> DecisionResult | None:
        if not status.is_decided:
            raise ValueError("a decision must leave the pending state")
        if expected is not None and expected.request.request_id != request_id:
            raise ValueError(f"expected a record of {request_id}, got {expected.request.request_id}")
        key = request_key(request_id)
        if expected is None:
            outcome = await self._decide_in_place(key, request_id, status, decider, decided_at, decided_by, reason,
                                                  signal)
            if not isinstance(outcome, StoredApproval | None):
                return outcome
            seen: StoredApproval | None = outcome  # refused, or not in Aura's layout: the loop tells which
        else:
            seen = expected
        try:
            for _ in range(MAX_DECIDE_ATTEMPTS):
                if seen is None:
                    return None
                current = seen.request
                if current.status.is_decided or (decider is not None and not decider.may_decide(current, decided_at)):
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
                await self._confirm()
                return DecisionResult(applied=True, request=decided,
                                      signalled=signal is not None and reply == _DECIDED)
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc
        raise StoreUnavailable(f"approval {request_id} is changing too often to decide")

    async def _decide_in_place(self, key: str, request_id: str, status: ApprovalStatus, decider: Decider | None,
                               decided_at: int, decided_by: str | None, reason: str | None,
                               signal: Signal | None) -> DecisionResult | StoredApproval | None:
        """One round trip: the decision when the script applied it; otherwise the request as stored
        (None when absent or unreadable), which the caller's loop refuses by the same rules or, when
        only its layout stopped the script, decides on."""
        mode = "-" if decider is None else "1" if decider.approver else "0"
        args: list[bytes | str | int] = [
            "" if decider is None else decider.tenant_id, "" if decider is None else decider.user_id, mode,
            decided_at, status.value,
            encode_json(decided_by), encode_json(reason), request_id, SESSION_KEY_PREFIX, PENDING_INDEX_PREFIX,
        ]
        if signal is not None:
            args += [signal.to_json().encode("utf-8"), self._signal_ttl_seconds, SIGNAL_KEY_PREFIX, CHANNEL_PREFIX]
        try:
            reply = await self._decide_in_place_script.run(self._shared, [key], args)
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc
        if isinstance(reply, list):
            code, raw = reply
            decided = _decode_request(raw, key)
            if decided is None:  # cannot be: the script checked that it decodes
                raise StoreUnavailable(f"approval {request_id} was decided into an unreadable record")
            if signal is not None and code == _DECIDED_SIGNAL_FAILED:
                _log.warning("decided %s but could not store or publish its signal", request_id)
            try:
                await self._confirm()
            except RedisError as exc:
                raise StoreUnavailable("the approval store is unavailable") from exc
            return DecisionResult(applied=True, request=decided, signalled=signal is not None and code == _DECIDED)
        if not reply:
            return None
        return _stored(reply, key)

    async def _confirm(self) -> None:
        """Wait until the replicas hold the decision just written (on the shared connection, like
        every write before it), or raise `ReplicasDidNotConfirm`: a decision a failover could revert
        is not reported applied, so the caller answers a retryable error instead of 200."""
        if self._confirmation is not None:
            (reply,) = await self._shared.execute(self._confirmation.command(), 1)
            self._confirmation.check(reply)


def _stored(raw: bytes | str, key: str) -> StoredApproval | None:
    request = _decode_request(raw, key)
    return None if request is None else StoredApproval(request, raw.encode("utf-8") if isinstance(raw, str) else raw)
