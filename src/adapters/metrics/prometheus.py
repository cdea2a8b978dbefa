"""Aura's metrics in a registry of their own (one per app, so tests can build many apps).

Every label value comes from a closed set: `/metrics` is unauthenticated by default, and a value
chosen by a model (a tool name it invents) or a caller would be an exfiltration channel and would
grow the exposition without bound. A value outside its set is counted as `other`."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from domain.model.approval import ApprovalStatus
from domain.model.chat import Purpose
from domain.model.events import EventType, RunStatus
from domain.model.telemetry import Telemetry

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DECISION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
OTHER = "other"
TOOL_STATUSES = ("success", "failed", "rejected")
# Error and problem codes are spelled in Aura's code, not by callers; the bound is a safety net.
MAX_CODE_LABELS = 64
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")


class ClosedLabel:
    """Maps a value to itself when it is in the set, to `other` otherwise. Without a fixed set,
    the first `limit` well-formed values seen form it."""

    def __init__(self, values: Iterable[str] = (), *, limit: int = 0) -> None:
        self._values = set(values)
        self._limit = limit

    def __call__(self, value: str) -> str:
        if value in self._values:
            return value
        if len(self._values) < self._limit and _CODE.fullmatch(value):
            self._values.add(value)
            return value
        return OTHER


class PrometheusMetrics(Telemetry):
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, tool_names: Collection[str] = ()) -> None:
        """`tool_names`: the registered tools; any other name a model calls is counted as `other`."""
        self._tool = ClosedLabel(tool_names)
        self._tool_status = ClosedLabel(TOOL_STATUSES)
        self._run_status = ClosedLabel(RunStatus)
        self._event_type = ClosedLabel(EventType)
        self._outcome = ClosedLabel(ApprovalStatus)
        self._purpose = ClosedLabel(Purpose)
        self._model_error = ClosedLabel(limit=MAX_CODE_LABELS)
        self._auth_failure_code = ClosedLabel(limit=MAX_CODE_LABELS)
        self.registry = CollectorRegistry()
        r = self.registry
        self.open_streams = Gauge("aura_open_streams", "SSE responses currently open", ["kind"], registry=r)
        self.runs_active = Gauge("aura_runs_active", "Runs executing in this process", registry=r)
        self.runs = Counter("aura_runs", "Runs by final status", ["status"], registry=r)
        self.events_sent = Counter("aura_events_sent", "Events written to clients, by type", ["type"], registry=r)
        self.first_event = Histogram("aura_time_to_first_event_seconds", "Request start to the first event written",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.approval_waits = Gauge("aura_approval_waits_open", "Runs waiting for a human decision", registry=r)
        self.approval_decisions = Counter("aura_approval_decisions", "Approval waits by outcome", ["outcome"],
                                          registry=r)
        self.approval_latency = Histogram("aura_approval_decision_seconds", "From the hitl event to the decision",
                                          ["outcome"], buckets=DECISION_BUCKETS, registry=r)
        self.model_latency = Histogram("aura_model_call_seconds", "Model calls by purpose", ["purpose"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.model_errors = Counter("aura_model_errors", "Model failures by code", ["code"], registry=r)
        self.tool_calls = Counter("aura_tool_calls", "Tool calls by tool and final status", ["tool", "status"],
                                  registry=r)
        self.auth_failures = Counter("aura_auth_failures", "Refused callers by problem code", ["code"], registry=r)
        self.redis_errors = Counter("aura_redis_errors", "Failed Redis operations", registry=r)
        self.heartbeats = Counter("aura_heartbeats_sent", "Heartbeat comments written", registry=r)
        self.resumes = Counter("aura_resumes_served", "Resumed streams (GET events or a retried POST)", registry=r)
        self._events_sent_by_type: dict[str, Any] = {}

    def events_written(self, type_: str, count: int) -> None:
        """Events of one type written to a client in one write. The labelled child is looked up
        once per type: this runs for every write of every stream."""
        child = self._events_sent_by_type.get(type_)
        if child is None:
            child = self.events_sent.labels(self._event_type(type_))
            if type_ in EventType.__members__.values():
                self._events_sent_by_type[type_] = child
        child.inc(count)

    def auth_failed(self, code: str) -> None:
        self.auth_failures.labels(self._auth_failure_code(code)).inc()

    # -- Telemetry port --------------------------------------------------------------------
    def run_started(self) -> None:
        self.runs_active.inc()

    def run_ended(self, status: str) -> None:
        self.runs_active.dec()
        self.runs.labels(self._run_status(status)).inc()

    def approval_wait_started(self) -> None:
        self.approval_waits.inc()

    def approval_wait_ended(self, outcome: str, seconds: float) -> None:
        self.approval_waits.dec()
        outcome = self._outcome(outcome)
        self.approval_decisions.labels(outcome).inc()
        self.approval_latency.labels(outcome).observe(seconds)

    def model_call(self, purpose: str, seconds: float, error_code: str | None) -> None:
        self.model_latency.labels(self._purpose(purpose)).observe(seconds)
        if error_code is not None:
            self.model_errors.labels(self._model_error(error_code)).inc()

    def tool_call(self, tool: str, status: str) -> None:
        self.tool_calls.labels(self._tool(tool), self._tool_status(status)).inc()

    def store_error(self) -> None:
        self.redis_errors.inc()

    def stream_opened(self, kind: str) -> None:
        self.open_streams.labels(kind).inc()
        if kind == "resume":
            self.resumes.inc()

    def stream_closed(self, kind: str) -> None:
        self.open_streams.labels(kind).dec()

    def first_event_written(self, seconds: float) -> None:
        self.first_event.observe(seconds)

    def heartbeat_written(self) -> None:
        self.heartbeats.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
