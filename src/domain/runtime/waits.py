"""Small waits: the first of several futures, a flag, a set of background tasks, backoff."""

from __future__ import annotations

import asyncio
import contextvars
import random
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

# The context of loop callbacks that read and set no context variable (`first_of`'s wake-ups, a
# stream's release when its request's task ends). A callback added without a context copies the
# current one (a Context object per callback: three per parked run's wait), and a copy of a
# request's context would keep its framework's request objects. A loop runs callbacks one after
# the other, never inside each other, so they can share this one; a callback that sets a context
# variable must not use it.
BARE_CONTEXT = contextvars.Context()


def first_of(*futures: asyncio.Future[Any]) -> asyncio.Future[None]:
    """A future done as soon as one of `futures` is (at once if one already is); the caller then
    looks at which. asyncio.wait would keep two more coroutines, a set, a closure and a timer for
    as long as the wait takes (an approval: minutes); this keeps one future and one small object,
    a callback on each of `futures` that is removed as soon as one of them is done or the
    returned future is cancelled."""
    woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    if any(future.done() for future in futures):
        woken.set_result(None)
        return woken
    wake = _Wake(woken, futures)
    for future in futures:
        future.add_done_callback(wake, context=BARE_CONTEXT)
    woken.add_done_callback(wake, context=BARE_CONTEXT)
    return woken




class _Wake:
    """`first_of`'s callback: completes the wait and takes itself off every input."""

    __slots__ = ("_futures", "_woken")

    def __init__(self, woken: asyncio.Future[None], futures: tuple[asyncio.Future[Any], ...]) -> None:
        self._woken = woken
        self._futures = futures

    def __call__(self, _: object) -> None:
        if not self._woken.done():
            self._woken.set_result(None)
        for future in self._futures:
            future.remove_done_callback(self)


class Flag:
    """asyncio.Event's behaviour (set, clear, wait until set) without its deque, which every waiting
    run's channel held for its whole wait: waiters are a list made by the first of them."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


class TaskSet:
    """Background tasks kept alive until they end (the loop holds tasks only weakly), and waited for
    at shutdown."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(set(self._tasks))

    def spawn(self, operation: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(operation, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait(self) -> None:
        """Until every task has ended, including those spawned meanwhile."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def cancel(self) -> None:
        """Cancel every task and wait until each has ended."""
        for task in self._tasks:
            task.cancel()
        await self.wait()


class Backoff:
    """Capped exponential backoff between attempts: no pause before the first, `initial` after the
    first failure, doubling up to `maximum`; back to no pause after a success. With `jitter`, each
    pause is drawn from its upper half, so that the instances of the service that lost a server
    together do not all come back in the same instant."""

    __slots__ = ("failures", "initial", "jitter", "maximum")

    def __init__(self, initial: float, maximum: float, *, jitter: bool = False) -> None:
        if initial < 0 or maximum < 0:
            raise ValueError("backoff times must not be negative")
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.failures = 0  # in a row, since the last success

    def failed(self) -> int:
        """One more failure in a row; returns how many."""
        self.failures += 1
        return self.failures

    def succeeded(self) -> None:
        self.failures = 0

    def delay(self, failures: int | None = None) -> float:
        """The pause after `failures` failures in a row (by default, those counted so far)."""
        failures = self.failures if failures is None else failures
        if failures <= 0:
            return 0.0
        capped = min(self.maximum, self.initial * float(2 ** min(failures - 1, 32)))
        if self.jitter:
            return capped * random.uniform(0.5, 1.0)  # nosec B311 # spreading reconnects, not a secret
        return capped

    async def pause(self) -> None:
        """Sleep for the current pause (none after a success)."""
        delay = self.delay()
        if delay > 0:
            await asyncio.sleep(delay)
