"""Builds a RunService from fakes and collects a run's events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from domain.model.approval import DecisionSeal
from domain.model.chat import EstimatedModelProfile
from domain.model.events import Event
from domain.model.identity import Principal
from domain.model.ports import ApprovalStore
from domain.model.run import RunRequest
from domain.model.telemetry import Telemetry
from domain.model.tools import Tool, ToolRegistry
from domain.runtime.feed import Subscription
from domain.services.agent import Agent, AgentLimits
from domain.services.gate import ApprovalGate, GateSettings
from domain.services.recheck import ApprovalRecheck
from domain.services.runs import RunLimits, RunService
from tests.defaults import AGENT_LIMITS, DEFAULTS, GATE_SETTINGS, RUN_LIMITS, TOKEN_BUDGETS, TOOL_CALLS
from tests.unit.fakes import (
    FakeClock,
    MemoryApprovalStore,
    MemoryEventLog,
    MemoryRunDirectory,
    MemorySignalBus,
    ScriptedModel,
    SequentialIds,
)

ALICE = Principal(user_id="alice", tenant_id="acme", actor_id="alice", role="user")


@dataclass
class Harness:
    model: ScriptedModel
    tools: list[Tool] = field(default_factory=list)
    limits: AgentLimits = AGENT_LIMITS
    gate_settings: GateSettings = GATE_SETTINGS
    recheck_seconds: float = DEFAULTS.hitl.recheck_seconds
    run_limits: RunLimits = RUN_LIMITS
    approval_overrides: dict[str, bool] = field(default_factory=dict)
    telemetry: Telemetry = field(default_factory=Telemetry)

    def __post_init__(self) -> None:
        self.clock = FakeClock()
        self.ids = SequentialIds()
        self.bus = MemorySignalBus()
        self.store = MemoryApprovalStore(self.bus)
        self.log = MemoryEventLog()
        self.directory = MemoryRunDirectory(self.log)
        self.registry = ToolRegistry(self.tools, approval_overrides=self.approval_overrides)
        self.rebuild()

    def rebuild(self, *, store: ApprovalStore | None = None, recheck: ApprovalRecheck | None = None,
                seal: DecisionSeal | None = None) -> None:
        """The gate, agent and run service again, from this harness's parts (after a test swapped one)."""
        store = store or self.store
        recheck = recheck or ApprovalRecheck(store, self.clock, self.recheck_seconds)
        self.gate = ApprovalGate(store, self.bus, self.clock, self.ids, self.gate_settings, self.telemetry, recheck,
                                 seal=seal)
        self.agent = Agent(self.model, self.registry, self.gate, self.limits, self.telemetry,
                           profile=EstimatedModelProfile(DEFAULTS.model.default_context_window),
                           budgets=TOKEN_BUDGETS, tool_calls=TOOL_CALLS)
        self.service = RunService(self.agent, self.clock, self.ids, self.log, self.directory, self.run_limits,
                                  "instance-a", None, self.telemetry)

    async def start(self, prompt: str = "Do it", **request: Any) -> tuple[Any, Subscription]:
        return await self.service.start(ALICE, RunRequest(prompt=prompt, **request))


async def collect(watcher: Subscription, wait_seconds: float = 5.0) -> list[Event]:
    """Every event up to and including `end`; fails instead of hanging."""
    events: list[Event] = []
    while True:
        event = await watcher.next(wait_seconds)
        assert event is not None, f"no event within {wait_seconds} s after {[e.type.value for e in events]}"
        events.append(event)
        if event.is_terminal:
            return events


def summary(events: list[Event]) -> list[tuple[Any, ...]]:
    """A readable, exact digest of an event sequence."""
    out: list[tuple[Any, ...]] = []
    for e in events:
        d = e.data
        match e.type.value:
            case "thought":
                if not d["chunk"]:  # a streamed thought's pieces are digested as its final text
                    out.append(("thought", d["thoughtType"]))
            case "plan_step":
                out.append(("plan_step", d["stepId"], d["description"]))
            case "plan_step_update":
                out.append(("step", d["stepId"], d["status"], d["progress"]))
            case "timeline_step_update":
                out.append(("timeline", d["stepId"], d["status"]))
            case "tool_execution":
                out.append(("tool", d["toolName"], d["status"]))
            case "content":
                out.append(("content", d["content"], d["chunk"]))
            case "error":
                out.append(("error", d["errorType"]))
            case "end":
                out.append(("end", d["status"], d["reason"]))
            case other:
                out.append((other,))
    return out
