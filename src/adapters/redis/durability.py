"""Writes the replicas confirmed: `WAIT numreplicas timeout` after the writes Aura acknowledges.

Redis replicates asynchronously: a master that acknowledged a write and then lost its role (a
Sentinel failover, planned or not) may never have sent it to the replica that took over, and the
write is gone. Aura therefore acknowledges an event (streams it to any client) and an approval
decision (answers 200) only after `WAIT` says enough replicas hold it; otherwise the caller gets a
retryable `StoreUnavailable`. `WAIT` covers every earlier write of its connection, so one `WAIT`
after the shared connection's batch covers the batch's events and everything sent before them on
that connection (the approval request a `hitl` event announces, for one).

Reads that hand events to clients (a follower's XREAD, a resume's XRANGE) are confirmed the same
way: they may see an event its owner wrote but could not have acknowledged. On Redis 7 every
command, a read too, sets its connection's `WAIT` offset to the master's current replication
offset, so a `WAIT` right after the read, on its connection, returns once the replicas hold
everything the read could see (tests/integration/test_redis_replication.py holds the server to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from adapters.redis.client import pack, raise_error


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
