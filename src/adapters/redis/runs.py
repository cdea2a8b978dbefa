"""The run directory, follower and control channel in Redis.

Keys (Aura's own; not part of the DWP contract; every id percent-encoded, see `keys.key_part`):
- `aura:run:{runId}:meta`      JSON RunRecord; a day while running, the retention time after the end
- `aura:run:{runId}:lease`     the owner instance id, PX lease milliseconds, renewed by the owner only
                               while it still holds it (compare and set)
- `aura:run:{runId}:reader`    set while another instance streams the run to a client (PX a few
                               seconds, refreshed): its owner does not cancel it for want of a reader
- `aura:runs:active`           sorted set of running run ids, scored by when their lease lapses (ms),
                               so lost runs are found even when nobody follows them
- `aura:run:{runId}:snapshot`  the run's state as JSON (written with the event log)
- `aura:idem:{tenant}:{user}:{sha256(key)}`  {"runId", "fingerprint"} for Idempotency-Key
- `aura:slots:user:{tenant}:{user}`, `aura:slots:tenant:{tenant}`  sorted sets of running run ids,
  scored by when their slot lapses (so a crashed instance's runs free their slots by themselves)
- channel `aura:instance:{instanceId}:control`  cancel requests for the runs an instance owns
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from adapters.redis.approvals import encode_json, pending_index_key, request_key, session_key
from adapters.redis.client import LuaScript, shared_connection
from adapters.redis.events import event_log_key, lease_key, snapshot_key
from adapters.redis.keys import key_part
from adapters.wire import envelope_bytes, event_from_bytes
from domain.model.errors import StoreUnavailable
from domain.model.events import Event
from domain.model.runs import IdempotencyClaim, LostRun, RunControl, RunDirectory, RunFollower, RunRecord
from domain.runtime.waits import Backoff

log = logging.getLogger("aura.runs")

ACTIVE_TTL_SECONDS = 86_400


def meta_key(run_id: str) -> str:
    return f"aura:run:{key_part(run_id)}:meta"


ACTIVE_RUNS_KEY = "aura:runs:active"


def reader_key(run_id: str) -> str:
    return f"aura:run:{key_part(run_id)}:reader"


def _user_slots(tenant_id: str, user_id: str) -> str:
    return f"aura:slots:user:{key_part(tenant_id)}:{key_part(user_id)}"


def _tenant_slots(tenant_id: str) -> str:
    return f"aura:slots:tenant:{key_part(tenant_id)}"


def control_channel(instance_id: str) -> str:
    return f"aura:instance:{key_part(instance_id)}:control"


# A run's admission in one atomic step: drop lapsed slots, refuse when the user's or the tenant's
# limit is reached, else take both slots and write the run's record and owner lease.
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 'user' end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 'tenant' end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('SET', KEYS[3], ARGV[7], 'EX', ARGV[8])
redis.call('SET', KEYS[4], ARGV[9], 'PX', ARGV[10])
redis.call('ZADD', KEYS[5], ARGV[11], ARGV[3])
return 'ok'
"""

# KEYS: active runs, then each run's lease; ARGV: 1 owner, 2 lease ms, 3 lease deadline (ms), then
# each run id. Reply: the runs whose lease is not the owner's any more (nothing written for them).
_RENEW = """
local lost = {}
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[i + 2])
  else
    lost[#lost + 1] = ARGV[i + 2]
  end
end
return lost
"""

