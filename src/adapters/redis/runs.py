"""The run directory, follower and control channel in Redis.

Keys (Aura's own; not part of the DWP contract; every id percent-encoded, see `keys`): a run's keys
share the hash tag `{runId}`, so on a Redis Cluster each of its atomic steps is a single-slot script.
- `aura:run:{runId}:meta`      JSON RunRecord; a day while running, the retention time after the end
- `aura:run:{runId}:lease`     the owner instance id, PX lease milliseconds, renewed by the owner only
                               while it still holds it (compare and set)
- `aura:run:{runId}:reader`    sorted set of the follows reading the run on other instances
                               (`<follower>/<token>`, scored by when the entry lapses at the latest,
                               ms): while it exists the owner publishes the run's events on its tail
                               channel, and while one of its followers is present the owner does not
                               cancel the run for want of a reader. A follow adds its entry once and
                               removes it when it ends; nothing refreshes it
- `aura:followers`             sorted set of the following processes, scored by when each one's
                               presence lapses (ms): a process refreshes its own every third of the
                               presence time while it follows anything (one script per process,
                               however many runs it follows); an entry whose follower is absent is a
                               follow that died with its process. A lapsed member is kept an hour
                               (it says when that process was last alive), then dropped by the next
                               refresh. One key for all: an owner whose runs are kept for readers
                               elsewhere reads it once per lease renewal (one ZMSCORE per instance,
                               not per run); on a cluster its slot takes one write per following
                               process every few seconds
- `aura:runs:active`           sorted set of running run ids, scored by when their lease lapses (ms),
                               so lost runs are found even when nobody follows them
- `aura:run:{runId}:snapshot`  the run's state as JSON (written with the event log)
- `aura:idem:{tenant}:{user}:{sha256(key)}`  {"runId", "fingerprint"} for Idempotency-Key
- `aura:slots:{tenant}:user:{user}`, `aura:slots:{tenant}:tenant`  sorted sets of running run ids,
  scored by when their slot lapses (so a crashed instance's runs free their slots by themselves);
  both carry the tenant's hash tag, so the admission's check-and-take is one single-slot script
- channel `aura:instance:{instanceId}:control`  cancel requests for the runs an instance owns
- channel `aura:run:{runId}:tail`  the run's events as they are logged, while it has a remote reader;
                               `RUN_CLOSED` at its close, `NOTE_AGAIN` when a failover moved its slot

What spans slots (a run's keys, its tenant's slots, the active index, the approval's `hitl:*` keys)
is written in idempotent steps, in an order that a crash between two of them leaves nothing lost:
the active index first (a run is findable before anything else of it exists), the run's own keys,
then the slots; on the way out the run's keys first, the slots and the index last (on one server,
not a cluster, the way out is one script over all of them). Whatever a crash leaves behind is
cleaned by the lost-run sweep (`stale_runs`, `declare_lost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from adapters.redis.approvals import RedisApprovalStore
from adapters.redis.client import RedisClient, batch, raise_error, run_batch
from adapters.redis.durability import ReplicaConfirmation, read_log_confirmed
from adapters.redis.events import event_log_key, lease_key, snapshot_key
from adapters.redis.keys import key_part, run_key, tenant_tag
from adapters.redis.limits import RedisStartRateLimiter
from adapters.redis.packed import PackedConnections, as_argument, pack
from adapters.redis.readers import stop_reader
from adapters.redis.sentinel import master_watch
from adapters.redis.topology import NOTE_AGAIN, slot_map
from adapters.wire import envelope_bytes, event_from_bytes
from domain.model.errors import RunStartsTooFrequent, StoreUnavailable
from domain.model.events import Event
from domain.model.ports import StartRateLimiter
from domain.model.runs import (
    IdempotencyClaim,
    LeaseRenewals,
    LostRun,
    RunControl,
    RunDirectory,
    RunEnd,
    RunFollower,
    RunRecord,
)
from domain.runtime.waits import Backoff

log = logging.getLogger("aura.runs")

ACTIVE_TTL_SECONDS = 86_400
ACTIVE_RUNS_KEY = "aura:runs:active"


def meta_key(run_id: str) -> str:
    return run_key(run_id, "meta")


def reader_key(run_id: str) -> str:
    return run_key(run_id, "reader")


def tail_channel(run_id: str) -> str:
    return run_key(run_id, "tail")


FOLLOWERS_KEY = "aura:followers"

# As the packed admission sends them.
_ACTIVE_RUNS = ACTIVE_RUNS_KEY.encode()
_ACTIVE_TTL = b"%d" % ACTIVE_TTL_SECONDS

# How long a follower's lapsed presence stays in FOLLOWERS_KEY, telling when it was last alive.
LAPSED_PRESENCE_KEPT_MS = 3_600_000


# A reader entry's lapse time at the latest (its follow removes it, or the owner once its follower
# is absent): the run's own keys live no longer.
READER_ENTRY_TTL_MS = ACTIVE_TTL_SECONDS * 1000


def user_slots_key(tenant_id: str, user_id: str) -> str:
    return f"aura:slots:{tenant_tag(tenant_id)}:user:{key_part(user_id)}"


def tenant_slots_key(tenant_id: str) -> str:
    return f"aura:slots:{tenant_tag(tenant_id)}:tenant"


def control_channel(instance_id: str) -> str:
    return f"aura:instance:{key_part(instance_id)}:control"


# KEYS: user slots, tenant slots (one tenant: one slot). ARGV: 1 now, 2 slot deadline, 3 run id,
# 4 user limit, 5 tenant limit, 6 TTL seconds. Drops lapsed slots, refuses when the user's or the
# tenant's limit is reached, else takes both. A run that holds its slots already (a retried call)
# is admitted again without counting twice.
_HELD_ALREADY = """
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then return 'ok' end
"""
_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 'user' end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 'tenant' end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return 'ok'
"""
_TAKE_SLOTS = _HELD_ALREADY + _TAKE

