"""Approval requests in Redis, in the exact layout the DWP backend reads (contract section 4).

Keys:
- `hitl:request:{requestId}`  the domain's request record as compact UTF-8 JSON, TTL 1800 s;
- `hitl:session:{sessionId}`  the session record (which request is pending), TTL 3600 s;
- `aura:hitl:pending:{tenant}:{user}`  Aura's own sorted set of the user's request ids (score
  `createdAt`), so consoles can list the pending ones without scanning; tenant and user are
  percent-encoded so that ids containing `:` can never collide. Its TTL is pushed to the request
  TTL on every create, so it never outlives the newest request it names. It is trimmed lazily: a
  decision does not touch it (one command less per approval); listing reads the requests it names
  and drops the decided and vanished ones, and every `index_trim_every`-th create drops the
  entries older than the request TTL, so it stays bounded when nobody lists it.

A decision is two ordered steps. First the request alone (one key, so one slot on a cluster): a
Lua script compares the request's current bytes with the bytes the caller read (or created) and,
only when they are equal, writes the decided record (XX, KEEPTTL) — the decision's one point of
truth. Then, in one pipeline, the follow-ups, each idempotent. For a decision with a signal (the
API's): that signal stored and published (`hitl:signal:*` with its TTL, `hitl:channel:*`, exactly
as `RedisSignalBus.publish` does). On one server without replicas to confirm, the decision script
does that itself once it decided (one round trip for the decider, not two): it names the signal's
key from the request's `sessionId`, a key the caller cannot know before it read the request,
which a cluster could not allow (another slot) and a server does; a failure to store or publish
leaves the decision made and is reported as not signalled, like the pipeline's. Given the
signal sealed as one whose step wrote the session record too (the desk's `settled_signal`), the
script there also writes the session's decided record (XX KEEPTTL, what `settle_session` writes)
before it, and stores and publishes that signal: the waiting run then writes nothing (one round
trip less for it). Otherwise the session
record is written by the run that waited, when
it hears the decision (`settle_session`, one plain SET: while a run waits, its instance is the one
writer of its session record; what a late delivery of that SET can do is in its docstring), or,
when the run's instance stopped, by the lost-run sweep (a decision found already made runs the
follow-ups below). For a decision without one (the waiting run's own, on a timeout or
the DWP backend's signal; or an instance cancelling a run it does not own): the session record,
updated only while it is still exactly the pending record Aura wrote for this request (a
compare-and-set on that one key, so a late write can never overwrite the run's next request). A
crash between the two steps loses nothing: the decided request is what every waiting run re-reads
(the approval recheck), and a later decision attempt on the request finds it decided and runs the
follow-ups again. Python computes every new record; Lua only
compares and copies bytes: decoding and re-encoding with cjson would turn `{}` into `[]` and
reformat large numbers, and the records must stay byte-for-byte what `to_record()` says.

A decision without `expected` (the API's, the waiting run's) needs no read first:
`_DECIDE_IN_PLACE` checks that the request is pending and, with a `decider`, what
`Decider.may_decide` checks in Python (same tenant, the request's own user or an approver, not
expired at the decision's time), and builds the decided record from the stored bytes by replacing
exactly the parts a decision changes: the top-level `"status"` (the last
`,"status":"pending","userId":` of the record; everything after it is plain strings and numbers,
whose quotes are escaped) and the `"decidedAt":null,"decidedBy":null,"reason":null}` tail, with
values Python encoded. The result is the same bytes as `to_record()` of the decided request; a
record that is not in that layout (written by someone else) makes the script answer with the
stored bytes, and Python decides on them as above.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from adapters.redis.client import RedisClient, batch, execute_and_publish, get_values, is_cluster, raise_error
from adapters.redis.durability import ReplicaConfirmation
from adapters.redis.packed import PackedConnections, as_argument, pack
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
# Every this many creates of this store (so of the process: the count is not shared), that create
# also trims its user's pending index of entries past the request TTL.
DEFAULT_INDEX_TRIM_EVERY = 32
# A failed compare means another writer changed the request in between; the reply then carries
# the new bytes, which are normally decided, and the loop stops. This only bounds a pathology.
MAX_DECIDE_ATTEMPTS = 32

# KEYS: one record. ARGV: 1 its expected bytes, 2 its new bytes. Reply: 0 when the key does not
# exist; 1 when it held the expected bytes (now the new ones) or already holds the new ones (a
# retried call); else the bytes it holds (nothing written).
_SWAP = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if current == ARGV[2] then return 1 end
if current ~= ARGV[1] then return current end
redis.call('SET', KEYS[1], ARGV[2], 'XX', 'KEEPTTL')
return 1
"""
_SWAPPED = 1

