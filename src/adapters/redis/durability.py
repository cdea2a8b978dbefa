"""Writes the replicas confirmed: `WAIT numreplicas timeout` after the writes Aura acknowledges.

Redis replicates asynchronously: a master that acknowledged a write and then lost its role (a
Sentinel failover, planned or not) may never have sent it to the replica that took over, and the
write is gone. Aura therefore acknowledges an event (streams it to any client) and an approval
decision (answers 200) only after `WAIT` says enough replicas hold it; otherwise the caller gets a
retryable `StoreUnavailable`. On Redis 7 every command, a read too, sets its connection's `WAIT`
offset to the master's replication offset after it ran, so a `WAIT` right after a command, on the
same connection, returns once the replicas hold everything the master held then: the event log's
batch ends with one (in the same write), so does a run's admission on one server, an approval
decision's follow-up pipeline ends with one (covering the decision's script, which ran before
it), and the approval request a `hitl` event announces, stored before the event was submitted, is
covered by the event's.

Reads that hand events to clients (a resume's XRANGE, a follower's log reads) are confirmed the
same way: they may see an event its owner wrote but could not acknowledge, so a `WAIT` follows the
read on its connection (tests/integration/test_redis_replication.py holds the server to it). The
tail a follower receives by Pub/Sub needs none: under `WAIT` the owner publishes an event only
after its `WAIT` confirmed it (events.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from adapters.redis.client import RedisClient, batch, raise_error
from adapters.redis.packed import pack


class ReplicasDidNotConfirm(RedisError):
    """Fewer replicas than required confirmed a write within the timeout: it may be lost in a
    failover, so it is not acknowledged."""


@dataclass(frozen=True, slots=True)
class ReplicaConfirmation:
    replicas: int
    timeout_ms: int

    def arguments(self) -> tuple[bytes, ...]:
        return b"WAIT", b"%d" % self.replicas, b"%d" % self.timeout_ms

    def command(self) -> bytes:
        """The packed `WAIT`, to send on the connection that made the writes (or the reads), after them."""
        return pack(*self.arguments())

    def check(self, reply: Any) -> None:
        """Raise unless `reply` (to `command()`) says enough replicas hold the writes."""
        confirmed = int(raise_error(reply))
        if confirmed < self.replicas:
            raise ReplicasDidNotConfirm(
                f"{confirmed} of {self.replicas} replica(s) confirmed the write within {self.timeout_ms} ms")


def replica_confirmation(replicas: int, timeout_ms: int) -> ReplicaConfirmation | None:
    """None when no replica needs to confirm (no `WAIT` is sent)."""
    return ReplicaConfirmation(replicas, timeout_ms) if replicas > 0 else None


async def read_log_confirmed(redis: RedisClient, confirmation: ReplicaConfirmation | None, key: str, first: str,
                             count: int) -> list[tuple[Any, dict[Any, Any]]]:
    """XRANGE `key` from `first` (`count` entries at most); with a confirmation, followed on the
    same connection by the `WAIT`, so what is returned is held by the replicas too."""
    if confirmation is None:
        entries: Any = await redis.xrange(key, min=first, max="+", count=count)
        return list(entries)
    pipe = batch(redis)
    pipe.xrange(key, min=first, max="+", count=count)
    pipe.execute_command(*confirmation.arguments())
    entries, confirmed = await pipe.execute()
    confirmation.check(confirmed)
    return list(entries)