# The start counted against the user's start rate, then the slots taken, in one script: on one
# server (not a cluster, where the user's start counter and the tenant's slots are in different
# slots). KEYS as _TAKE_SLOTS's, then 3 the user's start counter of the window open now
# (`adapters.redis.limits`); ARGV as _TAKE_SLOTS's, then 7 the starts a window allows, 8 the
# counter's TTL. 'starts' when over the rate: the start is counted, no slot is taken. A retried
# call is not counted twice.
_COUNT_START_AND_TAKE_SLOTS = _HELD_ALREADY + """
redis.call('SET', KEYS[3], 0, 'EX', ARGV[8], 'NX')
if redis.call('INCR', KEYS[3]) > tonumber(ARGV[7]) then return 'starts' end
""" + _TAKE

# KEYS: the run's lease; ARGV: owner, lease ms. 1 when renewed, 0 when the lease is not the owner's.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# The renewal of a run kept for a reader on another instance. KEYS: the run's lease, its reader set
# (one run: one slot); ARGV: owner, lease ms, now (ms). 0 when the lease is not the owner's, else
# the run's current reader entries and their scores (entry, score, ...): the owner learns whether
# it is still read in the round trip it pays for the lease anyway.
_RENEW_AND_READ = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[3], '+inf', 'WITHSCORES')
"""

# KEYS: the followers' presence set. ARGV: 1 the follower, 2 when its presence lapses (ms), 3 drop
# the members lapsed before this (ms), 4 the set's TTL (ms). Reply: the follower's previous lapse
# time (nil when it had none left).
_BE_PRESENT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
local previous = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return previous
"""

# A run's record was closed: published on its tail channel (when it has readers) after its last
# event, so a follow whose run closed without logging an `end` (the store refused it) ends too.
RUN_CLOSED = b'{"aura":"run_closed"}'

# KEYS: meta, lease, reader; ARGV: owner, final record, retention, the run's tail channel, RUN_CLOSED
_CLOSE_RECORD = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
"""
_CLOSE = _CLOSE_RECORD + "return 1\n"

# The close and the forgetting of a run in one script, on one server (not a cluster, where the
# run's keys, its tenant's slots and the active index live in different slots). KEYS as _CLOSE's,
# then 4 user slots, 5 tenant slots, 6 the active index; ARGV as _CLOSE's, then 6 the run id. A
# run whose lease is gone keeps its slots and index entry: the lost-run sweep finds it by them.
_CLOSE_AND_FORGET = _CLOSE_RECORD + """
redis.call('ZREM', KEYS[4], ARGV[6])
redis.call('ZREM', KEYS[5], ARGV[6])
redis.call('ZREM', KEYS[6], ARGV[6])
return 1
"""

# KEYS: 1 log, 2 lease, 3 meta, 4 snapshot (one run: one slot)
# ARGV: 1 the log's expected last entry id ('' for an empty log), 2 error entry id, 3 error bytes,
#       4 end entry id, 5 end bytes, 6 final record, 7 final snapshot ('' for none), 8 retention,
#       9 max log length, 10 the run's tail channel
_DECLARE_LOST = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 'alive' end
local meta = redis.call('GET', KEYS[3])
if not meta then return 'finished' end
local ok, record = pcall(cjson.decode, meta)
if not ok or type(record) ~= 'table' or record.status ~= 'running' then return 'finished' end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last then
  local fields = last[2]
  for i = 1, #fields, 2 do
    if fields[i] == 't' then return 'finished' end
  end
  if last[1] ~= ARGV[1] then return 'moved' end
elseif ARGV[1] ~= '' then
  return 'moved'
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[9], ARGV[2], 'e', ARGV[3])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[9], ARGV[4], 'e', ARGV[5], 't', '1')
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('SET', KEYS[3], ARGV[6], 'EX', ARGV[8])
if ARGV[7] ~= '' then redis.call('SET', KEYS[4], ARGV[7], 'EX', ARGV[8]) end
redis.call('PUBLISH', ARGV[10], ARGV[3])
redis.call('PUBLISH', ARGV[10], ARGV[5])
return 'declared'
"""


# KEYS: the run's reader set. ARGV: 1 the entry's lapse time (ms), 2 the entry, 3 the set's TTL
# (ms), 4 now (ms). Reply: 1 when the entry was not in the set (a first note, or the entry was
# dropped: events may have gone unpublished), else 0.
_NOTE_READER = """
local added = redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return added
"""


