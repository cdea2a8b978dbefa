"""Tools the agent may call: their specs, validated arguments and the registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator

from domain.model.errors import InvalidInput, UnknownTool
from domain.model.identity import Principal


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: Mapping[str, Any]
    requires_approval: bool = False
    action_type: str = "read"

    def as_model_schema(self) -> dict[str, Any]:
        """The function description handed to a model (OpenAI tool format)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a tool may know about the run that calls it."""

    principal: Principal
    trace_id: str
    run_id: str
    bearer_token: str | None = None
    extra_headers: Mapping[str, str] = field(default_factory=dict)


class Tool(ABC):
    """A port: one action the agent can take. Adapters implement real tools."""

    spec: ToolSpec

    def needs_approval(self, args: Mapping[str, Any]) -> bool:
        """Whether this call must wait for a human. Tools may decide per call (e.g. by HTTP method)."""
        return self.spec.requires_approval

    @abstractmethod
    async def run(self, args: Mapping[str, Any], context: ToolContext) -> Any:
        """Run the tool and return a JSON-serialisable result; raise ToolFailure on failure."""


def _with_defaults(schema: Mapping[str, Any], args: Mapping[str, Any]) -> dict[str, Any]:
    filled = dict(args)
    for name, prop in (schema.get("properties") or {}).items():
        if name not in filled and isinstance(prop, Mapping) and "default" in prop:
            filled[name] = prop["default"]
    return filled


class ToolRegistry:
    """The tools offered to the agent, with per-tool approval overrides from settings."""

    def __init__(self, tools: Iterable[Tool] = (), approval_overrides: Mapping[str, bool] | None = None) -> None:
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, Draft202012Validator] = {}
        self._overrides = dict(approval_overrides or {})
        # sorted by name once per registration, not on each of a run's several reads
        self._specs: tuple[ToolSpec, ...] = ()
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        if tool.spec.name in self._tools:
            raise ValueError(f"tool {tool.spec.name!r} registered twice")
        Draft202012Validator.check_schema(dict(tool.spec.parameters))
        self._tools[tool.spec.name] = tool
        self._validators[tool.spec.name] = Draft202012Validator(dict(tool.spec.parameters))
        self._specs = tuple(self._tools[name].spec for name in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def names(self) -> list[str]:
        return sorted(self._tools)

    def specs(self) -> list[ToolSpec]:
        return list(self._specs)

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise UnknownTool(f"Unknown tool {name!r}. Available tools: {', '.join(self.names())}.") from None

    def validate(self, name: str, args: object) -> dict[str, Any]:
        """Validate model- or user-supplied arguments against the tool's schema; fill defaults."""
        tool = self.get(name)
        if not isinstance(args, Mapping):
            raise InvalidInput(f"Arguments of {name} must be a JSON object.", code="invalid_tool_arguments")
        errors = sorted(self._validators[name].iter_errors(dict(args)), key=lambda e: list(e.path))
        if errors:
            first = errors[0]
            where = "/".join(str(p) for p in first.path) or "arguments"
            raise InvalidInput(f"Invalid arguments for {name} at {where}: {first.message}",
                               code="invalid_tool_arguments")
        return _with_defaults(tool.spec.parameters, args)

    def needs_approval(self, name: str, args: Mapping[str, Any]) -> bool:
        if name in self._overrides:
            return self._overrides[name]
        return self.get(name).needs_approval(args)
