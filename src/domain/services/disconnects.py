"""A run whose client went away: cancelled (policy `cancel`) once no reader came back, here or on
another instance, within the grace period."""

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
        if self._grace_seconds <= 0:
            handle.cancel("client_disconnected")
        elif handle.disconnect_timer is None:
            # A reader may come back (a retried POST, a tab shown again, another instance): the
            # run is cancelled only if none did within the grace period.
            handle.disconnect_timer = asyncio.get_running_loop().call_later(self._grace_seconds, self._due, handle)

    @staticmethod
    def stop(handle: RunHandle) -> None:
        """The run is over: no grace period runs for it any more."""
        if handle.disconnect_timer is not None:
            handle.disconnect_timer.cancel()
            handle.disconnect_timer = None

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
        if elsewhere:  # followed through another instance: look again after another grace period
            handle.disconnect_timer = asyncio.get_running_loop().call_later(self._grace_seconds, self._due, handle)
            return
        handle.cancel("client_disconnected")