# Drops the reader entries (ARGV: entry, score, …) that still have the score they were read with:
# an entry its follower noted again meanwhile has a later score and stays.
_DROP_UNCHANGED_READERS = """
local dropped = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    dropped = dropped + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return dropped
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _scored(flat: list[Any]) -> dict[str, int]:
    """entry, score, entry, score, ... (a script's ZRANGEBYSCORE WITHSCORES) as entry -> score."""
    return {_text(entry): int(float(score)) for entry, score in zip(flat[::2], flat[1::2], strict=True)}


class RedisRunDirectory(RunDirectory):
    def __init__(self, redis: RedisClient, *, max_log_length: int, approvals: RedisApprovalStore,
                 presence_seconds: float, confirmation: ReplicaConfirmation | None = None) -> None:
        self._redis = redis
        # The followers' presence time (`RedisRunFollower`): a lapse time minus it is when that
        # follower last said it was alive.
        self._presence_ms = int(presence_seconds * 1000)
        self._max_log_length = max_log_length
        # When replicas must confirm writes, a run is admitted (its id handed to the client) only
        # once they hold its record: a failover must not turn a run id the client holds into a 404.
        self._confirmation = confirmation
        # A lost run's pending approval is cancelled through the approval store's own steps.
        self._approvals = approvals
        self._take_slots = redis.register_script(_TAKE_SLOTS)
        self._count_start_and_take_slots = redis.register_script(_COUNT_START_AND_TAKE_SLOTS)
        self._renew = redis.register_script(_RENEW)
        self._renew_and_read = redis.register_script(_RENEW_AND_READ)
        self._close = redis.register_script(_CLOSE)
        self._close_and_forget = redis.register_script(_CLOSE_AND_FORGET)
        # On one server (Sentinel's master, the embedded one) a run's admission and close are
        # packed here and sent on connections held for them (packed.py): through redis-py's
        # pipeline and script objects they cost ~2x the CPU of the exchange itself. A cluster
        # keeps redis-py's path (its steps are in different slots, ordered by awaiting each).
        self._packed = PackedConnections(redis) if isinstance(redis, Redis) else None
        self._shas = {script: script.sha.encode() for script in (self._take_slots, self._count_start_and_take_slots)}
        self._declare_lost = redis.register_script(_DECLARE_LOST)
        self._note_reader = redis.register_script(_NOTE_READER)
        self._drop_unchanged_readers = redis.register_script(_DROP_UNCHANGED_READERS)

    async def _call(self, operation: Awaitable[Any]) -> Any:
        try:
            return await operation
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The run directory is unavailable.") from exc

    async def get(self, run_id: str) -> RunRecord | None:
        raw = await self._call(self._redis.get(meta_key(run_id)))
        return None if raw is None else RunRecord.from_record(orjson.loads(raw))

    async def renew_leases(self, run_ids: list[str], instance_id: str, lease_seconds: float,
                           read_elsewhere: Collection[str] = ()) -> LeaseRenewals:
        """One script per run in one pipeline; a run in `read_elsewhere` has its reader entries
        read by its renewal script, and the presence of their followers is read once for all such
        runs (one ZMSCORE): no command per run beyond its lease's script."""
        if not run_ids:
            return LeaseRenewals()
        lease_ms = int(lease_seconds * 1000)
        now_ms = int(time.time() * 1000)
        asked = set(read_elsewhere)
        replies = await self._call(run_batch(self._redis, [
            (self._renew_and_read, [lease_key(run_id), reader_key(run_id)], [instance_id, lease_ms, now_ms])
            if run_id in asked else (self._renew, [lease_key(run_id)], [instance_id, lease_ms])
            for run_id in run_ids]))
        renewed = [run_id for run_id, reply in zip(run_ids, replies, strict=True)
                   if reply == 1 or isinstance(reply, list)]
        if renewed:  # the index only says when to look again: it may lag the leases, never lead them
            await self._call(self._redis.zadd(ACTIVE_RUNS_KEY, dict.fromkeys(renewed, now_ms + lease_ms), xx=True))
        for reply in replies:
            if isinstance(reply, Exception):
                raise StoreUnavailable("The run directory is unavailable.") from reply
        lost = [run_id for run_id, reply in zip(run_ids, replies, strict=True) if reply == 0]
        try:  # the leases are renewed: a failure from here on only postpones the report to the next renewal
            last_read = await self._last_read(
                {run_id: _scored(reply) for run_id, reply in zip(run_ids, replies, strict=True)
                 if isinstance(reply, list)}, now_ms)
        except StoreUnavailable:
            log.warning("could not read the presence of the followers of this instance's runs")
            last_read = {}
        return LeaseRenewals(
            lost=lost,
            unread={run_id: max(0.0, (now_ms - at) / 1000) for run_id, at in last_read.items() if at is not None})

    async def lease_holder(self, run_id: str) -> str | None:
        raw = await self._call(self._redis.get(lease_key(run_id)))
        return None if raw is None else _text(raw)

    @staticmethod
    def _idempotency_key(tenant_id: str, user_id: str, key: str) -> str:
        return f"aura:idem:{key_part(tenant_id)}:{key_part(user_id)}:{hashlib.sha256(key.encode()).hexdigest()}"

    async def release_idempotency(self, tenant_id: str, user_id: str, key: str) -> None:
        await self._call(self._redis.delete(self._idempotency_key(tenant_id, user_id, key)))

    async def claim_idempotency(self, tenant_id: str, user_id: str, key: str, run_id: str, fingerprint: str,
                                ttl_seconds: int) -> IdempotencyClaim | None:
        name = self._idempotency_key(tenant_id, user_id, key)
        value = orjson.dumps({"runId": run_id, "fingerprint": fingerprint})
        if await self._call(self._redis.set(name, value, nx=True, ex=ttl_seconds)):
            return None
        raw = await self._call(self._redis.get(name))
        if raw is None:  # expired in between: try once more
            return await self.claim_idempotency(tenant_id, user_id, key, run_id, fingerprint, ttl_seconds)
        existing = orjson.loads(raw)
        if existing["runId"] == run_id:  # our own claim, answered again after a retried SET
            return None
        return IdempotencyClaim(run_id=existing["runId"], fingerprint=existing["fingerprint"])

    async def admit(self, record: RunRecord, *, user_limit: int, tenant_limit: int, slot_seconds: float,
                    lease_seconds: float, starts: StartRateLimiter | None = None) -> str | None:
        """Three ordered steps: the active index, the run's record and lease (so a crash or a
        failure from here on leaves a run the sweep declares lost, which frees whatever it holds),
        then the tenant's slots in one script. A refusal takes the first two back; so does a
        record the replicas did not confirm (StoreUnavailable: the client may retry). On one server
        the start rate is counted by the slots' script (the same round trip); elsewhere first."""
        # One server runs a batch's commands in order: the three steps ride in one write. A cluster
        # runs each server's part of a pipeline side by side (a failing node fails its part alone):
        # there each step waits for the one before, or a run could be recorded running where the
        # lost-run sweep never looks (its index entry refused by a node in a failover).
        together = self._packed is not None
        window = None
        if isinstance(starts, RedisStartRateLimiter) and together:
            window = starts.current_window(record.tenant_id, record.user_id)
        elif starts is not None and (wait := await starts.admit(record.tenant_id, record.user_id)) is not None:
            raise RunStartsTooFrequent(wait)
        now = time.time()
        run_id = record.run_id
        lease_deadline = int((now + lease_seconds) * 1000)
        slot_keys = [user_slots_key(record.tenant_id, record.user_id), tenant_slots_key(record.tenant_id)]
        slot_args: list[float | int | str] = [now, now + slot_seconds, run_id, user_limit, tenant_limit,
                                              int(slot_seconds) + 60]
        take = self._take_slots
        if window is not None:
            take = self._count_start_and_take_slots
            slot_keys.append(window.key)
            slot_args += [window.limit, window.ttl_seconds]
        confirmation = self._confirmation
        if self._packed is not None:
            # with replicas to confirm, the `WAIT` ends the same write: it covers the record
            confirm = b"" if confirmation is None else confirmation.command()
            run = run_id.encode()
            replies = await self._call(self._packed.execute(b"".join([
                pack(b"ZADD", _ACTIVE_RUNS, b"%d" % lease_deadline, run),
                pack(b"SET", meta_key(run_id).encode(), orjson.dumps(record.to_record()),
                     b"EX", _ACTIVE_TTL),
                pack(b"SET", lease_key(run_id).encode(), record.instance_id.encode(),
                     b"PX", b"%d" % int(lease_seconds * 1000)),
                pack(b"EVALSHA", self._shas[take], b"%d" % len(slot_keys), *map(as_argument, slot_keys),
                     *map(as_argument, slot_args)), confirm]), 4 + bool(confirm)))
        else:
            await self._call(self._redis.zadd(ACTIVE_RUNS_KEY, {run_id: lease_deadline}))
            pipe = batch(self._redis)
            pipe.set(meta_key(run_id), orjson.dumps(record.to_record()), ex=ACTIVE_TTL_SECONDS)
            pipe.set(lease_key(run_id), record.instance_id, px=int(lease_seconds * 1000))
            replies = [None, *await self._call(pipe.execute(raise_on_error=False))]  # the index's: raised above
        for reply in replies[:3]:
            self._raise(reply)
        if together and not isinstance(replies[3], NoScriptError):
            self._raise(replies[3])
            result = replies[3]
        else:  # a cluster, or a server that does not know the script yet (it is loaded now)
            result = await self._call(take(keys=slot_keys, args=slot_args))
        text = _text(result)
        if text == "ok":
            try:
                if self._packed is not None and confirmation is not None:
                    self._check_confirmed(confirmation, replies[4])
                else:
                    await self._confirm_admitted(run_id)
            except StoreUnavailable:
                with contextlib.suppress(StoreUnavailable):  # else the sweep declares it lost, which frees it
                    await self._undo_admission(run_id)
                    await self._forget(run_id, record.tenant_id, record.user_id)
                raise
            return None
        await self._undo_admission(run_id)
        if text == "starts" and window is not None:
            raise RunStartsTooFrequent(window.wait)
        return text

    @staticmethod
    def _check_confirmed(confirmation: ReplicaConfirmation, reply: Any) -> None:
        """The reply of the `WAIT` that ended the admission's write (on the connection that made
        its writes, after them): the replicas hold the record, or StoreUnavailable."""
        try:
            confirmation.check(reply)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The run directory's replicas did not confirm the run.") from exc

    async def _confirm_admitted(self, run_id: str) -> None:
        """With replica confirmation, where the admission went through redis-py (one server sends
        the `WAIT` in the admission's own write): the record is on the master the client talks to
        now and its replicas hold it (a read, then `WAIT` on its connection, which covers every
        write the master had taken by then: durability.py)."""
        confirmation = self._confirmation
        if confirmation is None:
            return
        pipe = batch(self._redis)
        pipe.exists(meta_key(run_id))
        pipe.execute_command(*confirmation.arguments())
        try:
            exists, confirmed = await pipe.execute(raise_on_error=False)
            if not raise_error(exists):
                raise StoreUnavailable("The run's record is not on the current Redis master.")
            confirmation.check(confirmed)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The run directory's replicas did not confirm the run.") from exc

    async def _undo_admission(self, run_id: str) -> None:
        undo = batch(self._redis)
        undo.delete(meta_key(run_id), lease_key(run_id))
        undo.zrem(ACTIVE_RUNS_KEY, run_id)
        await self._call(undo.execute())

    async def close(self, record: RunRecord, status: str, retention_seconds: int, end: RunEnd | None = None) -> bool:
        """The record is the one this owner registered, so it is rewritten without being read first.
        One round trip on one server (one packed script call); on a cluster the run's keys first,
        then its slots and index entry (`_forget`)."""
        run_id = record.run_id
        final = replace(record, status=status, end=end)
        keys = [meta_key(run_id), lease_key(run_id), reader_key(run_id)]
        args: list[Any] = [record.instance_id, orjson.dumps(final.to_record()), retention_seconds,
                           tail_channel(run_id), RUN_CLOSED]
        if self._packed is not None:
            keys += [user_slots_key(record.tenant_id, record.user_id), tenant_slots_key(record.tenant_id),
                     ACTIVE_RUNS_KEY]
            args.append(run_id)
            reply = await self._call(self._packed.call_script(self._close_and_forget, keys, args))
            self._raise(reply)
            return bool(reply)
        closed = await self._call(self._close(keys=keys, args=args))
        if closed:
            await self._forget(record.run_id, record.tenant_id, record.user_id)
        return bool(closed)

    async def _forget(self, run_id: str, tenant_id: str, user_id: str) -> None:
        """A finished run's slots and index entry, dropped last (idempotent: a crash before this
        leaves an entry the sweep finds finished and drops)."""
        pipe = batch(self._redis)
        pipe.zrem(user_slots_key(tenant_id, user_id), run_id)
        pipe.zrem(tenant_slots_key(tenant_id), run_id)
        pipe.zrem(ACTIVE_RUNS_KEY, run_id)
        await self._call(pipe.execute())

    async def declare_lost(self, lost: LostRun) -> str:
        """The run's own keys in one script (the decision point); then its pending approval
        cancelled by compare-and-set, then its slots and index entry dropped. A crash after the
        script leaves the run in the active index: the next sweep finds it finished and does the
        rest (`finished` runs the same steps, each a no-op once done)."""
        record = lost.record
        run_id = record.run_id
        outcome = _text(await self._call(self._declare_lost(
            keys=[event_log_key(run_id), lease_key(run_id), meta_key(run_id), snapshot_key(run_id)],
            args=[f"{lost.after_seq}-1" if lost.after_seq else "", f"{lost.error.seq}-1", envelope_bytes(lost.error),
                  f"{lost.end.seq}-1", envelope_bytes(lost.end),
                  orjson.dumps(replace(record, status="failed", end=RunEnd.from_data(lost.end.data)).to_record()),
                  b"" if lost.snapshot is None else orjson.dumps(lost.snapshot), lost.retention_seconds,
                  self._max_log_length, tail_channel(run_id)])))
        if outcome in ("declared", "finished"):
            if lost.approval is not None:
                stored, cancelled = lost.approval
                await self._approvals.replace(stored, cancelled)
            await self._forget(run_id, record.tenant_id, record.user_id)
        return outcome

    async def stale_runs(self, limit: int) -> list[str]:
        """Runs due for a look; entries a crash left behind (a run finished or gone whose entry was
        not dropped) are dropped here, with the finished run's slots."""
        due = [_text(run_id) for run_id in await self._call(self._redis.zrangebyscore(
            ACTIVE_RUNS_KEY, "-inf", int(time.time() * 1000), start=0, num=limit))]
        if not due:
            return []
        pipe = batch(self._redis)
        for run_id in due:
            pipe.get(meta_key(run_id))
        running: list[str] = []
        for run_id, raw in zip(due, await self._call(pipe.execute()), strict=True):
            current = None if raw is None else RunRecord.from_record(orjson.loads(raw))
            if current is not None and current.status == "running":
                running.append(run_id)
            elif current is not None:
                await self._forget(run_id, current.tenant_id, current.user_id)
            else:
                await self._call(self._redis.zrem(ACTIVE_RUNS_KEY, run_id))
        return running

    async def note_reader(self, run_id: str, ttl_seconds: float) -> None:
        now_ms = int(time.time() * 1000)
        ttl_ms = int(ttl_seconds * 1000)
        await self._call(self._note_reader(keys=[reader_key(run_id)], args=[now_ms + ttl_ms, "note", ttl_ms, now_ms]))

    async def has_reader(self, run_id: str) -> bool:
        now_ms = int(time.time() * 1000)
        scored = {_text(entry): int(score) for entry, score in await self._call(
            self._redis.zrangebyscore(reader_key(run_id), now_ms, "+inf", withscores=True))}
        return (await self._last_read({run_id: scored}, now_ms))[run_id] is None

    async def _last_read(self, entries: Mapping[str, Mapping[str, int]], now_ms: int) -> dict[str, int | None]:
        """For each run's current reader entries (entry -> score): None while it is read (an entry
        whose follower is present; an entry without a follower, written by `note_reader`, counts
        until it lapses), else when a reader was last known there (ms: now for no entry, the last
        sign of life of an absent follower). The followers' presence is read once for all the
        runs. Entries of absent followers are dropped, unless noted again since they were read:
        once none is left the owner stops publishing the run's events."""
        followers = sorted({entry.rpartition("/")[0] for scored in entries.values() for entry in scored
                            if "/" in entry})
        lapse = dict(zip(followers, await self._presence(followers), strict=True)) if followers else {}
        last_read: dict[str, int | None] = {}
        drops: list[tuple[Any, list[str], list[Any]]] = []
        for run_id, scored in entries.items():
            absent = {entry: lapse[entry.rpartition("/")[0]] for entry in scored
                      if "/" in entry and (lapse[entry.rpartition("/")[0]] or 0) <= now_ms}
            if absent:
                drops.append((self._drop_unchanged_readers, [reader_key(run_id)],
                              [part for entry in absent for part in (entry, scored[entry])]))
            if len(absent) < len(scored):
                last_read[run_id] = None
            elif absent and all(at is not None for at in absent.values()):
                last_read[run_id] = min(now_ms, max(int(cast(float, at)) for at in absent.values()) - self._presence_ms)
            else:  # no entry: a follow just ended; a follower with no presence left counts as just gone
                last_read[run_id] = now_ms
        if drops:  # a follower died: its entries in all these runs, in one round trip
            for reply in await self._call(run_batch(self._redis, drops)):
                self._raise(reply)
        return last_read

    async def _presence(self, followers: list[str]) -> list[float | None]:
        """When each follower's presence lapses (ms; None when it has none)."""
        return cast(list[float | None], await self._call(self._redis.zmscore(FOLLOWERS_KEY, followers)))

    async def save_snapshot(self, run_id: str, snapshot: Mapping[str, Any], ttl_seconds: int) -> None:
        await self._call(self._redis.set(snapshot_key(run_id), orjson.dumps(snapshot), ex=ttl_seconds))

    async def get_snapshot(self, run_id: str) -> dict[str, Any] | None:
        raw = await self._call(self._redis.get(snapshot_key(run_id)))
        return None if raw is None else cast(dict[str, Any], orjson.loads(raw))

    @staticmethod
    def _raise(reply: Any) -> None:
        try:
            raise_error(reply)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The run directory is unavailable.") from exc


@dataclass(eq=False)
class _Follow:
    position: int
    entry: str  # its entry in the run's reader set
    # Events as published; None asks the follow to note itself again and read the log (its entry
    # or a message may be missing).
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)


