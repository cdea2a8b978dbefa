"""The run event log as Redis Streams: `aura:run:{runId}:events`.

Entry ids are `<seq>-1`, so Redis itself refuses a duplicate or out-of-order append, a reader asks
for "everything after seq N" with one XRANGE, and a trimmed log shows as a gap between N and the
first retained id. Appends from all runs of the process are gathered into one batch per round
trip, written on the client's shared connection (with other runs' admissions and closes): under
load many events cost one network exchange; alone, an event costs one. Appends are submitted
without waiting; each caller learns, through its callback and in order, when its event is stored,
and only then hands it to clients ("logged before it is written to any client").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from adapters.redis.client import pack, shared_connection
from adapters.redis.keys import key_part
from adapters.wire import envelope_bytes, event_from_bytes
from domain.errors import StoreUnavailable
from domain.events import Event, EventType
from domain.ports import EventLog

log = logging.getLogger("aura.eventlog")


def event_log_key(run_id: str) -> str:
    return f"aura:run:{key_part(run_id)}:events"


def snapshot_key(run_id: str) -> str:
    return f"aura:run:{key_part(run_id)}:snapshot"


# A run whose append failed gets only its closing events written after that: anything else would
# leave a silent hole in its log that a resume could not see.
_ALWAYS_ATTEMPTED = frozenset({EventType.ERROR, EventType.END})


@dataclass(slots=True)
class _PendingAppend:
    event: Event
    payload: bytes
    snapshot: Mapping[str, Any] | None
    logged: Callable[[Exception | None], None]
    reported: bool = False
    commands: int = 0


class RedisEventLog(EventLog):
    def __init__(self, redis: Redis, *, max_length: int = 10_000, retention_seconds: int = 3600,
                 active_ttl_seconds: int = 86_400, max_batch: int = 512) -> None:
        self._redis = redis
        self._connection = shared_connection(redis)
        self._max_length = max_length
        self._max_length_arg = b"%d" % max_length
        self._retention = retention_seconds
        self._retention_arg = b"%d" % retention_seconds
        # A log whose owner died without closing it still expires, a day later by default.
        self._active_ttl = active_ttl_seconds
        self._active_ttl_arg = b"%d" % active_ttl_seconds
        self._max_batch = max_batch
        self._queue: list[_PendingAppend] = []
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._broken: set[str] = set()  # runs with a failed append, until they are closed
        self._closed: set[str] = set()  # runs whose `end` was logged, until close_run is called

    def submit(self, event: Event, snapshot: Mapping[str, Any] | None,
               logged: Callable[[Exception | None], None]) -> None:
        self._queue.append(_PendingAppend(event, envelope_bytes(event), snapshot, logged))
        self._wakeup.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_forever(), name="event-log flusher")

    async def _flush_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                await self._flush(batch)

    async def _flush(self, batch: list[_PendingAppend]) -> None:
        commands: list[bytes] = []
        written: list[_PendingAppend] = []
        # A snapshot is the run's state after its event; within one batch only each run's last
        # one needs writing, since the whole batch is sent at once.
        last_snapshot = {item.event.ids.run_id: item for item in batch if item.snapshot is not None}
        for item in batch:
            run_id = item.event.ids.run_id
            if run_id in self._broken and item.event.type not in _ALWAYS_ATTEMPTED:
                _report(item, StoreUnavailable("The event log is unavailable."))
                continue
            written.append(item)
            key = event_log_key(run_id).encode()
            commands.append(pack(b"XADD", key, b"MAXLEN", b"~", self._max_length_arg,
                                 b"%d-1" % item.event.seq, b"e", item.payload))
            item.commands = 1
            if item.event.seq == 1:
                commands.append(pack(b"EXPIRE", key, self._active_ttl_arg))
                item.commands += 1
            ending = item.event.type is EventType.END
            if item.snapshot is not None and last_snapshot[run_id] is item:
                commands.append(pack(b"SET", snapshot_key(run_id).encode(), orjson.dumps(item.snapshot), b"EX",
                                     self._retention_arg if ending else self._active_ttl_arg))
                item.commands += 1
            if ending:  # the run's last event starts its retention: no separate round trip to close
                commands.append(pack(b"EXPIRE", key, self._retention_arg))
                commands.append(pack(b"EXPIRE", snapshot_key(run_id).encode(), self._retention_arg))
                item.commands += 2
        if not written:
            return
        try:
            results = await self._connection.execute(b"".join(commands), len(commands))
        except asyncio.CancelledError:
            for item in written:
                _report(item, StoreUnavailable("The event log is closed."))
            raise
        except (RedisError, OSError) as exc:
            log.warning("event log append failed: %s", type(exc).__name__)
            for item in written:
                self._broken.add(item.event.ids.run_id)
                _report(item, StoreUnavailable("The event log is unavailable."))
            return
        index = 0
        for item in written:
            result = results[index]
            index += item.commands
            if isinstance(result, ResponseError) and "equal or smaller" in str(result):
                _report(item, None)  # already logged (a retried append): nothing lost
            elif isinstance(result, Exception):
                self._broken.add(item.event.ids.run_id)
                _report(item, StoreUnavailable("The event log refused an event."))
            else:
                if item.event.type is EventType.END:
                    self._closed.add(item.event.ids.run_id)
                _report(item, None)

    async def read_after(self, run_id: str, after_seq: int, limit: int = 500) -> Sequence[Event]:
        try:
            entries: list[tuple[Any, dict[Any, Any]]] = cast(Any, await self._redis.xrange(
                event_log_key(run_id), min=f"{after_seq + 1}-0", max="+", count=limit))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The event log is unavailable.") from exc
        return [event_from_bytes(fields.get(b"e") or fields["e"]) for _entry_id, fields in entries]

    async def first_seq(self, run_id: str) -> int | None:
        """The oldest retained seq (None for an unknown or expired run)."""
        try:
            entries = await self._redis.xrange(event_log_key(run_id), count=1)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The event log is unavailable.") from exc
        if not entries:
            return None
        entry_id = entries[0][0]
        text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return int(text.split("-", 1)[0])

    async def close_run(self, run_id: str) -> None:
        self._broken.discard(run_id)
        if run_id in self._closed:  # its logged `end` already set the retention
            self._closed.discard(run_id)
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.expire(event_log_key(run_id), self._retention)
            pipe.expire(snapshot_key(run_id), self._retention)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The event log is unavailable.") from exc

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        queued, self._queue = self._queue, []
        for item in queued:  # nobody may wait forever for an append that will never be tried
            _report(item, StoreUnavailable("The event log is closed."))


def _report(item: _PendingAppend, error: Exception | None) -> None:
    if item.reported:
        return
    item.reported = True
    try:
        item.logged(error)
    except Exception:  # one caller's failure must not stop the flusher for every other run
        log.exception("event-log callback failed for run %s", item.event.ids.run_id)
