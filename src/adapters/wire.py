"""An event's envelope as JSON bytes (orjson), encoded once per event and shared by the event log
and every SSE connection that writes it."""

from __future__ import annotations

import orjson

from domain.events import Event


def envelope_bytes(event: Event) -> bytes:
    cache = event.encoded
    if not cache:
        cache.append(orjson.dumps(event.envelope()))
    return cache[0]


def event_from_bytes(raw: bytes) -> Event:
    """An event read back from storage, with its bytes kept: a resume writes them as they are."""
    event = Event.from_envelope(orjson.loads(raw))
    event.encoded.append(raw)
    return event
