"""The run event log as Redis Streams: `aura:run:{runId}:events`.

Entry ids are `<seq>-1`, so Redis itself refuses a duplicate or out-of-order append, a reader asks
for "everything after seq N" with one XRANGE, and a trimmed log shows as a gap between N and the
first retained id. The `end` entry carries a field `t`: a finished run's log refuses every later
append. Each append is one script (`_APPEND`) that checks, in the same step as the XADD, that the
log holds no `end` yet, that the run's lease still names this instance (fencing: an owner that lost
its lease cannot write) and that no *different* event holds the seq (a retried append of the same
bytes is answered "already logged"). Appends from all runs of the process are gathered into one
batch per round trip: on one server, commands packed here and written on a connection the log
holds (`packed.py` says why); on a cluster, a pipeline (one write per server holding those runs).
Under load many events cost one network exchange; alone, an event costs one. Appends are submitted
without waiting; each caller learns, through its callback and in order, when its event is stored,
and only then hands it to clients ("logged before it is written to any client").

When replicas must confirm writes (`WAIT`, under Sentinel: durability.py), "stored" means "held by
the replicas too": the batch ends with a `WAIT` in the same write, and an event it did not confirm
is reported failed. Followers on other instances then must not see an event before that either, so
the append script does not publish it but says whether the run has readers ('read'); once the
`WAIT` confirmed the batch, those events are published, in the next write on the same connection.
A reader that registers after the append finds the event in its first log read instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from adapters.redis.client import RedisClient, batch, run_batch
from adapters.redis.durability import ReplicaConfirmation, read_log_confirmed
from adapters.redis.keys import run_key
from adapters.redis.packed import PackedConnection, pack
from adapters.redis.topology import NOTE_AGAIN, slot_map
from adapters.wire import envelope_bytes, event_from_bytes
from domain.model.errors import RunFenced, StoreUnavailable
from domain.model.events import Event, EventType
from domain.model.ports import EventLog

log = logging.getLogger("aura.eventlog")


def event_log_key(run_id: str) -> str:
    return run_key(run_id, "events")


def snapshot_key(run_id: str) -> str:
    return run_key(run_id, "snapshot")


def lease_key(run_id: str) -> str:
    return run_key(run_id, "lease")


# The field that marks a run's terminal entry.
TERMINAL_FIELD = b"t"

# KEYS: 1 log, 2 lease, 3 snapshot, 4 reader (one run: one slot)
# ARGV: 1 entry id, 2 envelope, 3 '1' for the run's `end`, 4 the owner the lease must name ('' when
#       not checked), 5 max length, 6 snapshot ('' for none), 7 snapshot TTL, 8 log TTL ('' keeps it),
#       9 the run's tail channel (published to while another instance reads the run; '' publishes nothing)
# Reply: 'ok', 'dup' (these exact bytes are logged at this id already), 'collision' (other bytes
# are, or a later id is), 'finished' (the log holds an `end`), 'fenced' (the lease is not the owner's);
# 'read' for 'ok' when ARGV[9] is '' and the run has readers: the caller publishes it later itself
_APPEND = """
local same = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])[1]
if same then
  local fields = same[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'e' and fields[i + 1] == ARGV[2] then return 'dup' end
  end
  return 'collision'
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if last then
  local fields = last[2]
  for i = 1, #fields, 2 do
    if fields[i] == 't' then return 'finished' end
  end
end
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[4] then return 'fenced' end
local added
if ARGV[3] == '1' then
  added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], ARGV[1], 'e', ARGV[2], 't', '1')
else
  added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], ARGV[1], 'e', ARGV[2])
end
if type(added) == 'table' and added.err then return 'collision' end
if ARGV[6] ~= '' then redis.call('SET', KEYS[3], ARGV[6], 'EX', ARGV[7]) end
if ARGV[8] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[8]) end
if ARGV[3] == '1' then redis.call('EXPIRE', KEYS[3], ARGV[7]) end
if redis.call('EXISTS', KEYS[4]) == 1 then
  if ARGV[9] == '' then return 'read' end
  redis.call('PUBLISH', ARGV[9], ARGV[2])
