"""Helpers shared by the HTTP and end-to-end tests: tokens, repositories, SSE parsing."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from adapters.http.event_schema import events_json_schema
from adapters.jwt import mint_token

SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"
TENANT, USER = "acme", "alice"


def token(sub: str = USER, tenant: str = TENANT, *, key: str = SECRET, algorithm: str = "HS256", **kw: Any) -> str:
    return mint_token(key=key, algorithm=algorithm, sub=sub, tenant_id=tenant, **kw)


def bearer(sub: str = USER, tenant: str = TENANT, **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, tenant, **kw)}"}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "dev@example.com")
    git(path, "config", "user.name", "Dev")
    (path / "README.md").write_text("hello\n")
    git(path, "add", "README.md")
    git(path, "commit", "-q", "-m", "Initial commit")
    return path


@dataclass(frozen=True)
class Frame:
    id: str | None
    event: str | None
    data: str
    comment: bool = False

    @property
    def payload(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value


class FrameParser:
    """A strict reader of Aura's frames, line by line: an event's fields end with a blank line; a
    heartbeat is a comment line alone (a blank line after it would reach some parsers as an empty
    message, so a blank line that ends no event fails)."""

    def __init__(self) -> None:
        self._fields: dict[str, list[str]] = {}

    def line(self, line: str) -> Frame | None:
        if line.startswith(":"):
            assert not self._fields, f"a comment inside an event: {line!r}"
            return Frame(None, None, "", comment=True)
        if line:
            name, _, value = line.partition(": ")
            self._fields.setdefault(name, []).append(value)
            return None
        assert self._fields, "a blank line that ends no event"
        fields, self._fields = self._fields, {}
        return Frame(fields.get("id", [None])[0], fields.get("event", [None])[0], "\n".join(fields.get("data", [])))


def parse_sse(body: str) -> list[Frame]:
    """Every frame of a whole body (which must end with a complete event)."""
    assert body.endswith("\n\n"), "the stream must end with a complete frame"
    parser = FrameParser()
    return [frame for line in body[:-1].split("\n") if (frame := parser.line(line)) is not None]


EVENT_SCHEMA = Draft202012Validator(events_json_schema())


def check_event(envelope: dict[str, Any]) -> None:
    """Every event the service emits must validate against the schema it publishes."""
    errors = sorted(EVENT_SCHEMA.iter_errors(envelope), key=str)
    assert not errors, f"{envelope['type']} event does not match /aura/schema/events.json: {errors[0].message}"


def events_of(frames: list[Frame]) -> list[dict[str, Any]]:
    """Envelopes of the event frames, checking the framing rules on the way."""
    real = [f for f in frames if not f.comment]
    assert real[-1].data == "[DONE]" and real[-1].event is None and real[-1].id is None
    envelopes = []
    for frame in real[:-1]:
        envelope = frame.payload
        assert frame.id == f"{envelope['runId']}:{envelope['seq']}" and frame.event == envelope["type"]
        check_event(envelope)
        envelopes.append(envelope)
    assert [e["seq"] for e in envelopes] == list(range(1, len(envelopes) + 1))
    assert envelopes[-1]["type"] == "end"
    return envelopes
