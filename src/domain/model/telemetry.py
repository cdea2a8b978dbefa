"""What the domain reports about itself: a port with do-nothing defaults, and the log context.

Adapters turn the reports into metrics (Prometheus); the log context puts run and caller ids on
every log line written while a request or a run is being handled."""

from __future__ import annotations

from contextvars import Context, ContextVar
from itertools import chain
from typing import Any

# Keys and values alternating in one flat tuple: a run waiting for approval and its stream keep one
# each for the whole wait, and a dict of the same six fields is more than twice the size.
_log_context: ContextVar[tuple[Any, ...]] = ContextVar("aura_log_context", default=())


def bind_log_context(**fields: Any) -> None:
    """Add fields to the log context of the current task (tasks started later inherit it)."""
    _log_context.set(_with_fields(fields))


def log_context() -> dict[str, Any]:
    flat = _log_context.get()
    return dict(zip(flat[::2], flat[1::2], strict=True))


def detached_log_context(**fields: Any) -> Context:
    """A context for a long-lived task that holds only the log context (the current one plus
    `fields`). A task made with a copy of the current context would keep everything bound in it:
    started from an HTTP request, Quart's request and app contexts (`g`, the session, the URL
    adapter) for as long as the task lives, which for a run waiting on an approval is hours."""
    context = Context()
    context.run(_log_context.set, _with_fields(fields))
    return context


def _with_fields(fields: dict[str, Any]) -> tuple[Any, ...]:
    """The current log context plus `fields` (those that are not None)."""
    merged = log_context()
    merged.update((k, v) for k, v in fields.items() if v is not None)
    return tuple(chain.from_iterable(merged.items()))


class Telemetry:
    """Observations of runs, approvals, models, tools and the streams that carry a run's events.
    The defaults record nothing."""

    def run_started(self) -> None: ...

    def run_ended(self, status: str) -> None: ...

    def approval_wait_started(self) -> None: ...

    def approval_wait_ended(self, outcome: str, seconds: float) -> None: ...

    def model_call(self, purpose: str, seconds: float, error_code: str | None) -> None: ...

    def tool_call(self, tool: str, status: str) -> None: ...

    def store_error(self) -> None: ...

    def stream_opened(self, kind: str) -> None:
        """A stream of a run's events opened: `run` (a new run's own) or `resume`."""

    def stream_closed(self, kind: str) -> None: ...

    def events_written(self, type_: str, count: int) -> None:
        """`count` events of one type written to a client in one write (a stream's writes carry
        a batch of events each under load: counted per write, not per event)."""

    def first_event_written(self, seconds: float) -> None:
        """A new run's first event reached its client, `seconds` after its request began."""

    def heartbeat_written(self) -> None: ...
