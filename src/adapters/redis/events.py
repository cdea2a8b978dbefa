"""The run event log as Redis Streams: `aura:run:{runId}:events`.

Entry ids are `<seq>-1`, so Redis itself refuses a duplicate or out-of-order append, a reader asks
for "everything after seq N" with one XRANGE, and a trimmed log shows as a gap between N and the
first retained id. The `end` entry carries a field `t`: a finished run's log refuses every later
append. The events of one run in a batch are appended by one script call (`_APPEND`) that checks,
in the same step as its XADDs, that the log holds no `end` yet, that the run's lease still names
this instance (fencing: an owner that lost its lease cannot write) and that no *different* event
holds a seq (a retried append of the same bytes is answered "already logged"); the checks are
made once per call, and the logged entry at a seq is read only where the seq is not beyond the
log's last id (a retry). The first event a call refuses ends it: the run's later events in it are
refused too, so a run's log never gets an event after a hole. Appends from all runs of the process are gathered into one
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
# ARGV: 1 the owner the lease must name ('' when not checked), 2 max length, 3 snapshot ('' for none),
#       4 the TTL of an active run's snapshot and of its log from its first entry, 5 the retention
#       once the run's `end` is logged, 6 the run's tail channel (published to while another
#       instance reads the run; '' publishes nothing), then per event, in seq order: 7 entry id,
#       8 envelope, 9 '1' for the run's `end` ('0' otherwise), 10 the next event's id, ...
# Reply: {outcome, logged, read}. `logged` events from the first are in the log (appended now, or
# these exact bytes at their id already: a retry); the outcome is the next one's, and every later
# one's: 'ok' (none is left), 'collision' (other bytes are logged at its id, or a later id is),
# 'finished' (the log holds an `end`), 'fenced' (the lease is not the owner's). `read` is 1 when
# ARGV[6] is '' and the run has readers: the caller publishes the logged events itself, later.
# The snapshot is written only when every event is logged (it is the state after the last one).
_APPEND = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
local last_seq = -1
local finished = false
if last then
  last_seq = tonumber(string.match(last[1], '^%d+'))
  local fields = last[2]
  for i = 1, #fields, 2 do
    if fields[i] == 't' then finished = true end
  end
end
local fence_checked = ARGV[1] == ''
local outcome = 'ok'
local logged = 0
local added = {}
local ended = false
local first = false
for i = 7, #ARGV, 3 do
  local id, envelope = ARGV[i], ARGV[i + 1]
  local seq = tonumber(string.match(id, '^%d+'))
  local same = nil
  if seq <= last_seq then same = redis.call('XRANGE', KEYS[1], id, id)[1] end
  if same then
    local fields = same[2]
    local dup = false
    for j = 1, #fields, 2 do
      if fields[j] == 'e' and fields[j + 1] == envelope then dup = true end
    end
    if not dup then outcome = 'collision' break end
    logged = logged + 1
  else
    if finished then outcome = 'finished' break end
    if not fence_checked then
      if redis.call('GET', KEYS[2]) ~= ARGV[1] then outcome = 'fenced' break end
      fence_checked = true
    end
    local ending = ARGV[i + 2] == '1'
    local result
    if ending then
      result = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], id, 'e', envelope, 't', '1')
    else
      result = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], id, 'e', envelope)
    end
    if type(result) == 'table' and result.err then outcome = 'collision' break end
    if ending then
      finished = true
      ended = true
    end
    last_seq = seq
    if seq == 1 then first = true end
    logged = logged + 1
    added[#added + 1] = envelope
  end
end
if #added > 0 then
  if ended then redis.call('EXPIRE', KEYS[1], ARGV[5])
  elseif first then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
  if outcome == 'ok' and ARGV[3] ~= '' then
    redis.call('SET', KEYS[3], ARGV[3], 'EX', ended and ARGV[5] or ARGV[4])
  elseif ended then
    redis.call('EXPIRE', KEYS[3], ARGV[5])
  end
end
local read = 0
if logged > 0 and redis.call('EXISTS', KEYS[4]) == 1 then
  if ARGV[6] == '' then
    read = 1
  else
    for _, envelope in ipairs(added) do redis.call('PUBLISH', ARGV[6], envelope) end
  end
end
return {outcome, logged, read}
"""


# A run whose append failed gets only its closing events written after that: anything else would
# leave a silent hole in its log that a resume could not see.
_ALWAYS_ATTEMPTED = frozenset({EventType.ERROR, EventType.END})

