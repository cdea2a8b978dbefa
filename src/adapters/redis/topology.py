"""Which node of a Redis Cluster is the primary of a key's slot, and hearing when that changes.

redis-py keeps the cluster's slot map and refreshes it when a command meets a failover (a `MOVED`
reply, a node that stopped answering); after each refresh it dispatches
`AsyncAfterSlotsCacheRefreshEvent` to the client's event dispatcher (the one it was built with:
`create_redis` passes one and attaches a `SlotMap` to it). A `SlotMap` tells the adapters that
registered with it, so they can act on the keys whose primary changed: the run follower notes
its reader entries again, and a run's owner tells its followers to (a master killed before its
replica had a reader entry takes the entry with it: the owner would stop publishing the run's
events to a follow that still waits for them). It costs no command: the refresh is redis-py's,
made for the commands that met the failover."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

from redis.asyncio import RedisCluster
from redis.event import AsyncAfterSlotsCacheRefreshEvent, AsyncEventListenerInterface, EventDispatcher
from redis.exceptions import RedisClusterException, RedisError

_log = logging.getLogger(__name__)

# The message a run's owner publishes on the run's tail channel when the run's slot moved to
# another primary: its followers note their reader entries again and read the log after their
# position (any message on a tail channel that is not an event means "something may be missing").
NOTE_AGAIN = b'{"aura":"note_again"}'

_SLOT_MAPS: weakref.WeakKeyDictionary[RedisCluster, SlotMap] = weakref.WeakKeyDictionary()


class SlotMap(AsyncEventListenerInterface):
    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = weakref.ref(cluster)  # the client's dispatcher holds this listener
        self._listeners: list[Callable[[], None]] = []

    def primary_of(self, key: str | bytes) -> str | None:
        """The `host:port` of the primary serving `key`'s slot in the current map (None when the
        map has none for it)."""
        cluster = self._cluster()
        if cluster is None:
            return None
        try:
            node = cluster.get_node_from_key(key.decode() if isinstance(key, bytes) else key)
        except (RedisError, RedisClusterException):  # no slot map yet, or a slot no node covers for now
            return None
        return None if node is None else str(node.name)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` (synchronously: it schedules whatever it needs) after each refresh."""
        self._listeners.append(listener)

    def remove(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def listen(self, event: object) -> None:
        for listener in tuple(self._listeners):
            try:
                listener()
            except Exception:  # one adapter's failure must not stop redis-py's refresh
                _log.exception("a slot map listener failed")


def cluster_dispatcher() -> EventDispatcher:
    """The event dispatcher a cluster client is built with, so `attach_slot_map` can listen to it."""
    return EventDispatcher()


def attach_slot_map(cluster: RedisCluster, dispatcher: EventDispatcher) -> SlotMap:
    slots = SlotMap(cluster)
    dispatcher.register_listeners({AsyncAfterSlotsCacheRefreshEvent: [slots]})
    _SLOT_MAPS[cluster] = slots
    return slots


def slot_map(redis: object) -> SlotMap | None:
    """The `SlotMap` of a cluster client `create_redis` built (None for any other client)."""
    return _SLOT_MAPS.get(redis) if isinstance(redis, RedisCluster) else None
