"""Writing a run's events as an SSE response, shared by the POST stream and (later) resumes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from quart import Response, request

from adapters.http.sse import DONE_FRAME, HEARTBEAT_FRAME, encode_comment, encode_run_event
from domain.service import RunHandle, RunService, Subscription, SubscriptionOverflow


@dataclass(frozen=True, slots=True)
class StreamConfig:
    heartbeat_seconds: float = 15.0
    max_context_bytes: int = 262_144
    max_prompt_chars: int = 32_000
    on_disconnect: str = "cancel"


def sse_headers() -> dict[str, str]:
    headers = {
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    }
    if request.http_version == "1.1":  # HTTP/2 and HTTP/3 forbid connection-specific headers
        headers["Connection"] = "keep-alive"
    return headers


async def live_frames(runs: RunService, handle: RunHandle, watcher: Subscription,
                      heartbeat_seconds: float) -> AsyncIterator[bytes]:
    """Frames of one watcher until `end` + [DONE]. A comment heartbeat whenever the stream was
    quiet for the interval. When the client goes away the generator is cancelled, and `release`
    applies the run's disconnect policy."""
    finished = False
    try:
        while True:
            event = await watcher.next(heartbeat_seconds)
            if event is None:
                yield HEARTBEAT_FRAME
                continue
            yield encode_run_event(event)
            if event.is_terminal:
                finished = True
                yield DONE_FRAME
                return
    except SubscriptionOverflow:
        # The client reads slower than the run writes: drop this connection (not the run's
        # state); the client resumes from the event log with Last-Event-ID.
        yield encode_comment("too far behind; reconnect with Last-Event-ID to resume")
    finally:
        runs.release(handle, watcher, disconnected=not finished)


def sse_response(frames: AsyncIterator[bytes], extra_headers: dict[str, str] | None = None) -> Response:
    response = Response(frames, status=200, headers={**sse_headers(), **(extra_headers or {})})
    response.timeout = None  # streams outlive RESPONSE_TIMEOUT by design
    return response
