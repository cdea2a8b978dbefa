"""A spec-correct Server-Sent Events encoder (WHATWG HTML, "server-sent events").

- `data` may hold any text: each line (split on CRLF, CR or LF, the only breaks SSE knows) becomes
  its own `data:` line, so a parser joins them back with LF.
- `id` and `event` are single-line fields: CR, LF or NUL there is refused, never silently mangled.
- Comments (heartbeats) start with a colon and are ignored by every parser. They are sent as
  comment lines alone, never followed by a blank line: a blank line ends an event, and
  fetch-event-source (any blank line) and httpx-sse (a blank line once an id was seen) then
  dispatch an empty message, which an application's `JSON.parse` / `json.loads` fails on. A
  comment line with no blank line after it is skipped by every parser (WHATWG, fetch-event-source,
  httpx-sse, sseclient-py, requests-sse, EventSource) and still keeps idle timeouts from firing.
"""

from __future__ import annotations

import re

from adapters.wire import envelope_bytes
from domain.model.events import Event, EventType

DONE_FRAME = b"data: [DONE]\n\n"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FORBIDDEN_IN_FIELD = re.compile(r"[\r\n\0]")


def _field(name: str, value: str) -> str:
    if _FORBIDDEN_IN_FIELD.search(value):
        raise ValueError(f"SSE {name} must not contain CR, LF or NUL")
    return f"{name}: {value}\n"


def encode_event(data: str, *, event: str | None = None, event_id: str | int | None = None,
                 retry_ms: int | None = None) -> bytes:
    parts = []
    if retry_ms is not None:
        if retry_ms < 0:
            raise ValueError("SSE retry must not be negative")
        parts.append(f"retry: {int(retry_ms)}\n")
    if event_id is not None:
        parts.append(_field("id", str(event_id)))
    if event is not None:
        parts.append(_field("event", event))
    parts.extend(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_comment(text: str = "") -> bytes:
    """Comment lines only, with no blank line after them (see the module's docstring)."""
    lines = _LINE_BREAK.split(text)
    return "".join(f": {line}\n" if line else ":\n" for line in lines).encode("utf-8")


HEARTBEAT_FRAME = encode_comment("ping")
# Each event type's name as the frame's `event` field, encoded once (a frame is made per event).
_TYPE_NAMES = {type_: type_.value.encode() for type_ in EventType}


def event_id(event: Event) -> str:
    """A run event's SSE id, `<runId>:<seq>`: it names the run, so a client that sends it back as
    Last-Event-ID (a fetch-event-source retry of the POST, say) resumes that very run."""
    return f"{event.ids.run_id}:{event.seq}"


def encode_run_event(event: Event, *, retry_ms: int | None = None) -> bytes:
    """One envelope as one frame, with the id `event_id` gives. orjson escapes every control
    character, so its output is a single line, and event types are fixed names: the frame needs no
    splitting or checking (the general `encode_event` gives the same bytes; a test holds them
    equal)."""
    payload = envelope_bytes(event)
    frame = b"id: %s:%d\nevent: %s\ndata: %s\n\n" % (event.ids.run_id.encode(), event.seq, _TYPE_NAMES[event.type],
                                                      payload)
    if retry_ms is None:
        return frame
    if retry_ms < 0:
        raise ValueError("SSE retry must not be negative")
    return b"retry: %d\n%s" % (retry_ms, frame)
