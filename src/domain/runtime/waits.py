"""Small waits: a flag, a set of background tasks, backoff; the context of bare callbacks."""

from __future__ import annotations

import asyncio
import contextvars
import random
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

# The context of loop callbacks that read and set no context variable (a parked wait's wake-up
# by its signal, a stream's release when its request's task ends). A callback added without a
# context copies the current one, a Context object per callback that every parked run would hold,
# and a copy of a request's context would keep its framework's request objects. A loop runs
# callbacks one after the other, never inside each other, so they can share this one; a callback
# that sets a context variable must not use it.
BARE_CONTEXT = contextvars.Context()


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
