"""Ports: what the domain needs from the outside world, named for their role.

Adapters in `adapters/` implement them; the composition root in `app/` picks which.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from domain.model.approval import ApprovalRequest, ApprovalStatus, Decider, DecisionResult, Signal, StoredApproval
from domain.model.chat import ChatRequest, ModelChunk
from domain.model.events import Event
from domain.model.identity import Claims


class Clock(ABC):
    @abstractmethod
    def now(self) -> float:
        """Seconds since the Unix epoch, UTC."""

    def timestamp(self) -> int:
        """Integer Unix seconds, as every wire timestamp is."""
        return int(self.now())


class IdFactory(ABC):
    @abstractmethod
    def new_id(self, prefix: str) -> str:
        """An unguessable id (at least 128 random bits) with a readable prefix."""


class TokenVerifier(ABC):
    @abstractmethod
    def verify(self, token: str) -> Claims:
        """Verify a bearer token; raise AuthError with a stable code when it is not acceptable."""


class ChatModel(ABC):
    @abstractmethod
    def stream(self, request: ChatRequest) -> AsyncIterator[ModelChunk]:
        """Stream the model's answer; raise ModelError (stable code) on failure."""


class ApprovalStore(ABC):
    """Durable approval requests. Decisions are compare-and-set: the first one wins."""

    @abstractmethod
    async def create(self, request: ApprovalRequest) -> StoredApproval:
        """Store a pending request and point its session at it; return it as stored."""

    @abstractmethod
    async def get(self, request_id: str) -> ApprovalRequest | None: ...

    @abstractmethod
    async def read(self, request_id: str) -> StoredApproval | None:
        """The request with its exact stored form, to decide on with `decide(expected=...)`."""

    @abstractmethod
    async def get_many(self, request_ids: Sequence[str]) -> list[ApprovalRequest | None]:
        """The requests of `request_ids`, in that order, in one read (None where absent or
        unreadable)."""

    @abstractmethod
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
        """Atomically move a pending request to `status`. None when the request does not exist.

        `expected` is the request as the caller last read or created it: the decision applies while
        the store still holds exactly that; without it, it applies while the stored request is
        pending (a store may do either in one step; Redis does). With a
        `signal`, an applied decision also stores and publishes that signal for the request's
        session, as `SignalBus.publish` does, in the same step; a failure of that part alone
        leaves the decision standing (`signalled` False). Given a `settled_signal` too (the same
        signal, sealed as one whose step wrote the session record), a store that can write the
        session's decided record (what `settle_session` writes) in that step does so, and stores
        and publishes `settled_signal` instead. With a `decider`, the decision applies only while
        `decider.may_decide(request, decided_at)` holds for the stored request, checked in the same
        step (no read before it); otherwise nothing changes and the result is `applied=False` with
        the request as stored, from which the caller tells why."""

    @abstractmethod
    async def settle_session(self, decided: ApprovalRequest) -> None:
        """Point the request's session at its decision, for the run that waited on it (the one
        writer of its session while it waits) once it heard a decision stored by someone else.
        A decision through `decide` without a `signal` does this itself; one with a `signal`
        leaves it to the waiting run, unless the store wrote it and published the `settled_signal`
        (when no run will hear it, to `decide` on the decided request, which runs a decision's
        follow-ups again). Raises StoreUnavailable when the write failed or was not confirmed; it
        is idempotent."""

    @abstractmethod
    async def pending_for_user(self, tenant_id: str, user_id: str) -> list[ApprovalRequest]:
        """Pending requests of one user (for consoles and the command line)."""


class SignalSubscription(ABC):
    @abstractmethod
    async def next_message(self) -> str | bytes:
        """Wait for the next raw message published on the session's channel."""

    def receive(self) -> asyncio.Future[str | bytes]:
        """The next raw message as a future, for a caller that waits for it among other things;
        cancelling the future gives up on it (a message not yet taken stays queued). This runs
        `next_message` in a task; an adapter may complete a plain future instead, which a wait
        that lasts as long as an approval holds for much less memory than a task."""
        return asyncio.ensure_future(self.next_message())


class SignalBus(ABC):
    """Approval signals on `hitl:channel:{sessionId}`, the last one kept at `hitl:signal:{sessionId}`."""

    @abstractmethod
    def subscribe(self, session_id: str) -> AbstractAsyncContextManager[SignalSubscription]:
        """Listen to one session's channel until the context exits (whatever ends it)."""

    @abstractmethod
    async def publish(self, session_id: str, signal: Signal) -> int:
        """Store the signal and publish it, as the DWP backend does; return the receiver count."""

    @abstractmethod
    async def latest(self, session_id: str) -> str | bytes | None:
        """The raw last stored signal of a session, if any."""


class EventLog(ABC):
    """Append-only record of a run's events, read back for resumes on any instance."""

    @abstractmethod
    def submit(self, event: Event, snapshot: Mapping[str, Any] | None,
               logged: Callable[[Exception | None], None]) -> None:
        """Queue the event (and, when given, the run's snapshot after it) without waiting.
        `logged` is called once the event is stored (None) or could not be (the error), in the
        order the events were submitted, so a caller can deliver each event only once it is
        logged without suspending for every write."""

    async def append(self, event: Event, snapshot: Mapping[str, Any] | None = None) -> None:
        """Log one event and wait until it is stored."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def logged(error: Exception | None) -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        self.submit(event, snapshot, logged)
        await done

    @abstractmethod
    async def read_after(self, run_id: str, after_seq: int, limit: int = 500) -> Sequence[Event]: ...

    @abstractmethod
    async def first_seq(self, run_id: str) -> int | None:
        """The oldest retained seq; None when nothing is retained."""

    @abstractmethod
    async def last_event(self, run_id: str) -> Event | None:
        """The newest logged event; None when nothing is retained."""

    @abstractmethod
    async def close_run(self, run_id: str) -> None:
        """The run ended: keep its log for the retention time only."""


class ConversationStore(ABC):
    """History of a thread, kept per tenant, user and thread: a thread id names a thread within
    one user's namespace, so the same id sent by someone else names a thread of their own."""

    @abstractmethod
    async def open(self, tenant_id: str, user_id: str, thread_id: str) -> list[dict[str, Any]]:
        """The thread's turns, oldest first (empty for a new thread)."""

    @abstractmethod
    async def append(self, tenant_id: str, user_id: str, thread_id: str, turn: dict[str, Any]) -> bool:
        """Keep a turn (shortened to the per-turn limit). False when it was not kept because the
        user's threads already hold as much as one user may store."""


class StartRateLimiter(ABC):
    """How often one user may start runs."""

    @abstractmethod
    async def admit(self, tenant_id: str, user_id: str) -> float | None:
        """None when the user may start a run now (which is counted); else the seconds until they may."""


class HealthProbe(ABC):
    @abstractmethod
    async def check(self) -> str | None:
        """None when healthy, else a short reason."""
