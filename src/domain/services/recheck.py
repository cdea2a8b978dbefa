"""One periodic re-check of every pending approval of the process.

A waiting run hears its decision on the signal channel. The re-check is the safety net for a
decision whose signal was lost (the publisher died between its writes, a Pub/Sub outage): every
`interval_seconds` it reads the requests of all waits of the process in chunks of `chunk_size`
(one `ApprovalStore.get_many` each, an MGET in Redis) and wakes only the waits whose request was
decided or vanished: thousands of parked runs cost one read per chunk and interval, not a timer
and a GET each.

It also wakes a wait whose `expiresAt` the clock has passed, so a wait's expiry follows the
`Clock` (wall time, as `expiresAt` is) at least every interval; and the waits' expiries share one
timer for the whole process (`Deadlines`), which wakes each at its exact moment (a timer per wait
would be one more handle kept by every parked run). A failed read ends no wait: it is logged and
the next interval tries again. The loop runs only while some wait is registered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from domain.model.approval import ApprovalRequest
from domain.model.errors import StoreUnavailable
from domain.model.ports import ApprovalStore, Clock
from domain.runtime.deadlines import Deadlines
from domain.runtime.waits import BARE_CONTEXT

log = logging.getLogger("aura.hitl")

DEFAULT_CHUNK_SIZE = 500


class _Watch:
    """A registered wait; also the done callback of the wait's other way out (`also`), so that the
    wait has one future to wait on and no object of its own to wake it."""

    __slots__ = ("also", "request", "woken")

    def __init__(self, request: ApprovalRequest, woken: asyncio.Future[ApprovalRequest | None],
                 also: asyncio.Future[Any] | None) -> None:
        self.request = request
        self.woken = woken
        self.also = also

    def __call__(self, _: object) -> None:
        """`also` is done: wake the wait with its request as it was (still pending to the re-check)."""
        _wake(self, self.request)

    def detach(self) -> None:
        also, self.also = self.also, None
        if also is not None:
            also.remove_done_callback(self)


class ApprovalRecheck:
    def __init__(self, store: ApprovalStore, clock: Clock, interval_seconds: float,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if interval_seconds <= 0 or chunk_size < 1:
            raise ValueError("the re-check needs a positive interval and chunk size")
        self._store = store
        self._clock = clock
        self._interval_seconds = interval_seconds
        self._chunk_size = chunk_size
        self._watches: dict[str, _Watch] = {}
        self._task: asyncio.Task[None] | None = None
        self._tick: asyncio.Future[bool] | None = None
        # The waits' `expiresAt`, by request id, in the clock's (wall) time.
        self._expiries: Deadlines = Deadlines(self._expired, now=clock.now)

    def watch(self, request: ApprovalRequest,
              also: asyncio.Future[Any] | None = None) -> asyncio.Future[ApprovalRequest | None]:
        """Re-check `request` until `unwatch`. The future completes with the request as re-read
        once it is decided; None once it vanished from the store (or cannot be read); or the
        still pending `request` itself once the clock passed its `expiresAt` (the wait then
        records the expiry), or once `also` is done (the wait's other way out, its signal: one
        future to wait on, rather than one more made to wait on both). Watch again to keep
        watching after a wake."""
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[ApprovalRequest | None] = loop.create_future()
        previous = self._watches.get(request.request_id)
        if previous is not None:
            previous.detach()
        watch = self._watches[request.request_id] = _Watch(request, woken, also)
        if also is not None:
            if also.done():
                _wake(watch, request)
            else:
                also.add_done_callback(watch, context=BARE_CONTEXT)
        self._expiries.set(request.request_id, request.expires_at)
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run(), name="aura-hitl-recheck")
        return woken

    def unwatch(self, request_id: str, woken: asyncio.Future[ApprovalRequest | None]) -> None:
        """Stop re-checking (the wait ended, however); only the registration `woken` belongs to."""
        watch = self._watches.get(request_id)
        if watch is not None and watch.woken is woken:
            del self._watches[request_id]
            self._expiries.discard(request_id)
            watch.detach()
        if not woken.done():
            woken.cancel()
        tick = self._tick
        if not self._watches and tick is not None and not tick.done() \
                and tick.get_loop() is asyncio.get_running_loop():
            tick.set_result(False)  # nothing left to re-check: let the loop end now

    def watching(self) -> int:
        """Waits registered (for tests and metrics)."""
        return len(self._watches)

    def _expired(self, request_id: str) -> None:
        """The clock passed the request's `expiresAt`: wake its wait, which records the expiry."""
        watch = self._watches.get(request_id)
        if watch is not None:
            _wake(watch, watch.request)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._watches:
                tick = self._tick = loop.create_future()
                timer = loop.call_later(self._interval_seconds, _complete, tick)
                try:
                    interval_passed = await tick
                finally:
                    timer.cancel()
                if interval_passed and self._watches:
                    await self.check()
        finally:
            # Decided in the same step as the emptiness check above: a wait registering after
            # this starts a new loop, one registering before it kept this one going.
            if self._task is asyncio.current_task():
                self._task = None
                self._tick = None

    async def check(self) -> None:
        """One re-check of every registered wait (the loop calls this every interval)."""
        now = self._clock.now()
        due: list[str] = []
        for request_id, watch in list(self._watches.items()):
            if now >= watch.request.expires_at:
                _wake(watch, watch.request)
            else:
                due.append(request_id)
        failed = 0
        for start in range(0, len(due), self._chunk_size):
            chunk = due[start:start + self._chunk_size]
            try:
                found = await self._store.get_many(chunk)
            except StoreUnavailable:
                failed += len(chunk)
                continue
            for request_id, current in zip(chunk, found, strict=True):
                if current is None or current.status.is_decided:
                    woken = self._watches.get(request_id)  # still waiting, after the read?
                    if woken is not None:
                        _wake(woken, current)
        if failed:
            # A safety net: an outage ends no wait (the signal bus re-reads stored signals when
            # Redis is back), and the next interval tries again.
            log.warning("could not re-check %d of %d pending approval(s); still waiting", failed, len(due))


def _complete(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(True)


def _wake(watch: _Watch, result: ApprovalRequest | None) -> None:
    if not watch.woken.done():
        watch.woken.set_result(result)