end
return 'ok'
"""


# A run whose append failed gets only its closing events written after that: anything else would
# leave a silent hole in its log that a resume could not see.
_ALWAYS_ATTEMPTED = frozenset({EventType.ERROR, EventType.END})

# Appends per round trip at most. A thousand busy streams add a thousand events per loop pass: a
# batch of 512 holds less than one event per run, so each stream is woken (one SSE write) per
# event; 2,048 lets a batch carry a few per run (same-run A/B at 1,000 streams: 75.4 -> 60.2 us of
# CPU per event). Redis then runs one batch for about 2,048 x the ~15 us of Redis CPU per event the
# bench measures, ~30 ms, which other clients wait behind only when Redis is that busy anyway.
MAX_BATCH = 2048

# How many runs' followers are told at once that the run's slot moved (one PUBLISH each).
_ANNOUNCE_AT_ONCE = 32

# How many more loop passes a batch waits for while runs keep adding to it (see `_gather`).
_MAX_GATHER_PASSES = 4


@dataclass(slots=True)
class _PendingAppend:
    event: Event
    payload: bytes
    snapshot: Mapping[str, Any] | None
    logged: Callable[[Exception | None], None]
    reported: bool = False


class RedisEventLog(EventLog):
    def __init__(self, redis: RedisClient, *, max_length: int, retention_seconds: int,
                 active_ttl_seconds: int = 86_400, max_batch: int = MAX_BATCH, owner: str | None = None,
                 confirmation: ReplicaConfirmation | None = None) -> None:
        self._redis = redis
        # Events are acknowledged (handed to clients, published to followers) only once this many
        # replicas hold them.
        self._confirmation = confirmation
        if confirmation is not None and not isinstance(redis, Redis):
            raise ValueError("replica confirmation (WAIT) needs one server or a Sentinel group, not a cluster")
        # The instance id a run's lease must name for its events to be logged (None: not checked,
        # for a log used without a run directory).
        self._owner = (owner or "").encode()
        self._append = redis.register_script(_APPEND)
        self._append_sha = self._append.sha.encode()
        self._packed = PackedConnection(redis) if isinstance(redis, Redis) else None
        # Each run's keys and channel, encoded once (until its close_run).
        self._run_keys: dict[str, tuple[bytes, bytes, bytes, bytes, bytes]] = {}
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
        self._fenced: set[str] = set()  # runs this instance may no longer write, until close_run
        # On a cluster: each open run's slot's primary as last seen. When a failover moves it, the
        # run's followers are told to note their reader entries again (topology.py).
        self._slots = slot_map(redis)
        self._primaries: dict[str, str | None] = {}
        self._announcing: set[asyncio.Task[None]] = set()
        if self._slots is not None:
            self._slots.on_change(self._slot_map_changed)

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
                await self._gather()
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                await self._flush(batch)

    async def _gather(self) -> None:
        """Let the event loop run while the runs it schedules keep adding to the batch (at most
        `_MAX_GATHER_PASSES` passes, and not past a full batch): a round trip then carries several
        events per run, and each stream is woken once for them (one SSE write), not once per event.
        A pass that adds nothing ends it, so a lone event (a run's `start`, an approval's `hitl`)
        waits one pass. Without it a batch of 100 busy streams holds one pass of events, and Aura's
        CPU per event is 1.2-1.3x (bench, same-run `--against`)."""
        for _ in range(_MAX_GATHER_PASSES):
            queued = len(self._queue)
            await asyncio.sleep(0)
            if len(self._queue) == queued or len(self._queue) >= self._max_batch:
                return

    async def _flush(self, batch: list[_PendingAppend]) -> None:
        written: list[_PendingAppend] = []
        # A snapshot is the run's state after its event; within one batch only each run's last
        # one needs writing, since the whole batch is sent at once.
        last_snapshot = {item.event.ids.run_id: item for item in batch if item.snapshot is not None}
        for item in batch:
            run_id = item.event.ids.run_id
            if run_id in self._fenced:
                _report(item, RunFenced("This instance no longer owns the run."))
                continue
            if run_id in self._broken and item.event.type not in _ALWAYS_ATTEMPTED:
                _report(item, StoreUnavailable("The event log is unavailable."))
                continue
            written.append(item)
        if not written:
            return
        try:
            results = await self._send([self._append_arguments(item, last_snapshot) for item in written])
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
        for item, result in zip(written, results, strict=True):
            if isinstance(result, Exception):
                log.warning("event log append failed: %s", type(result).__name__)
                outcome = None
            else:
                outcome = result.decode() if isinstance(result, bytes) else result
            if outcome in ("ok", "dup", "read"):  # dup: a retried append of the same event, nothing lost
                if item.event.type is EventType.END:
                    self._closed.add(item.event.ids.run_id)
                _report(item, None)
            elif outcome == _UNCONFIRMED:
                self._broken.add(item.event.ids.run_id)
                _report(item, StoreUnavailable("The event log's replicas did not confirm an event."))
            elif outcome in ("finished", "fenced", "collision"):
                run_id = item.event.ids.run_id
                log.warning("event log refused seq %d of run %s: %s", item.event.seq, run_id, outcome)
                self._fenced.add(run_id)
                _report(item, RunFenced(_REFUSALS[outcome]))
            else:
                self._broken.add(item.event.ids.run_id)
                _report(item, StoreUnavailable("The event log refused an event."))

    async def _send(self, calls: list[tuple[list[bytes], list[bytes]]]) -> list[Any]:
        """Each (keys, args) as an EVALSHA of the append script, in one batch; the replies in order
        (error replies as values; `_UNCONFIRMED` for an append the replicas did not confirm). A
        server that does not know the script (a restart, a flushed cache) gets it loaded, and those
        calls again: they did not run."""
        if self._packed is None:
            return await run_batch(self._redis, [(self._append, keys, args) for keys, args in calls])
        if self._confirmation is None:
            return await self._evalsha(self._append_sha, _APPEND, calls)
        # The script publishes nothing (no channel): the events of followed runs go to followers
        # once confirmed (a retried append's too: its first attempt published nothing).
        results = await self._evalsha(self._append_sha, _APPEND, [(keys, [*args[:8], b""]) for keys, args in calls])
        published = [(args[8], args[1]) for (_keys, args), result in zip(calls, results, strict=True)
                     if result in (b"read", b"dup")]
        if published:
            await self._publish_confirmed(published)
        return results

    async def _evalsha(self, sha: bytes, body: str, calls: list[tuple[list[bytes], list[bytes]]]) -> list[Any]:
        """Each call of the script `sha` in one packed write (then the `WAIT`, when replicas must
        confirm: an unconfirmed batch's successes become `_UNCONFIRMED`)."""
        assert self._packed is not None  # one server: the caller checked
        numkeys = b"%d" % len(calls[0][0])
        confirmation = self._confirmation
        wait = confirmation.command() if confirmation is not None else b""
        packed = b"".join(pack(b"EVALSHA", sha, numkeys, *keys, *args) for keys, args in calls)
        results = await self._packed.execute(packed + wait, len(calls) + bool(wait))
        unknown = [index for index, result in enumerate(results[:len(calls)]) if isinstance(result, NoScriptError)]
        if unknown:
            await self._redis.script_load(body)
            again = await self._packed.execute(b"".join(
                pack(b"EVALSHA", sha, numkeys, *calls[index][0], *calls[index][1]) for index in unknown) + wait,
                len(unknown) + bool(wait))
            if wait:  # the later WAIT covers the first write's commands too
                results[-1] = again.pop()
            for index, result in zip(unknown, again, strict=True):
                results[index] = result
        if confirmation is not None:
            try:
                confirmation.check(results.pop())
            except RedisError as error:
                log.warning("event log: %s", error)
                results = [_UNCONFIRMED if result in (b"ok", b"dup", b"read") else result for result in results]
        return results

    async def _publish_confirmed(self, publications: list[tuple[bytes, bytes]]) -> None:
        """PUBLISH each confirmed (channel, envelope) in one write. A lost publication is a gap the
        follower fills from the log at the run's next event, or when its subscription is renewed."""
        assert self._packed is not None
        try:
            packed = b"".join(pack(b"PUBLISH", channel, payload) for channel, payload in publications)
            await self._packed.execute(packed, len(publications))
        except (RedisError, OSError) as exc:
            log.warning("event log: could not publish confirmed events to followers: %s", type(exc).__name__)

    def _keys_of(self, run_id: str) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        keys = self._run_keys.get(run_id)
        if keys is None:
            keys = self._run_keys[run_id] = (
                event_log_key(run_id).encode(), lease_key(run_id).encode(), snapshot_key(run_id).encode(),
                run_key(run_id, "reader").encode(), run_key(run_id, "tail").encode())
            if self._slots is not None:
                self._primaries[run_id] = self._slots.primary_of(keys[0])
        return keys

    def _slot_map_changed(self) -> None:
        """The runs this instance writes whose slot has another primary now: a master that died
        before its replica had the run's reader set took it along, and the owner would publish
        nothing more to a follow that waits. One `PUBLISH` of `NOTE_AGAIN` per such run, once per
        move (not per event, nor periodically): its followers note their entries again."""
        assert self._slots is not None
        moved = []
        for run_id, keys in self._run_keys.items():
            primary, known = self._slots.primary_of(keys[0]), self._primaries.get(run_id)
            if primary is not None and primary != known:
                self._primaries[run_id] = primary
                if known is not None:  # None: the map had no primary for it yet (a first refresh)
                    moved.append(keys[4])
        if moved:
            task = asyncio.get_running_loop().create_task(self._announce_moved(moved), name="event log: slots moved")
            self._announcing.add(task)
            task.add_done_callback(self._announcing.discard)

    async def _announce_moved(self, channels: list[bytes]) -> None:
        # A cluster pipeline takes no keyless command: PUBLISHes side by side, a few at a time.
        for start in range(0, len(channels), _ANNOUNCE_AT_ONCE):
            replies = await asyncio.gather(*(self._redis.publish(channel, NOTE_AGAIN) for channel in
                                             channels[start:start + _ANNOUNCE_AT_ONCE]), return_exceptions=True)
            failed = [reply for reply in replies if isinstance(reply, Exception)]
            if failed:
                # the followers' own slot map, resubscription and the runs' closes still reach them
                log.warning("event log: could not tell %d runs' followers their slot moved: %s", len(failed),
                            type(failed[0]).__name__)

    def _append_arguments(self, item: _PendingAppend, last_snapshot: Mapping[str, _PendingAppend]
                          ) -> tuple[list[bytes], list[bytes]]:
        event = item.event
        run_id = event.ids.run_id
        ending = event.type is EventType.END
        snapshot = b""
        if item.snapshot is not None and last_snapshot[run_id] is item:
            snapshot = orjson.dumps(item.snapshot)
        log_ttl = self._retention_arg if ending else self._active_ttl_arg if event.seq == 1 else b""
        log_key, lease, snapshot_name, reader, tail = self._keys_of(run_id)
        return ([log_key, lease, snapshot_name, reader],
                [b"%d-1" % event.seq, item.payload, b"1" if ending else b"0", self._owner, self._max_length_arg,
                 snapshot, self._retention_arg if ending else self._active_ttl_arg, log_ttl, tail])

    async def read_after(self, run_id: str, after_seq: int, limit: int = 500) -> Sequence[Event]:
        """Events after `after_seq`; when replicas must confirm writes, only once they hold all of
        them (a `WAIT` after the XRANGE, on its connection: durability.py)."""
        try:
            entries = await read_log_confirmed(self._redis, self._confirmation, event_log_key(run_id),
                                               f"{after_seq + 1}-0", limit)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The event log is unavailable.") from exc
        return [event_from_bytes(fields.get(b"e") or fields["e"]) for _entry_id, fields in entries]

    async def last_event(self, run_id: str) -> Event | None:
        try:
            entries: list[tuple[Any, dict[Any, Any]]] = cast(Any, await self._redis.xrevrange(
                event_log_key(run_id), count=1))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The event log is unavailable.") from exc
        return event_from_bytes(entries[0][1].get(b"e") or entries[0][1]["e"]) if entries else None

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
        self._run_keys.pop(run_id, None)
        self._primaries.pop(run_id, None)
        self._broken.discard(run_id)
        if run_id in self._fenced:  # another writer finished the log: its retention is theirs
            self._fenced.discard(run_id)
            self._closed.discard(run_id)
            return
        if run_id in self._closed:  # its logged `end` already set the retention
            self._closed.discard(run_id)
            return
        try:
            pipe = batch(self._redis)
            pipe.expire(event_log_key(run_id), self._retention)
            pipe.expire(snapshot_key(run_id), self._retention)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable("The event log is unavailable.") from exc

    async def aclose(self) -> None:
        if self._slots is not None:
            self._slots.remove(self._slot_map_changed)
        await asyncio.gather(*self._announcing, return_exceptions=True)
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        queued, self._queue = self._queue, []
        for item in queued:  # nobody may wait forever for an append that will never be tried
            _report(item, StoreUnavailable("The event log is closed."))
        if self._packed is not None:
            await self._packed.aclose()


# The outcome of an append the master took but the replicas did not confirm in time.
_UNCONFIRMED = "unconfirmed"

_REFUSALS = {
    "finished": "The run already ended; nothing more is logged for it.",
    "fenced": "This instance no longer holds the run's lease.",
    "collision": "Another event is logged at this seq.",
}


def _report(item: _PendingAppend, error: Exception | None) -> None:
    if item.reported:
        return
    item.reported = True
    try:
        item.logged(error)
    except Exception:  # one caller's failure must not stop the flusher for every other run
        log.exception("event-log callback failed for run %s", item.event.ids.run_id)