SESSION_KEY_PREFIX = "hitl:session:"
PENDING_INDEX_PREFIX = "aura:hitl:pending:"
_PENDING_TAIL = ',"decidedAt":null,"decidedBy":null,"reason":null}'
_PENDING_STATUS = ',"status":"pending","userId":'

# KEYS: request
# ARGV: 1 decider tenant, 2 decider user, 3 '1' when the decider is an approver, '0' when not,
#       '-' for no decider (only "still pending" is checked), 4 decidedAt,
#       5 status, 6 decidedBy as JSON, 7 reason as JSON; with the signal (one server only):
#       8 the signal's bytes, 9 its TTL, 10 the signal key's prefix, 11 the channel's prefix,
#       12 the signal sealed as one whose step wrote the session record ('' for none), 13 the
#       session key's prefix
# Reply: 0 when the request does not exist; its current bytes when the decider may not decide it
# now (or it is not in Aura's layout); {1, the decided bytes} when decided; with the signal,
# {1, the decided bytes, 1 when the signal was stored and published, else 0}.
# With ARGV[12], the session's decided record (`session_record()`) is written too (XX KEEPTTL, as
# `settle_session` writes it), before the signal: built from the request's own bytes (the JSON
# strings of its ids, user and tenant, copied; their places are fixed by Aura's layout, checked
# above) and checked by decoding it; then ARGV[12] is the signal stored and published. A record
# it cannot build leaves the session to the waiting run: ARGV[8] is published.
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
if not ARGV[8] then return {1, decided} end
local signal = ARGV[8]
if ARGV[12] and ARGV[12] ~= '' then
  -- the JSON string starting at `from` (its opening quote), quotes included
  local function json_string(from)
    if string.sub(current, from, from) ~= '"' then return nil end
    local at = from + 1
    while true do
      local quote = string.find(current, '"', at, true)
      if not quote then return nil end
      local before = quote - 1
      while string.byte(current, before) == 92 do before = before - 1 end  -- a backslash
      if (quote - 1 - before) % 2 == 0 then return string.sub(current, from, quote) end
      at = quote + 1
    end
  end
  -- the string value of `key` when `key` starts exactly at `at`; and where what follows it starts
  local function field(at, key)
    if not at or string.sub(current, at, at + #key - 1) ~= key then return nil end
    local value = json_string(at + #key)
    if not value then return nil end
    return value, at + #key + #value
  end
  local request_id, at = field(1, '{"requestId":')
  local session_id, run_id, user_id, tenant_id
  session_id, at = field(at, ',"sessionId":')
  run_id = field(at, ',"runId":')
  user_id, at = field(last, status)
  tenant_id = field(at, ',"tenantId":')
  if request_id and session_id and run_id and user_id and tenant_id then
    local session = '{"sessionId":' .. session_id .. ',"runId":' .. run_id .. ',"requestId":' .. request_id
      .. ',"userId":' .. user_id .. ',"tenantId":' .. tenant_id .. ',"status":"' .. ARGV[5] .. '"}'
    local read_ok, read = pcall(cjson.decode, session)
    if read_ok and read.sessionId == record.sessionId and read.runId == record.runId
        and read.requestId == record.requestId and read.userId == record.userId
        and read.tenantId == record.tenantId and read.status == ARGV[5] then
      local written = redis.pcall('SET', ARGV[13] .. record.sessionId, session, 'XX', 'KEEPTTL')
      if type(written) == 'table' and written.err then return {1, decided, 0} end
      signal = ARGV[12]
    end
  end
end
local stored = redis.pcall('SET', ARGV[10] .. record.sessionId, signal, 'EX', ARGV[9])
if type(stored) == 'table' and stored.err then return {1, decided, 0} end
local published = redis.pcall('PUBLISH', ARGV[11] .. record.sessionId, signal)
if type(published) == 'table' and published.err then return {1, decided, 0} end
return {1, decided, 1}
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
        redis: RedisClient,
        *,
        request_ttl_seconds: int = DEFAULT_REQUEST_TTL_SECONDS,
        session_ttl_seconds: int = DEFAULT_SESSION_TTL_SECONDS,
        signal_ttl_seconds: int = DEFAULT_SIGNAL_TTL_SECONDS,
        confirmation: ReplicaConfirmation | None = None,
        index_trim_every: int = DEFAULT_INDEX_TRIM_EVERY,
    ) -> None:
        if index_trim_every < 1:
            raise ValueError("index_trim_every must be at least 1")
        self._redis = redis
        self._index_trim_every = index_trim_every
        self._creates = 0
        # A decision is reported (applied or already made) only once this many replicas hold it.
        self._confirmation = confirmation
        self._request_ttl_seconds = request_ttl_seconds
        self._session_ttl_seconds = session_ttl_seconds
        self._signal_ttl_seconds = signal_ttl_seconds
        self._swap = redis.register_script(_SWAP)
        self._decide_in_place_script = redis.register_script(_DECIDE_IN_PLACE)
        # On one server the decision script also stores and publishes the signal (one round trip
        # less for the decider) and writes the session record (one less for the waiting run). On
        # a cluster the signal's key is on another node; with replicas to confirm, the signal is
        # published only once a WAIT confirmed the decision.
        self._signal_inline = confirmation is None and not is_cluster(redis)
        # On one server (Sentinel's master, the embedded one) the writes of every approval (the
        # request's creation, the decision script, the session record the run settles) are packed
        # here and sent on connections held for them (packed.py): about half the CPU of redis-py's
        # pipeline and script objects for the same round trip.
        self._packed = PackedConnections(redis) if isinstance(redis, Redis) else None

    async def load_scripts(self) -> None:
        """Load the decision scripts on the server (every primary of a cluster) ahead of the first
        decision, which would otherwise find them missing and pay a round trip to load them. A
        server that lost them later (a restart, a failover) gets them again the same way."""
        try:
            for script in (self._decide_in_place_script, self._swap):
                await self._redis.script_load(script.script)
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc

    async def create(self, request: ApprovalRequest) -> StoredApproval:
        """The pending index first (a request is never pending unlisted), then the request, then
        its session: one round trip, each write idempotent. Every `index_trim_every`-th create also
        drops the index's entries older than the request TTL (their requests are gone), so an
        index nobody lists stays bounded by the requests of one TTL; decided ones leave it when
        it is read (`pending_for_user`)."""
        index_key = pending_index_key(request.tenant_id, request.user_id)
        record = encode_json(request.to_record())
        if self._packed is not None:
            await self._create_packed(request, index_key, record)
            return StoredApproval(request, record)
        pipe = batch(self._redis)
        if request.status is ApprovalStatus.PENDING:
            pipe.zadd(index_key, {request.request_id: request.created_at})
            pipe.expire(index_key, self._request_ttl_seconds)
            self._creates += 1
            if self._creates % self._index_trim_every == 0:
                pipe.zremrangebyscore(index_key, "-inf", request.created_at - self._request_ttl_seconds)
        pipe.set(request_key(request.request_id), record, ex=self._request_ttl_seconds)
        pipe.set(session_key(request.session_id), encode_json(request.session_record()), ex=self._session_ttl_seconds)
        try:
            for reply in await pipe.execute(raise_on_error=False):
                raise_error(reply)
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc
        return StoredApproval(request, record)

    async def _create_packed(self, request: ApprovalRequest, index_key: str, record: bytes) -> None:
        """`create`'s commands, in its order, in one packed write."""
        assert self._packed is not None
        index = index_key.encode()
        commands = []
        if request.status is ApprovalStatus.PENDING:
            commands += [pack(b"ZADD", index, as_argument(request.created_at), request.request_id.encode()),
                         pack(b"EXPIRE", index, b"%d" % self._request_ttl_seconds)]
            self._creates += 1
            if self._creates % self._index_trim_every == 0:
                commands.append(pack(b"ZREMRANGEBYSCORE", index, b"-inf",
                                     as_argument(request.created_at - self._request_ttl_seconds)))
        commands += [
            pack(b"SET", request_key(request.request_id).encode(), record, b"EX", b"%d" % self._request_ttl_seconds),
            pack(b"SET", session_key(request.session_id).encode(), encode_json(request.session_record()),
                 b"EX", b"%d" % self._session_ttl_seconds)]
        try:
            for reply in await self._packed.execute(b"".join(commands), len(commands)):
                raise_error(reply)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc

    async def get(self, request_id: str) -> ApprovalRequest | None:
        stored = await self.read(request_id)
        return None if stored is None else stored.request

    async def read(self, request_id: str) -> StoredApproval | None:
        key = request_key(request_id)
        try:
            raw = await self._redis.get(key)
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc
        return None if raw is None else _stored(raw, key)

    async def get_many(self, request_ids: Sequence[str]) -> list[ApprovalRequest | None]:
        if not request_ids:
            return []
        keys = [request_key(request_id) for request_id in request_ids]
        try:
            raws = await get_values(self._redis, keys)
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
            raws = await get_values(self._redis, [request_key(request_id) for request_id in ids])
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
        settled_signal: Signal | None = None,
    ) -> DecisionResult | None:
        if not status.is_decided:
            raise ValueError("a decision must leave the pending state")
        if expected is not None and expected.request.request_id != request_id:
            raise ValueError(f"expected a record of {request_id}, got {expected.request.request_id}")
        key = request_key(request_id)
        try:
            if expected is None:
                outcome = await self._decide_in_place(key, request_id, status, decider, decided_at, decided_by,
                                                      reason, signal, settled_signal)
                if not isinstance(outcome, StoredApproval | None):
                    return outcome
                seen: StoredApproval | None = outcome  # refused, or not in Aura's layout: the loop tells which
            else:
                seen = expected
            for _ in range(MAX_DECIDE_ATTEMPTS):
                if seen is None:
                    return None
                current = seen.request
                if current.status.is_decided or (decider is not None and not decider.may_decide(current, decided_at)):
                    if current.status.is_decided:  # a decision whose follow-ups a crash may have cut short
                        await self._follow_up(current, None)
                    return DecisionResult(applied=False, request=current)
                decided = current.decide(status, by=decided_by, at=decided_at, reason=reason)
                reply = await self._swap(keys=[key], args=[seen.version, encode_json(decided.to_record())])
                if isinstance(reply, bytes | str):
                    seen = _stored(reply, key)  # changed since it was read: decide on what is there now
                    continue
                if not reply:
                    return None  # expired (or deleted) since it was read: there is nothing to decide
                signalled = await self._follow_up(decided, signal)
                return DecisionResult(applied=True, request=decided, signalled=signalled)
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc
        raise StoreUnavailable(f"approval {request_id} is changing too often to decide")

    async def replace(self, stored: StoredApproval, replacement: ApprovalRequest) -> bool:
        """`stored` becomes `replacement` (a decided copy) only while its bytes are unchanged, with
        the same follow-ups as a decision without a signal. True when it applied (or had)."""
        try:
            reply = await self._swap(keys=[request_key(stored.request.request_id)],
                                     args=[stored.version, encode_json(replacement.to_record())])
            if reply != _SWAPPED:
                return False
            await self._follow_up(replacement, None)
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc
        return True

    async def _follow_up(self, decided: ApprovalRequest, signal: Signal | None) -> bool:
        """The writes after a decision, each idempotent, in one pipeline. With a signal (the API's
        decision): the signal stored then published; the session record is the waiting run's to
        write (`settle_session`), and the pending index drops the request when it is next read.
        Without one (a decision of the waiting run itself, or of an instance that does not own
        the run): the session record, only while it is exactly this request's pending record. True
        when the signal was stored and published.

        When replicas must confirm writes, the pipeline's last command is a `WAIT`, which covers
        the decision too (it ran before: durability.py); only once it confirmed is the signal
        published and the decision reported, else `ReplicasDidNotConfirm` (a retryable error): a
        failover could revert it."""
        pipe = batch(self._redis)
        pending_session = b""
        if signal is None:
            pending_session = encode_json({**decided.session_record(), "status": ApprovalStatus.PENDING.value})
            pipe.evalsha(self._swap.sha, 1, session_key(decided.session_id), pending_session,
                         encode_json(decided.session_record()))
            payload = None
        else:
            payload = signal.to_json().encode("utf-8")
            pipe.set(signal_key(decided.session_id), payload, ex=self._signal_ttl_seconds)
        confirmation = self._confirmation
        if confirmation is not None:
            pipe.execute_command(*confirmation.arguments())
            replies = await pipe.execute(raise_on_error=False)
            confirmation.check(replies.pop())
            if payload is not None:
                try:
                    replies.append(await self._redis.publish(channel_name(decided.session_id), payload))
                except RedisError as error:
                    replies.append(error)
        elif payload is None:
            replies = await pipe.execute(raise_on_error=False)
        else:
            replies, published = await execute_and_publish(self._redis, pipe, channel_name(decided.session_id),
                                                           payload)
            replies.append(published)
        if payload is None:
            if isinstance(replies[0], NoScriptError):  # a restarted server: load the script, swap again
                await self._swap(keys=[session_key(decided.session_id)],
                                 args=[pending_session, encode_json(decided.session_record())])
            return False
        if any(isinstance(reply, Exception) for reply in replies):
            _log.warning("decided %s but could not store or publish its signal", decided.request_id)
            return False
        return True

    async def settle_session(self, decided: ApprovalRequest) -> None:
        """The session record of a decision the waiting run heard (its instance is the one writer
        of its session while it waits: no compare needed). XX: a session record that expired
        stays gone; KEEPTTL: it keeps the TTL its creation gave it. When replicas must confirm
        writes, a `WAIT` follows in the same pipeline and an unconfirmed write raises, like a
        decision's (the gate retries).

        One plain SET, not a compare-and-set: a script would cost this approval two more
        commands (its GET and SET). What that gives up, accepted: a SET whose bytes a stalled
        connection delivers only after the run has moved on (the client timed out, retried or
        gave up, the run created its next request, and only then the old bytes reached Redis)
        would point the session at this decision while the next request is pending, until that
        one is decided. The run writes its next request only after this returns or fails, so
        only such a late delivery can do it."""
        key = session_key(decided.session_id)
        record = encode_json(decided.session_record())
        confirmation = self._confirmation
        if self._packed is not None:
            command = pack(b"SET", key.encode(), record, b"XX", b"KEEPTTL")
            try:
                if confirmation is None:
                    raise_error((await self._packed.execute(command, 1))[0])
                    return
                written, confirmed = await self._packed.execute(command + confirmation.command(), 2)
                raise_error(written)
                confirmation.check(confirmed)
            except (RedisError, OSError) as exc:
                raise StoreUnavailable("the approval store is unavailable") from exc
            return
        try:
            if confirmation is None:
                await self._redis.set(key, record, xx=True, keepttl=True)
                return
            pipe = batch(self._redis)
            pipe.set(key, record, xx=True, keepttl=True)
            pipe.execute_command(*confirmation.arguments())
            written, confirmed = await pipe.execute(raise_on_error=False)
            raise_error(written)
            confirmation.check(confirmed)
        except RedisError as exc:
            raise StoreUnavailable("the approval store is unavailable") from exc

    async def _decide_in_place(self, key: str, request_id: str, status: ApprovalStatus, decider: Decider | None,
                               decided_at: int, decided_by: str | None, reason: str | None,
                               signal: Signal | None, settled_signal: Signal | None = None
                               ) -> DecisionResult | StoredApproval | None:
        """The decision when the script applied it; otherwise the request as stored (None when
        absent or unreadable), which the caller's loop refuses by the same rules or, when only its
        layout stopped the script, decides on."""
        mode = "-" if decider is None else "1" if decider.approver else "0"
        args: list[Any] = ["" if decider is None else decider.tenant_id, "" if decider is None else decider.user_id,
                           mode, decided_at, status.value, encode_json(decided_by), encode_json(reason)]
        if signal is not None and self._signal_inline:
            args += [signal.to_json().encode("utf-8"), self._signal_ttl_seconds, SIGNAL_KEY_PREFIX, CHANNEL_PREFIX,
                     b"" if settled_signal is None else settled_signal.to_json().encode("utf-8"), SESSION_KEY_PREFIX]
        if self._packed is None:
            reply = await self._decide_in_place_script(keys=[key], args=args)
        else:
            reply = await self._packed.call_script(self._decide_in_place_script, [key], args)
            raise_error(reply)
        if isinstance(reply, list):
            raw = reply[1]
            decided = _decode_request(raw, key)
            if decided is None:  # cannot be: the script checked that it decodes
                raise StoreUnavailable(f"approval {request_id} was decided into an unreadable record")
            if len(reply) > 2:  # the script stored and published the signal too
                if not reply[2]:
                    _log.warning("decided %s but could not store or publish its signal", request_id)
                return DecisionResult(applied=True, request=decided, signalled=bool(reply[2]))
            signalled = await self._follow_up(decided, signal)
            return DecisionResult(applied=True, request=decided, signalled=signalled)
        if not reply:
            return None
        return _stored(reply, key)


def _stored(raw: bytes | str, key: str) -> StoredApproval | None:
    request = _decode_request(raw, key)
    return None if request is None else StoredApproval(request, raw.encode("utf-8") if isinstance(raw, str) else raw)