# Appends per round trip at most. A thousand busy streams add a thousand events per loop pass: a
# batch of 512 holds less than one event per run, so each stream is woken (one SSE write) per
# event; 2,048 lets a batch carry a few per run (same-run A/B at 1,000 streams: 75.4 -> 60.2 us of
# CPU per event). Redis then runs one batch for about 2,048 x the 7-15 us of Redis CPU per event the
# bench measures, 15-30 ms, which other clients wait behind only when Redis is that busy anyway.
MAX_BATCH = 2048

# How many runs' followers are told at once that the run's slot moved (one PUBLISH each).
_ANNOUNCE_AT_ONCE = 32

# How many more loop passes a batch waits for while runs keep adding to it (see `_gather`). A run
# streaming at full speed adds an event per pass: 16 passes let one stream's batch carry up to 16
# of its events (same-run A/B against 4: CPU per event 0.88x at 1 stream, 0.86-0.90x at 100, 0.88x
# at 1,000; an approval 0.89-0.93x). A batch still ends on a pass that adds nothing, or when full.
_MAX_GATHER_PASSES = 16


@dataclass(slots=True)
class _PendingAppend:
    event: Event
    payload: bytes
    snapshot: Mapping[str, Any] | None
    logged: Callable[[Exception | None], None]
    reported: bool = False
    verdict: Exception | None = None  # the append call's outcome for this event (None: logged)


