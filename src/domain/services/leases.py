"""Keeping this instance's leases on its runs: one loop per process renews them all in one round
trip every third of a lease, and stops a run whose lease another instance may now declare lost.
The same round trip reports which runs kept for a reader on another instance lost that reader."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from domain.model.errors import StoreUnavailable
from domain.model.runs import RunDirectory
from domain.services.run_handle import RunHandle

log = logging.getLogger("aura.runs")

# A run kept for a reader on another instance that no longer has one, and the seconds since it had.
UnreadHandler = Callable[[RunHandle, float], None]


class LeaseRenewal:
    def __init__(self, directory: RunDirectory, instance_id: str, lease_seconds: float,
                 runs: Mapping[str, RunHandle], on_unread: UnreadHandler | None = None) -> None:
        self._directory = directory
        self._instance_id = instance_id
        self._lease_seconds = lease_seconds
        self._runs = runs  # the service's runs in flight, read at every renewal
        self._on_unread = on_unread
        self._task: asyncio.Task[None] | None = None

    def ensure(self) -> None:
        """Renew while any run is in flight (the loop ends once none is)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._renew(), name="run lease renewal")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _renew(self) -> None:
        interval = self._lease_seconds / 3
        while self._runs:
            await asyncio.sleep(interval)
            read_elsewhere = [run_id for run_id, handle in self._runs.items()
                              if handle is not None and handle.read_elsewhere and not handle.watchers]
            try:
                renewals = await self._directory.renew_leases(list(self._runs), self._instance_id,
                                                              self._lease_seconds, read_elsewhere)
            except StoreUnavailable:
                log.warning("could not renew run leases")
                continue
            for run_id in renewals.lost:
                handle = self._runs.get(run_id)
                if handle is not None:
                    log.warning("run %s: this instance lost its lease; stopping it", run_id)
                    handle.lose_lease()
            for run_id, since in renewals.unread.items():
                handle = self._runs.get(run_id)
                if handle is not None and self._on_unread is not None:
                    self._on_unread(handle, since)
