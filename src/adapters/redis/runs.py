"""The run directory, follower and control channel in Redis.

Keys (Aura's own; not part of the DWP contract; every id percent-encoded, see `keys.key_part`):
- `aura:run:{runId}:meta`      JSON RunRecord; a day while running, the retention time after the end
- `aura:run:{runId}:lease`     the owner instance id, EX lease seconds, renewed by the owner
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
from redis.exceptions import RedisError, ResponseError

from adapters.redis.client import LuaScript, arg, pack, shared_connection
from adapters.redis.events import event_log_key, snapshot_key
from adapters.redis.keys import key_part
from adapters.wire import envelope_bytes, event_from_bytes
from domain.errors import StoreUnavailable
from domain.events import Event
from domain.runs import IdempotencyClaim, RunControl, RunDirectory, RunFollower, RunRecord

log = logging.getLogger("aura.runs")

ACTIVE_TTL_SECONDS = 86_400


def meta_key(run_id: str) -> str:
    return f"aura:run:{key_part(run_id)}:meta"


def lease_key(run_id: str) -> str:
    return f"aura:run:{key_part(run_id)}:lease"


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
return 'ok'
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisRunDirectory(RunDirectory):
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        # Admission and close are on every run's path: they go through the shared connection.
        self._shared = shared_connection(redis)
        self._admit = LuaScript.of(_ADMIT)

    async def _call(self, operation: Awaitable[Any]) -> Any:
        try:
            return await operation
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The run directory is unavailable.") from exc

    async def get(self, run_id: str) -> RunRecord | None:
        raw = await self._call(self._redis.get(meta_key(run_id)))
        return None if raw is None else RunRecord.from_record(orjson.loads(raw))

    async def finish(self, run_id: str, status: str, retention_seconds: int) -> None:
        raw = await self._call(self._redis.get(meta_key(run_id)))
        pipe = self._redis.pipeline(transaction=True)
        if raw is not None:
            record = orjson.loads(raw)
            record["status"] = status
            pipe.set(meta_key(run_id), orjson.dumps(record), ex=retention_seconds)
        pipe.delete(lease_key(run_id))
        await self._call(pipe.execute())

    async def renew_leases(self, run_ids: list[str], instance_id: str, lease_seconds: float) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.set(lease_key(run_id), instance_id, px=int(lease_seconds * 1000))
        await self._call(pipe.execute())

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
                  meta_key(record.run_id), lease_key(record.run_id)],
            args=[now, now + slot_seconds, record.run_id, user_limit, tenant_limit, int(slot_seconds) + 60,
                  orjson.dumps(record.to_record()), ACTIVE_TTL_SECONDS, record.instance_id,
                  int(lease_seconds * 1000)]))
        text = _text(result)
        return None if text == "ok" else text

    async def close(self, record: RunRecord, status: str, retention_seconds: int) -> None:
        """`finish` and the slots' release in one MULTI; the record is the one this owner
        registered, so it is rewritten without being read first."""
        await self._call(self._shared.transaction(
            pack(b"SET", meta_key(record.run_id).encode(), orjson.dumps({**record.to_record(), "status": status}),
                 b"EX", arg(retention_seconds)),
            pack(b"DEL", lease_key(record.run_id).encode()),
            pack(b"ZREM", _user_slots(record.tenant_id, record.user_id).encode(), record.run_id.encode()),
            pack(b"ZREM", _tenant_slots(record.tenant_id).encode(), record.run_id.encode())))

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
        backoff = 0.1
        while self._follows:
            streams = {event_log_key(run_id): f"{self._positions[run_id]}-1" for run_id in self._follows}
            try:
                replies: list[Any] = cast(Any, await self._redis.xread(cast(Any, streams), block=self._block_ms,
                                                                        count=500))
                backoff = 0.1
            except (RedisError, OSError):
                log.warning("run follower: the event log is unreachable; retrying")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            for key, entries in replies or []:
                run_id = unquote(_text(key).split(":")[2])
                for _entry_id, fields in entries:
                    event = event_from_bytes(fields.get(b"e") or fields["e"])
                    self._positions[run_id] = max(self._positions.get(run_id, 0), event.seq)
                    for follow in tuple(self._follows.get(run_id, ())):
                        follow.queue.put_nowait(event)

    async def append_if_absent(self, event: Event) -> bool:
        try:
            await self._redis.xadd(event_log_key(event.ids.run_id), {"e": envelope_bytes(event)},
                                   id=f"{event.seq}-1")
        except ResponseError:
            return False  # that seq exists: the owner (or another follower) got there first
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The event log is unavailable.") from exc
        return True

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
        backoff = 0.1
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(control_channel(self._instance_id))
                backoff = 0.1
                async for message in pubsub.listen():
                    try:
                        command = orjson.loads(message["data"])
                    except orjson.JSONDecodeError:
                        continue
                    if command.get("type") == "cancel" and isinstance(command.get("runId"), str):
                        on_cancel(command["runId"], str(command.get("reason") or "user_cancelled"))
            except (RedisError, OSError):
                log.warning("run control: lost the control channel; resubscribing")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