# KEYS: meta, lease, user slots, tenant slots, active runs; ARGV: owner, final record, retention, run id
_CLOSE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[4])
redis.call('ZREM', KEYS[4], ARGV[4])
redis.call('ZREM', KEYS[5], ARGV[4])
return 1
"""

# KEYS: 1 log, 2 lease, 3 meta, 4 snapshot, 5 user slots, 6 tenant slots, 7 active runs
#       [, 8 approval request, 9 approval session, 10 pending approvals index]
# ARGV: 1 the log's expected last entry id ('' for an empty log), 2 error entry id, 3 error bytes,
#       4 end entry id, 5 end bytes, 6 final record, 7 final snapshot ('' for none), 8 retention,
#       9 run id, 10 max log length[, 11 expected request bytes, 12 cancelled request bytes,
#       13 expected session bytes, 14 cancelled session bytes, 15 request id]
_DECLARE_LOST = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 'alive' end
local function forget()
  redis.call('ZREM', KEYS[7], ARGV[9])
  redis.call('ZREM', KEYS[5], ARGV[9])
  redis.call('ZREM', KEYS[6], ARGV[9])
end
local meta = redis.call('GET', KEYS[3])
if not meta then forget() return 'finished' end
local ok, record = pcall(cjson.decode, meta)
if not ok or type(record) ~= 'table' or record.status ~= 'running' then forget() return 'finished' end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last then
  local fields = last[2]
  for i = 1, #fields, 2 do
    if fields[i] == 't' then forget() return 'finished' end
  end
  if last[1] ~= ARGV[1] then return 'moved' end
elseif ARGV[1] ~= '' then
  return 'moved'
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[10], ARGV[2], 'e', ARGV[3])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[10], ARGV[4], 'e', ARGV[5], 't', '1')
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('SET', KEYS[3], ARGV[6], 'EX', ARGV[8])
if ARGV[7] ~= '' then redis.call('SET', KEYS[4], ARGV[7], 'EX', ARGV[8]) end
forget()
if #KEYS >= 8 and redis.call('GET', KEYS[8]) == ARGV[11] then
  redis.call('SET', KEYS[8], ARGV[12], 'XX', 'KEEPTTL')
  if redis.call('GET', KEYS[9]) == ARGV[13] then redis.call('SET', KEYS[9], ARGV[14], 'XX', 'KEEPTTL') end
  redis.call('ZREM', KEYS[10], ARGV[15])
end
return 'declared'
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisRunDirectory(RunDirectory):
    def __init__(self, redis: Redis, *, max_log_length: int = 10_000) -> None:
        self._redis = redis
        self._max_log_length = max_log_length
        # Admission and close are on every run's path: they go through the shared connection.
        self._shared = shared_connection(redis)
        self._admit = LuaScript.of(_ADMIT)
        self._renew = LuaScript.of(_RENEW)
        self._close = LuaScript.of(_CLOSE)
        self._declare_lost = LuaScript.of(_DECLARE_LOST)

    async def _call(self, operation: Awaitable[Any]) -> Any:
        try:
            return await operation
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The run directory is unavailable.") from exc

    async def get(self, run_id: str) -> RunRecord | None:
        raw = await self._call(self._redis.get(meta_key(run_id)))
        return None if raw is None else RunRecord.from_record(orjson.loads(raw))

    async def renew_leases(self, run_ids: list[str], instance_id: str, lease_seconds: float) -> list[str]:
        if not run_ids:
            return []
        lease_ms = int(lease_seconds * 1000)
        lost = await self._call(self._renew.run(
            self._shared, keys=[ACTIVE_RUNS_KEY, *(lease_key(run_id) for run_id in run_ids)],
            args=[instance_id, lease_ms, int(time.time() * 1000) + lease_ms, *run_ids]))
        return [_text(run_id) for run_id in lost or ()]

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
        return IdempotencyClaim(run_id=existing["runId"], fingerprint=existing["fingerprint"])

    async def admit(self, record: RunRecord, *, user_limit: int, tenant_limit: int, slot_seconds: float,
                    lease_seconds: float) -> str | None:
        now = time.time()
        result = await self._call(self._admit.run(
            self._shared,
            keys=[_user_slots(record.tenant_id, record.user_id), _tenant_slots(record.tenant_id),
                  meta_key(record.run_id), lease_key(record.run_id), ACTIVE_RUNS_KEY],
            args=[now, now + slot_seconds, record.run_id, user_limit, tenant_limit, int(slot_seconds) + 60,
                  orjson.dumps(record.to_record()), ACTIVE_TTL_SECONDS, record.instance_id,
                  int(lease_seconds * 1000), int((now + lease_seconds) * 1000)]))
        text = _text(result)
        return None if text == "ok" else text

    async def close(self, record: RunRecord, status: str, retention_seconds: int) -> bool:
        """The record is the one this owner registered, so it is rewritten without being read first."""
        closed = await self._call(self._close.run(
            self._shared,
            keys=[meta_key(record.run_id), lease_key(record.run_id), _user_slots(record.tenant_id, record.user_id),
                  _tenant_slots(record.tenant_id), ACTIVE_RUNS_KEY],
            args=[record.instance_id, orjson.dumps({**record.to_record(), "status": status}), retention_seconds,
                  record.run_id]))
        return bool(closed)

    async def declare_lost(self, lost: LostRun) -> str:
        record = lost.record
        run_id = record.run_id
        keys = [event_log_key(run_id), lease_key(run_id), meta_key(run_id), snapshot_key(run_id),
                _user_slots(record.tenant_id, record.user_id), _tenant_slots(record.tenant_id), ACTIVE_RUNS_KEY]
        args: list[bytes | str | int] = [
            f"{lost.after_seq}-1" if lost.after_seq else "", f"{lost.error.seq}-1", envelope_bytes(lost.error),
            f"{lost.end.seq}-1", envelope_bytes(lost.end), orjson.dumps({**record.to_record(), "status": "failed"}),
            b"" if lost.snapshot is None else orjson.dumps(lost.snapshot), lost.retention_seconds, run_id,
            self._max_log_length]
        if lost.approval is not None:
            stored, cancelled = lost.approval
            pending = stored.request
            keys += [request_key(pending.request_id), session_key(pending.session_id),
                     pending_index_key(pending.tenant_id, pending.user_id)]
            args += [stored.version, encode_json(cancelled.to_record()), encode_json(pending.session_record()),
                     encode_json(cancelled.session_record()), pending.request_id]
        return _text(await self._call(self._declare_lost.run(self._shared, keys=keys, args=args)))

    async def stale_runs(self, limit: int) -> list[str]:
        due = await self._call(self._redis.zrangebyscore(ACTIVE_RUNS_KEY, "-inf", int(time.time() * 1000),
                                                         start=0, num=limit))
        return [_text(run_id) for run_id in due]

    async def note_reader(self, run_id: str, ttl_seconds: float) -> None:
        await self._call(self._redis.set(reader_key(run_id), b"1", px=int(ttl_seconds * 1000)))

    async def has_reader(self, run_id: str) -> bool:
        return bool(await self._call(self._redis.exists(reader_key(run_id))))

    async def save_snapshot(self, run_id: str, snapshot: Mapping[str, Any], ttl_seconds: int) -> None:
        await self._call(self._redis.set(snapshot_key(run_id), orjson.dumps(snapshot), ex=ttl_seconds))

    async def get_snapshot(self, run_id: str) -> dict[str, Any] | None:
        raw = await self._call(self._redis.get(snapshot_key(run_id)))
        return None if raw is None else cast(dict[str, Any], orjson.loads(raw))


@dataclass(eq=False)
class _Follow:
    position: int
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)


class RedisRunFollower(RunFollower):
    """One blocking XREAD per process serves every remote follow: the reader asks for all followed
    logs at once and hands each new entry to the follows of that run."""

    def __init__(self, redis: Redis, *, block_ms: int = 1000) -> None:
        self._redis = redis
        self._block_ms = block_ms
        self._follows: dict[str, set[_Follow]] = defaultdict(set)
        self._positions: dict[str, int] = {}
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def follow(self, run_id: str, after_seq: int) -> AsyncIterator[Event | None]:
        follow = _Follow(after_seq)
        self._follows[run_id].add(follow)
        self._positions[run_id] = min(self._positions.get(run_id, after_seq), after_seq)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_forever(), name="run follower")
        try:
            while True:
                try:
                    # Not asyncio.wait_for: on Python 3.11 it can swallow the cancel of a client
                    # that leaves just as an event arrives, and the follow would outlive it.
                    async with asyncio.timeout(self._block_ms / 1000):
                        event = await follow.queue.get()
                except TimeoutError:
                    yield None
                    continue
                if event.seq <= follow.position:
                    continue
                follow.position = event.seq
                yield event
        finally:
            followers = self._follows.get(run_id)
            if followers is not None:
                followers.discard(follow)
                if not followers:
                    del self._follows[run_id]
                    self._positions.pop(run_id, None)

    async def _read_forever(self) -> None:
        retry = Backoff(0.1, 2.0)
        while self._follows:
            streams = {event_log_key(run_id): f"{self._positions[run_id]}-1" for run_id in self._follows}
            try:
                replies: list[Any] = cast(Any, await self._redis.xread(cast(Any, streams), block=self._block_ms,
                                                                        count=500))
                retry.succeeded()
            except (RedisError, OSError):
                log.warning("run follower: the event log is unreachable; retrying")
                retry.failed()
                await retry.pause()
                continue
            for key, entries in replies or []:
                run_id = unquote(_text(key).split(":")[2])
                for _entry_id, fields in entries:
                    event = event_from_bytes(fields.get(b"e") or fields["e"])
                    self._positions[run_id] = max(self._positions.get(run_id, 0), event.seq)
                    for follow in tuple(self._follows.get(run_id, ())):
                        follow.queue.put_nowait(event)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


CancelHandler = Callable[[str, str], object]


class RedisRunControl(RunControl):
    """Cancel requests travel on the owner instance's own channel: one subscription per process."""

    def __init__(self, redis: Redis, instance_id: str) -> None:
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
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
