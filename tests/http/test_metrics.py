"""Prometheus exposition at /metrics, fed by real runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from quart.typing import TestClientProtocol

from app.factory import create_app
from tests.support import bearer


def sample(text: str, name: str) -> float:
    """The value of one sample line, e.g. `aura_runs_total{status="completed"}`."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[-1])
    raise AssertionError(f"{name} not in the exposition")


async def test_metrics_count_runs_events_tools_and_auth_failures(client: TestClientProtocol) -> None:
    response = await client.post("/aura/test/stream", headers=bearer(),
                                 json={"prompt": '@git_status {"repo_path": "repo"}'})
    body = await response.get_data(as_text=True)
    events = body.count("\nevent: ") + body.startswith("event: ")
    await client.post("/aura/test/stream", json={"prompt": "x"})  # no token
    await client.post("/aura/test/stream", json={"prompt": "x"}, headers={"Authorization": "Bearer junk"})

    exposition = await client.get("/metrics")
    assert exposition.status_code == 200
    assert exposition.headers["Content-Type"].startswith("text/plain")
    text = await exposition.get_data(as_text=True)
    assert sample(text, 'aura_runs_total{status="completed"}') == 1
    assert sample(text, 'aura_tool_calls_total{status="success",tool="git_status"}') == 1
    assert sample(text, 'aura_auth_failures_total{code="missing_token"}') == 1
    assert sample(text, 'aura_auth_failures_total{code="malformed_token"}') == 1
    assert sample(text, 'aura_events_sent_total{type="start"}') == 1
    assert sample(text, 'aura_events_sent_total{type="end"}') == 1
    sent = sum(float(line.split(" ")[-1]) for line in text.splitlines()
               if line.startswith("aura_events_sent_total{"))
    assert sent == events
    assert sample(text, "aura_time_to_first_event_seconds_count") == 1
    assert sample(text, 'aura_model_call_seconds_count{purpose="plan"}') == 1
    assert sample(text, 'aura_open_streams{kind="run"}') == 0
    assert sample(text, "aura_runs_active") == 0


async def test_metrics_can_require_a_token(make_settings: Callable[..., Any]) -> None:
    app = create_app(make_settings(server={"metrics_require_auth": True}))
    client = app.test_client()
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.get("/metrics", headers=bearer())).status_code == 200


async def test_the_event_schema_is_published(client: TestClientProtocol) -> None:
    from jsonschema import Draft202012Validator

    response = await client.get("/aura/schema/events.json")
    schema = await response.get_json()
    Draft202012Validator.check_schema(schema)
    assert len(schema["oneOf"]) == 11
    validator = Draft202012Validator(schema)
    good = {"type": "end", "version": "1.0", "seq": 3, "runId": "r", "sessionId": "s", "threadId": "t",
            "traceId": "x", "timestamp": 1767000000, "data": {"status": "completed", "reason": "r", "message": "m"}}
    assert validator.is_valid(good)
    assert not validator.is_valid({**good, "data": {**good["data"], "status": "finished"}})
    assert not validator.is_valid({**good, "timestamp": 1767000000.5})


async def test_openapi_covers_every_route_with_problem_responses(app: Any) -> None:
    from openapi_spec_validator import validate

    spec = await (await app.test_client().get("/openapi.json")).get_json()
    validate(spec)
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    routes = {(rule.rule.replace("<", "{").replace(">", "}"), method.lower())
              for rule in app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}
              if not rule.rule.startswith(("/static", "/openapi.json", "/docs"))
              and not rule.rule.startswith("/aura/console/<")
              and rule.rule not in ("/aura/console", "/aura/console/")}  # the HTML page itself
    assert routes <= documented
    stream = spec["paths"]["/aura/test/stream"]["post"]
    assert "text/event-stream" in stream["responses"]["200"]["content"]
    for status in ("401", "413", "422", "429"):
        assert stream["responses"][status]["content"]["application/problem+json"]
    assert stream["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/health"]["get"]
    assert "security" not in spec["paths"]["/"]["get"]


async def test_tool_names_a_model_invents_never_become_label_values() -> None:
    # A prompt-injected model would spell stolen data in the names of the tools it calls.
    from adapters.metrics.prometheus import PrometheusMetrics
    from tests.unit.fakes import RecordingTool, ScriptedModel, text, tool_call
    from tests.unit.harness import Harness, collect

    metrics = PrometheusMetrics(tool_names=["read"])
    plan = text(json.dumps({"steps": [{"description": "Look", "tool": "read"}]}))
    for number in range(20):
        model = ScriptedModel(plan, tool_call(f"leak_secret_{number:02}", "{}"), text("hm"), text("Done."))
        harness = Harness(model, tools=[RecordingTool("read")], telemetry=metrics)
        _, watcher = await harness.start()
        await collect(watcher)

    text_ = metrics.exposition().decode()
    assert "leak_secret" not in text_
    tool_series = {line for line in text_.splitlines() if line.startswith("aura_tool_calls_total{")}
    assert tool_series == {'aura_tool_calls_total{status="failed",tool="other"} 20.0'}


def test_every_label_comes_from_a_closed_set() -> None:
    from adapters.metrics.prometheus import PrometheusMetrics

    metrics = PrometheusMetrics(tool_names=["git_status"])

    def report_invented(first: int, count: int) -> int:
        for number in range(first, first + count):
            name = f"invented_{number}"
            metrics.tool_call(name, name)
            metrics.run_ended(name)
            metrics.events_written(name, 1)
            metrics.approval_wait_ended(name, 1.0)
            metrics.model_call(name, 1.0, name)
            metrics.auth_failed(name)
        return len(metrics.exposition().decode().splitlines())

    metrics.tool_call("git_status", "success")
    series_after_1000 = report_invented(0, 1000)
    assert report_invented(1000, 1000) == series_after_1000

    text = metrics.exposition().decode()
    assert 'aura_tool_calls_total{status="success",tool="git_status"}' in text
    assert 'aura_tool_calls_total{status="other",tool="other"} 2000.0' in text
    assert 'aura_runs_total{status="other"} 2000.0' in text
    assert 'aura_events_sent_total{type="other"} 2000.0' in text
    assert 'aura_approval_decisions_total{outcome="other"} 2000.0' in text
    assert 'aura_model_call_seconds_count{purpose="other"} 2000.0' in text
    assert "invented_1999" not in text


def test_a_write_of_many_events_is_counted_once_per_run_of_one_type() -> None:
    """A busy stream writes a batch of events at once: the counter moves once per run of one type
    in it, by that many (the exposition's totals are the events written, as before)."""
    from adapters.http.streams import StreamMeter
    from domain.model.events import EventType
    from domain.model.telemetry import Telemetry

    class Recording(Telemetry):
        def __init__(self) -> None:
            self.counted: list[tuple[str, int]] = []
            self.firsts = 0

        def events_written(self, type_: str, count: int) -> None:
            self.counted.append((type_, count))

        def first_event_written(self, seconds: float) -> None:
            self.firsts += 1

    recording = Recording()
    meter = StreamMeter(recording, "run")
    meter.events([EventType.START])
    meter.events([EventType.CONTENT] * 5 + [EventType.THOUGHT, EventType.CONTENT, EventType.END])
    meter.events([])
    assert recording.counted == [("start", 1), ("content", 5), ("thought", 1), ("content", 1), ("end", 1)]
    assert recording.firsts == 1
