"""An event's envelope as JSON bytes (orjson), encoded once per event and shared by the event log
and every SSE connection that writes it."""

from __future__ import annotations

import orjson

from domain.model.events import Event


def envelope_bytes(event: Event) -> bytes:
    cache = event.encoded
    if not cache:
        cache.append(exact_bytes(orjson.dumps(event.envelope())))
    return cache[0]


def exact_bytes(raw: bytes) -> bytes:
    """`raw` in an allocation of its own size. orjson returns its output in the buffer it wrote it
    in (at least 4 KiB) without shrinking it, so a few hundred bytes of envelope kept with an event
    (a parked run's last events, events buffered for a slow watcher) would hold 4 KiB each; the
    copy costs a few hundred nanoseconds once per event."""
    return bytes(memoryview(raw))


def event_from_bytes(raw: bytes) -> Event:
    """An event read back from storage, with its bytes kept: a resume writes them as they are."""
    event = Event.from_envelope(orjson.loads(raw))
    event.encoded.append(raw)
    return event