class RedisEventLog(EventLog):
    def __init__(self, redis: RedisClient, *, max_length: int, retention_seconds: int,
                 active_ttl_seconds: int, owner: str | None = None,
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
        self._run_keys: dict[str, tuple[list[bytes], bytes]] = {}
        self._max_length = max_length
        self._max_length_arg = b"%d" % max_length
        self._retention = retention_seconds
        self._retention_arg = b"%d" % retention_seconds
        # A log whose owner died without closing it still expires.
        self._active_ttl_arg = b"%d" % active_ttl_seconds
        self._max_batch = MAX_BATCH
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
        # Each run's events of the batch, in seq order: one script call appends them all.
        runs: dict[str, list[_PendingAppend]] = {}
        for item in batch:
            run_id = item.event.ids.run_id
            if run_id in self._fenced:
                _report(item, RunFenced("This instance no longer owns the run."))
                continue
            if run_id in self._broken and item.event.type not in _ALWAYS_ATTEMPTED:
                _report(item, StoreUnavailable("The event log is unavailable."))
                continue
            items = runs.get(run_id)
            if items is None:
                runs[run_id] = [item]
            else:
                items.append(item)
        if not runs:
            return
        try:
            results = await self._send([self._append_arguments(items) for items in runs.values()])
        except asyncio.CancelledError:
            for items in runs.values():
                for item in items:
                    _report(item, StoreUnavailable("The event log is closed."))
            raise
        except (RedisError, OSError) as exc:
            log.warning("event log append failed: %s", type(exc).__name__)
            for run_id, items in runs.items():
                self._broken.add(run_id)
                for item in items:
                    _report(item, StoreUnavailable("The event log is unavailable."))
            return
        for (run_id, items), result in zip(runs.items(), results, strict=True):
            self._judge(run_id, items, result)
        # in submission order, as the callers submitted them (an item refused before the call was
        # reported then: `_report` skips it)
        for item in batch:
            _report(item, item.verdict)

    def _judge(self, run_id: str, items: list[_PendingAppend], result: Any) -> None:
        """Each of a run's items' outcome (its `verdict`) from its append call's reply (`_APPEND`)."""
        outcome, logged = "refused", 0
        unconfirmed = isinstance(result, _Unconfirmed)
        if unconfirmed:
            result = result.reply
        if isinstance(result, Exception):
            log.warning("event log append failed: %s", type(result).__name__)
        elif isinstance(result, list) and len(result) == 3:
            outcome = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
            logged = int(result[1])
        for index, item in enumerate(items):
            if index < logged and unconfirmed:
                self._broken.add(run_id)
                item.verdict = StoreUnavailable("The event log's replicas did not confirm an event.")
            elif index < logged:
                if item.event.type is EventType.END:
                    self._closed.add(run_id)
                item.verdict = None
            elif outcome in _REFUSALS:
                if index == logged:
                    log.warning("event log refused seq %d of run %s: %s", item.event.seq, run_id, outcome)
                self._fenced.add(run_id)
                item.verdict = RunFenced(_REFUSALS[outcome])
            else:
                self._broken.add(run_id)
                item.verdict = StoreUnavailable("The event log refused an event.")

    async def _send(self, calls: list[tuple[list[bytes], list[bytes]]]) -> list[Any]:
        """Each (keys, args) as an EVALSHA of the append script, in one batch; the replies in order
        (error replies as values; a reply whose appends the replicas did not confirm wrapped in
        `_Unconfirmed`). A server that does not know the script (a restart, a flushed cache) gets it
        loaded, and those calls again: they did not run."""
        if self._packed is None:
            return await run_batch(self._redis, [(self._append, keys, args) for keys, args in calls])
        if self._confirmation is None:
            return await self._evalsha(self._append_sha, _APPEND, calls)
        # The script publishes nothing (no channel): the events of followed runs go to followers
        # once confirmed (a retried append's too: its first attempt published nothing).
        results = await self._evalsha(self._append_sha, _APPEND,
                                      [(keys, [*args[:_CHANNEL_ARG], b"", *args[_CHANNEL_ARG + 1:]])
                                       for keys, args in calls])
        published = [(args[_CHANNEL_ARG], args[_FIRST_EVENT_ARG + 1 + 3 * index])
                     for (_keys, args), result in zip(calls, results, strict=True)
                     if isinstance(result, list) and result[2] == 1 for index in range(int(result[1]))]
        if published:
            await self._publish_confirmed(published)
        return results

    async def _evalsha(self, sha: bytes, body: str, calls: list[tuple[list[bytes], list[bytes]]]) -> list[Any]:
        """Each call of the script `sha` in one packed write (then the `WAIT`, when replicas must
        confirm: an unconfirmed batch's replies are wrapped in `_Unconfirmed`)."""
        assert self._packed is not None  # one server: the caller checked
        numkeys = b"%d" % len(calls[0][0])
        confirmation = self._confirmation
        wait = confirmation.command() if confirmation is not None else b""
        packed = b"".join([pack(b"EVALSHA", sha, numkeys, *keys, *args) for keys, args in calls])
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
                results = [_Unconfirmed(result) for result in results]
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

    def _keys_of(self, run_id: str) -> tuple[list[bytes], bytes]:
        """The run's keys (as `_APPEND` takes them) and its tail channel, encoded once."""
        keys = self._run_keys.get(run_id)
        if keys is None:
            keys = self._run_keys[run_id] = (
                [event_log_key(run_id).encode(), lease_key(run_id).encode(), snapshot_key(run_id).encode(),
                 run_key(run_id, "reader").encode()], run_key(run_id, "tail").encode())
            if self._slots is not None:
                self._primaries[run_id] = self._slots.primary_of(keys[0][0])
        return keys

    def _slot_map_changed(self) -> None:
        """The runs this instance writes whose slot has another primary now: a master that died
        before its replica had the run's reader set took it along, and the owner would publish
        nothing more to a follow that waits. One `PUBLISH` of `NOTE_AGAIN` per such run, once per
        move (not per event, nor periodically): its followers note their entries again."""
        assert self._slots is not None
        moved = []
        for run_id, (keys, tail) in self._run_keys.items():
            primary, known = self._slots.primary_of(keys[0]), self._primaries.get(run_id)
            if primary is not None and primary != known:
                self._primaries[run_id] = primary
                if known is not None:  # None: the map had no primary for it yet (a first refresh)
                    moved.append(tail)
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

    def _append_arguments(self, items: Sequence[_PendingAppend]) -> tuple[list[bytes], list[bytes]]:
        """One run's events, in seq order, as `_APPEND`'s keys and arguments."""
        keys, tail = self._keys_of(items[0].event.ids.run_id)
        snapshot = next((item.snapshot for item in reversed(items) if item.snapshot is not None), None)
        args = [self._owner, self._max_length_arg, b"" if snapshot is None else orjson.dumps(snapshot),
                self._active_ttl_arg, self._retention_arg, tail]
        for item in items:
            event = item.event
            args += (b"%d-1" % event.seq, item.payload, b"1" if event.type is EventType.END else b"0")
        return keys, args

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


@dataclass(slots=True)
class _Unconfirmed:
    """The reply of an append call the master ran but the replicas did not confirm in time."""

    reply: Any

# Where `_APPEND`'s arguments hold the run's tail channel and its first event's id.
_CHANNEL_ARG = 5
_FIRST_EVENT_ARG = 6

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
