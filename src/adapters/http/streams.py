"""Writing a run's events as an SSE response, shared by the POST stream and (later) resumes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from quart import Response, request

from adapters.http.problems import Problem
from adapters.http.sse import DONE_FRAME, HEARTBEAT_FRAME, encode_comment, encode_event, encode_run_event
from domain.model.events import Event, EventType
from domain.model.telemetry import Telemetry
from domain.runtime.feed import SubscriptionOverflow
from domain.runtime.waits import BARE_CONTEXT
from domain.services.access import Notice, ResumeItem
from domain.services.watch import RunWatch

BATCH_EVENTS = 64


class StreamSlots:
    """Caps the open streams of this instance per user and per run (a resume loop, or a page
    opened in hundreds of tabs, must not hold hundreds of connections and followers). A slot is
    taken before the response starts (429 beyond the cap) and given back exactly once, when the
    stream ends or its request's task does (a client gone during the headers never starts the
    body)."""

    def __init__(self, per_user: int, per_run: int) -> None:
        self.per_user = per_user
        self.per_run = per_run
        self._users: dict[tuple[str, str], int] = {}
        self._runs: dict[str, int] = {}

    def take(self, tenant_id: str, user_id: str, run_id: str | None) -> StreamSlot:
        user = (tenant_id, user_id)
        if self._users.get(user, 0) >= self.per_user:
            raise Problem(429, "too_many_streams",
                          f"Too many open streams for this user (limit {self.per_user}); close one or retry later.",
                          headers={"Retry-After": "5"})
        if run_id is not None and self._runs.get(run_id, 0) >= self.per_run:
            raise Problem(429, "too_many_streams",
                          f"Too many open streams for this run (limit {self.per_run}); close one or retry later.",
                          headers={"Retry-After": "5"})
        self._users[user] = self._users.get(user, 0) + 1
        slot = StreamSlot(self, user, None)
        if run_id is not None:
            slot.add_run(run_id)
        task = asyncio.current_task()
        if task is not None:
            # the slot itself (no bound method per stream), in the shared empty context
            task.add_done_callback(slot, context=BARE_CONTEXT)
        return slot

    def _count_run(self, run_id: str) -> None:
        self._runs[run_id] = self._runs.get(run_id, 0) + 1

    def _give_back(self, user: tuple[str, str], run_id: str | None) -> None:
        _decrement(self._users, user)
        if run_id is not None:
            _decrement(self._runs, run_id)

    def open_streams(self, tenant_id: str, user_id: str) -> int:
        return self._users.get((tenant_id, user_id), 0)


def _decrement(counts: dict[Any, int], key: object) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class StreamSlot:
    __slots__ = ("_released", "_run_id", "_slots", "_user")  # kept by every open stream

    def __init__(self, slots: StreamSlots, user: tuple[str, str], run_id: str | None) -> None:
        self._slots = slots
        self._user = user
        self._run_id = run_id
        self._released = False

    def add_run(self, run_id: str) -> None:
        """The run this stream reads, once known (a new run's id exists only once it started)."""
        if self._run_id is None and not self._released:
            self._run_id = run_id
            self._slots._count_run(run_id)

    def release(self, *_: object) -> None:
        if not self._released:
            self._released = True
            self._slots._give_back(self._user, self._run_id)

    def __call__(self, _task: object) -> None:
        """Its request's task ended (the slot is that task's done callback)."""
        self.release()


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """Values come from the settings (app/settings.py, the one place a default is written)."""

    heartbeat_seconds: float
    max_context_bytes: int
    max_prompt_chars: int
    on_disconnect: str
    max_stream_seconds: float
    reconnect_hint_ms: int
    metrics: Telemetry | None
    slots: StreamSlots


class StreamMeter:
    """Counts what one SSE response writes (events by type, heartbeats, time to first event)."""

    __slots__ = ("_first", "_kind", "_metrics", "_started")  # kept by every open stream

    def __init__(self, metrics: Telemetry | None, kind: str) -> None:
        self._metrics = metrics
        self._kind = kind
        self._started = time.monotonic()
        self._first = True
        if metrics is not None:
            metrics.stream_opened(kind)

    def event(self, type_: str) -> None:
        self.events([type_])

    def events(self, types: Sequence[str]) -> None:
        """The types of the events one write carries, in order: counted per run of one type (a
        busy stream's write is a batch of content chunks: one count)."""
        metrics = self._metrics
        if metrics is None or not types:
            return
        current, count = types[0], 0
        for type_ in types:
            if type_ != current:
                metrics.events_written(current, count)
                current, count = type_, 0
            count += 1
        metrics.events_written(current, count)
        if self._first and self._kind == "run":
            self._first = False
            metrics.first_event_written(time.monotonic() - self._started)

    def heartbeat(self) -> None:
        if self._metrics is not None:
            self._metrics.heartbeat_written()

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.stream_closed(self._kind)


def sse_headers() -> dict[str, str]:
    headers = {
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    }
    if request.http_version == "1.1":  # HTTP/2 and HTTP/3 forbid connection-specific headers
        headers["Connection"] = "keep-alive"
    return headers


def reconnect_frame(config: StreamConfig, why: str) -> bytes:
    """Ends a connection the run outlives: the client reconnects with Last-Event-ID and resumes.
    `retry` takes effect when its line is read; no blank line follows, so no parser dispatches an
    empty message for it."""
    return encode_comment(why) + f"retry: {config.reconnect_hint_ms}\n".encode()


async def live_frames(watcher: RunWatch, config: StreamConfig, slot: StreamSlot | None = None) -> AsyncIterator[bytes]:
    """Frames of one watcher until `end` + [DONE]. A comment heartbeat whenever the stream was
    quiet for the interval. When the client goes away the generator is cancelled, and releasing
    the watcher as disconnected applies the run's disconnect policy."""
    finished = False
    deadline = time.monotonic() + config.max_stream_seconds
    meter = StreamMeter(config.metrics, "run")
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # a long run outlives one connection: the client resumes, the run goes on
                finished = True
                yield reconnect_frame(config, "stream lifetime reached; reconnect with Last-Event-ID")
                return
            event = await watcher.next(min(config.heartbeat_seconds, remaining))
            if event is None:
                if time.monotonic() < deadline:
                    meter.heartbeat()
                    yield HEARTBEAT_FRAME
                continue
            chunk, finished = _batch(event, watcher, meter, config)
            event = None  # a parked stream waits long for its next event: hold none of its events
            yield chunk
            if finished:
                return
            if watcher.run_waits_for_a_human:
                # The server's send loop keeps the last body it sent until the next one (Quart's
                # `_send_response`), as does `chunk` here: an empty body, which puts nothing on the
                # wire, lets both go for the minutes the approval takes.
                chunk = b""
                yield chunk
    except SubscriptionOverflow:
        # The client reads slower than the run writes, or the run cannot feed it any more (fenced,
        # or the log refused an event): drop this connection (not the run); the client resumes
        # from the event log with Last-Event-ID. Not a disconnect: the run goes on.
        finished = True
        yield reconnect_frame(config, "this connection ends here; reconnect with Last-Event-ID to resume "
                                      "from the event log")
    finally:
        meter.close()
        watcher.release(disconnected=not finished)
        if slot is not None:
            slot.release()


def _batch(event: Event, watcher: RunWatch, meter: StreamMeter, config: StreamConfig) -> tuple[bytes, bool]:
    """`event` and whatever else is already buffered, as one write (under load a connection sends a
    batch per wake-up instead of one frame per event); True when it ends the stream."""
    batch: list[bytes] = []
    types: list[str] = []
    for item in (event, *watcher.take_buffered(BATCH_EVENTS)):
        types.append(item.type)
        if item.is_terminal:
            batch.append(terminal_frame(item, config))
            meter.events(types)
            return b"".join(batch), True
        batch.append(encode_run_event(item))
    meter.events(types)
    return b"".join(batch), False


def terminal_frame(event: Event, config: StreamConfig) -> bytes:
    """`end` then [DONE]. When the server is shutting down, the `end` carries a `retry:` hint: the
    client may start again (on another instance) after that delay."""
    retry = config.reconnect_hint_ms if event.data.get("reason") == "server_shutdown" else None
    return encode_run_event(event, retry_ms=retry) + DONE_FRAME


def encode_notice(notice: Notice) -> bytes:
    # No `id:` line: a notice is not part of the run's sequence, so it must not move Last-Event-ID.
    return encode_event(orjson.dumps(notice.envelope()).decode(), event=notice.type.value)


async def resumed_frames(items: AsyncIterator[ResumeItem], config: StreamConfig,
                         slot: StreamSlot | None = None) -> AsyncIterator[bytes]:
    deadline = time.monotonic() + config.max_stream_seconds
    meter = StreamMeter(config.metrics, "resume")
    try:
        async for item in items:
            if item is None:
                if time.monotonic() >= deadline:  # a quiet stream ends too (checked at each heartbeat)
                    yield reconnect_frame(config, "stream lifetime reached; reconnect with Last-Event-ID")
                    return
                meter.heartbeat()
                yield HEARTBEAT_FRAME
                continue
            meter.event(item.type.value)
            if isinstance(item, Notice):
                if item.type is EventType.END:  # the stream ends here, whatever the run does
                    yield encode_notice(item) + DONE_FRAME
                    return
                yield encode_notice(item)
            elif item.is_terminal:
                yield terminal_frame(item, config)
                return
            else:
                yield encode_run_event(item)
            if time.monotonic() >= deadline:
                yield reconnect_frame(config, "stream lifetime reached; reconnect with Last-Event-ID")
                return
        yield DONE_FRAME
    finally:
        meter.close()
        if slot is not None:
            slot.release()


def sse_response(frames: AsyncIterator[bytes], extra_headers: dict[str, str] | None = None) -> Response:
    response = Response(frames, status=200, headers={**sse_headers(), **(extra_headers or {})})
    response.timeout = None  # streams outlive RESPONSE_TIMEOUT by design
    return response