class RedisRunFollower(RunFollower):
    """Follows runs other instances own. A follow subscribes to the run's tail channel, adds its
    entry to the run's reader set (from then on the owner's append script publishes each event it
    logs, in the same step), reads the run's record once (a close before the entry was noted is
    announced to nobody) and the log after its position once (XRANGE), then takes the events as
    they are published: no command per event, and none while the run is idle. What keeps its
    entry counted is the process's presence in `aura:followers`, one script every third of
    `reader_ttl_seconds` for all its follows (an idle follow costs nothing of its own; the owner
    drops the entries of an absent follower). When the presence is found lapsed (the process
    stalled, or Redis lost it), when the tail channels are subscribed again after a lost connection (or a Sentinel
    failover, announced by the sentinels: `MasterWatch`), when a cluster failover moved the run's
    slot (a master killed before its replica had the entry takes it along: the owner, meeting the
    move, publishes `NOTE_AGAIN`, and this process's own slot map says so when its commands meet
    it: topology.py) and at a seq gap, each follow notes its entry again and fills the gap from
    the log (and after all but a gap, looks whether the run's record was closed meanwhile: a run
    whose store refused its `end` closes without one, and its owner announces the close,
    `RUN_CLOSED`; the follow then ends, and its reader resumes to learn how the run ended). One
    Pub/Sub connection serves every follow of the process (classic SUBSCRIBE: on a cluster any
    node hears every PUBLISH). A follow counts as a reader for the owner
    (`RunDirectory.has_reader`) until it ends."""

    def __init__(self, redis: RedisClient, *, block_ms: int, reader_ttl_seconds: float, page: int,
                 confirmation: ReplicaConfirmation | None, instance_id: str) -> None:
        self._redis = redis
        # When replicas must confirm writes, a follow hands on only events they hold: the log reads
        # end with a `WAIT` on their connection, and the owner publishes an event only once its own
        # `WAIT` confirmed it (events.py), so a published event needs none.
        self._confirmation = confirmation
        self._block_seconds = block_ms / 1000
        self._reader_ttl_ms = int(reader_ttl_seconds * 1000)
        self._page = page
        self._note = redis.register_script(_NOTE_READER)
        self._be_present = redis.register_script(_BE_PRESENT)
        # This process's name in reader entries: a restarted instance of the same id is another follower.
        self._follower = f"{key_part(instance_id)}.{secrets.token_hex(4)}"
        self._presence_due: float | None = None  # loop time of the next presence refresh; None: not present
        self._follows: dict[str, set[_Follow]] = {}
        # channel -> the run it tails, and the confirmation of its SUBSCRIBE on the current connection
        self._runs: dict[bytes, str] = {}
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        # On a cluster: each followed run's reader-set primary when its entries were last noted;
        # a failover that moves it may have lost them (topology.py).
        self._slots = slot_map(redis)
        self._primaries: dict[str, str | None] = {}
        if self._slots is not None:
            self._slots.on_change(self._slot_map_changed)

    async def follow(self, run_id: str, after_seq: int) -> AsyncIterator[Event | None]:
        follow = _Follow(after_seq, f"{self._follower}/{secrets.token_hex(8)}")
        self._follows.setdefault(run_id, set()).add(follow)
        try:
            await self._subscribe(run_id)
            loop = asyncio.get_running_loop()
            await self._keep_present(loop.time())
            await self._note_reader(run_id, follow.entry)
            # A close before the entry was noted announced nothing to this follow (one after it
            # does: RUN_CLOSED), so the record is read once, after the note and before the log: a
            # run closed without its `end` in the log ends the follow once the log is read.
            closed = await self._closed(run_id, gone=False)
            async for event in self._catch_up(run_id, follow):
                yield event
            if closed:
                return
            idle_since = loop.time()
            while True:
                wait = max(0.0, idle_since + self._block_seconds - loop.time())
                try:
                    # Not asyncio.wait_for: on Python 3.11 it can swallow the cancel of a client
                    # that leaves just as an event arrives, and the follow would outlive it.
                    async with asyncio.timeout(wait):
                        item = await follow.queue.get()
                except TimeoutError:
                    idle_since = loop.time()
                    yield None
                    continue
                if item is None:  # something may have been missed: note the entry, read the log
                    await self._note_reader(run_id, follow.entry)
                    async for event in self._catch_up(run_id, follow):
                        idle_since = loop.time()
                        yield event
                    if await self._closed(run_id):
                        return  # closed without an `end` in its log: nothing more will come
                elif item.seq > follow.position + 1:
                    async for event in self._catch_up(run_id, follow):
                        idle_since = loop.time()
                        yield event
                elif item.seq == follow.position + 1:
                    follow.position = item.seq
                    idle_since = loop.time()
                    yield item
        finally:
            followers = self._follows.get(run_id)
            if followers is not None:
                followers.discard(follow)
                if not followers:
                    del self._follows[run_id]
                    self._primaries.pop(run_id, None)
            if not self._follows:
                self._presence_due = None  # left to lapse
            with contextlib.suppress(RedisError, OSError):  # else the owner drops it once this process is gone
                await self._redis.zrem(reader_key(run_id), follow.entry)

    async def _keep_present(self, now: float) -> None:
        """Refresh this process's presence when due. Found lapsed while it follows (the process
        stalled longer than the TTL, or Redis lost the key), its entries may have been dropped and
        events gone unpublished: every follow notes its entry again and reads the log."""
        due = self._presence_due
        if due is not None and now < due:
            return
        self._presence_due = now + self._reader_ttl_ms / 3000
        now_ms = int(time.time() * 1000)
        try:
            previous = await self._be_present(keys=[FOLLOWERS_KEY], args=[
                self._follower, now_ms + self._reader_ttl_ms, now_ms - LAPSED_PRESENCE_KEPT_MS,
                self._reader_ttl_ms + LAPSED_PRESENCE_KEPT_MS])
        except (RedisError, OSError) as exc:
            self._presence_due = due
            raise StoreUnavailable("The event log is unavailable.") from exc
        if due is not None and (previous is None or float(previous) <= now_ms):
            log.warning("run follower: this process's presence had lapsed; reading the followed runs again")
            for follows in self._follows.values():
                for follow in follows:
                    follow.queue.put_nowait(None)

    async def _closed(self, run_id: str, *, gone: bool = True) -> bool:
        """Whether the run's record is final (or, unless `gone` is False, gone)."""
        try:
            raw = await self._redis.get(meta_key(run_id))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The run directory is unavailable.") from exc
        return gone if raw is None else RunRecord.from_record(orjson.loads(raw)).status != "running"

    async def _note_reader(self, run_id: str, entry: str) -> bool:
        """Add this follow's reader entry (again); True when it was not there (events may have gone
        unpublished)."""
        now_ms = int(time.time() * 1000)
        try:
            added = await self._note(keys=[reader_key(run_id)],
                                     args=[now_ms + READER_ENTRY_TTL_MS, entry, READER_ENTRY_TTL_MS, now_ms])
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The event log is unavailable.") from exc
        if self._slots is not None:
            self._primaries[run_id] = self._slots.primary_of(reader_key(run_id))
        return bool(added)

    def _slot_map_changed(self) -> None:
        """This process's slot map changed (a command of its own met a failover): the follows of a
        run whose reader set has another primary now note their entries again and read the log
        (the owner, when its own commands meet the move, says so too: `NOTE_AGAIN`)."""
        assert self._slots is not None
        for run_id, follows in self._follows.items():
            primary, known = self._slots.primary_of(reader_key(run_id)), self._primaries.get(run_id)
            if primary is not None and primary != known:
                self._primaries[run_id] = primary
                if known is not None:  # None: not noted yet, or the map had no primary for it then
                    for follow in follows:
                        follow.queue.put_nowait(None)

    async def _catch_up(self, run_id: str, follow: _Follow) -> AsyncIterator[Event]:
        while True:
            try:
                entries = await read_log_confirmed(self._redis, self._confirmation, event_log_key(run_id),
                                                   f"{follow.position + 1}-0", self._page)
            except (RedisError, OSError) as exc:
                raise StoreUnavailable("The event log is unavailable.") from exc
            for _entry_id, fields in entries:
                event = event_from_bytes(fields.get(b"e") or fields["e"])
                if event.seq > follow.position:
                    follow.position = event.seq
                    yield event
            if len(entries) < self._page:
                return

    async def _subscribe(self, run_id: str) -> None:
        channel = tail_channel(run_id).encode()
        confirmed = self._confirmed.get(channel)
        if confirmed is None:
            confirmed = self._confirmed[channel] = asyncio.get_running_loop().create_future()
            self._runs[channel] = run_id
            if self._pubsub is not None:
                try:
                    await self._pubsub.subscribe(channel)
                except (RedisError, OSError):
                    log.warning("run follower: SUBSCRIBE failed; the reader subscribes again")
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_forever(), name="run follower")
        try:
            async with asyncio.timeout(max(5.0, self._block_seconds * 5)):
                await asyncio.shield(confirmed)
        except TimeoutError:
            raise StoreUnavailable("The event log's channel is unavailable.") from None

    async def _read_forever(self) -> None:
        retry = Backoff(0.1, 2.0)
        loop = asyncio.get_running_loop()
        while self._confirmed:
            pubsub = self._pubsub = self._redis.pubsub()
            # Under Sentinel a demoted master keeps this connection until Sentinel reconfigures it,
            # while the owner publishes on the new one: move as soon as the sentinels announce it.
            watch = master_watch(self._redis)
            watched = watch.generation if watch is not None else 0
            try:
                if self._confirmed:
                    await pubsub.subscribe(*self._confirmed)
                tidy_at = loop.time() + self._block_seconds
                while self._confirmed:
                    message = await pubsub.get_message(timeout=self._block_seconds)
                    retry.succeeded()
                    if message is not None:
                        self._dispatch(message)
                    if message is None or loop.time() >= tidy_at:  # not once per message
                        tidy_at = loop.time() + self._block_seconds
                        await self._unsubscribe_unfollowed(pubsub)
                        if watch is not None and pubsub.connection is not None \
                                and watch.moved(pubsub.connection, watched):
                            raise RedisConnectionError("the Redis master moved (a Sentinel failover)")
                        if self._follows:
                            try:
                                await self._keep_present(loop.time())
                            except StoreUnavailable:
                                log.warning("run follower: could not refresh this process's presence")
            except (RedisError, OSError):
                log.warning("run follower: lost the tail channels; resubscribing")
                retry.failed()
                await retry.pause()
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _dispatch(self, message: Mapping[str, Any]) -> None:
        channel = message.get("channel")
        run_id = self._runs.get(channel) if isinstance(channel, bytes) else None
        if run_id is None:
            return
        if message["type"] == "subscribe":
            confirmed = self._confirmed.get(channel)  # type: ignore[arg-type]  # bytes, checked above
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
                return
            for follow in self._follows.get(run_id, ()):  # subscribed again: messages may be missing
                follow.queue.put_nowait(None)
        elif message["type"] == "message":
            # RUN_CLOSED, NOTE_AGAIN (the run's slot moved), or anything else not one of Aura's
            # envelopes: note the entry again, read the log and the record
            try:
                event = None if message["data"] in (RUN_CLOSED, NOTE_AGAIN) else event_from_bytes(message["data"])
            except Exception:
                event = None
            for follow in self._follows.get(run_id, ()):
                follow.queue.put_nowait(event)

    async def _unsubscribe_unfollowed(self, pubsub: Any) -> None:
        gone = [channel for channel, confirmed in self._confirmed.items()
                if confirmed.done() and self._runs[channel] not in self._follows]
        for channel in gone:
            del self._confirmed[channel]
            del self._runs[channel]
        if gone:
            await pubsub.unsubscribe(*gone)

    async def aclose(self) -> None:
        if self._slots is not None:
            self._slots.remove(self._slot_map_changed)
        await stop_reader(self._reader)


