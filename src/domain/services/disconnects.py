"""A run whose client went away: cancelled (policy `cancel`) once no reader came back, here or on
another instance, within the grace period.

Once a grace period ends with the run read on another instance, the run is kept without a timer
of its own: the lease renewal (every third of a lease, for all the instance's runs at once)
reports when that reader is gone (`LeaseRenewal`, `RunDirectory.renew_leases`), and a new grace
period starts, counted from when a reader was last known there. A run followed elsewhere costs
no periodic command of its own beyond its lease."""

from __future__ import annotations

import asyncio

from domain.model.errors import StoreUnavailable
from domain.model.runs import RunDirectory
from domain.services.run_handle import RunHandle


class DisconnectGrace:
    def __init__(self, directory: RunDirectory, grace_seconds: float) -> None:
        self._directory = directory
        self._grace_seconds = grace_seconds

    def start(self, handle: RunHandle) -> None:
        """The run's last reader left: cancel it now (no grace) or after the grace period."""
        handle.read_elsewhere = False
        if self._grace_seconds <= 0:
            handle.cancel("client_disconnected")
        elif handle.disconnect_timer is None:
            # A reader may come back (a retried POST, a tab shown again, another instance): the
            # run is cancelled only if none did within the grace period.
            self._arm(handle, self._grace_seconds)

    def unread(self, handle: RunHandle, since_seconds: float) -> None:
        """The run's reader on another instance is gone (it was last known there `since_seconds`
        ago): the grace period starts again, from then."""
        if not handle.read_elsewhere or handle.watchers or handle.task is None or handle.task.done():
            return
        handle.read_elsewhere = False
        if handle.disconnect_timer is None:
            self._arm(handle, max(0.0, self._grace_seconds - since_seconds))

    @staticmethod
    def stop(handle: RunHandle) -> None:
        """The run is over: no grace period runs for it any more."""
        handle.read_elsewhere = False
        if handle.disconnect_timer is not None:
            handle.disconnect_timer.cancel()
            handle.disconnect_timer = None

    def _arm(self, handle: RunHandle, seconds: float) -> None:
        handle.disconnect_timer = asyncio.get_running_loop().call_later(seconds, self._due, handle)

    def _due(self, handle: RunHandle) -> None:
        handle.disconnect_timer = None
        if handle.watchers or handle.task is None or handle.task.done():
            return  # a reader came back here, or the run is over
        handle.disconnect_check = asyncio.create_task(self._cancel_unless_read(handle),
                                                      name=f"disconnect grace {handle.run_id}")

    async def _cancel_unless_read(self, handle: RunHandle) -> None:
        try:
            elsewhere = await self._directory.has_reader(handle.run_id)
        except StoreUnavailable:
            elsewhere = False
        if handle.watchers:
            return
        if elsewhere:  # followed through another instance: the lease renewal says when that ends
            handle.read_elsewhere = True
            return
        handle.cancel("client_disconnected")