CancelHandler = Callable[[str, str], object]


class RedisRunControl(RunControl):
    """Cancel requests travel on the owner instance's own channel: one subscription per process."""

    def __init__(self, redis: RedisClient, instance_id: str) -> None:
        self._redis = redis
        self._instance_id = instance_id
        self._listener: asyncio.Task[None] | None = None

    async def request_cancel(self, instance_id: str, run_id: str, reason: str) -> None:
        try:
            await self._redis.publish(control_channel(instance_id),
                                      orjson.dumps({"type": "cancel", "runId": run_id, "reason": reason}))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("Could not reach the instance running this run.") from exc

    def listen(self, on_cancel: CancelHandler) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen_forever(on_cancel), name="run control")

    async def _listen_forever(self, on_cancel: CancelHandler) -> None:
        retry = Backoff(0.1, 2.0)
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(control_channel(self._instance_id))
                retry.succeeded()
                async for message in pubsub.listen():
                    try:
                        command = orjson.loads(message["data"])
                    except orjson.JSONDecodeError:
                        continue
                    if command.get("type") == "cancel" and isinstance(command.get("runId"), str):
                        on_cancel(command["runId"], str(command.get("reason") or "user_cancelled"))
            except (RedisError, OSError):
                log.warning("run control: lost the control channel; resubscribing")
                retry.failed()
                await retry.pause()
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def aclose(self) -> None:
        await stop_reader(self._listener)
