"""The LangGraph baseline's graphs, served by `langgraph dev` (langgraph.json beside this file).

- `stream`: input {"events": N, "size": S} writes N custom stream events of about S bytes each
  (the same envelope as Aura's and the other baselines'), yielding to the event loop between them.
- `approval`: input {"events": N, "size": S} stops on `interrupt()` (a human approval, parked in the
  thread's checkpoint); resumed with `Command(resume=...)` it writes one `tool_execution` event with
  the decision, then N events, as Aura's approved run streams its tool and answer.

This file runs in LangGraph's own virtualenv (bench/apps/langgraph/pyproject.toml), not Aura's.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any, TypedDict

import orjson
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt


class Work(TypedDict, total=False):
    events: int
    size: int
    decision: str


def _envelope(kind: str, seq: int, run_id: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "version": "1.0", "seq": seq, "runId": run_id, "sessionId": run_id,
            "threadId": run_id, "traceId": run_id, "timestamp": int(time.time()), "data": data}


async def _write_events(count: int, size: int, first_seq: int = 1) -> None:
    write = get_stream_writer()
    run_id = "run_" + secrets.token_hex(16)
    # the frame LangGraph writes: `event: custom`, the envelope as compact JSON, its blank line (CRLFs)
    bare = len(b"event: custom\r\ndata: \r\n\r\n") + len(orjson.dumps(_envelope("content", 100, run_id,
                                                                             {"content": "", "chunk": True})))
    content = "x" * max(1, size - bare)
    for seq in range(first_seq, first_seq + count):
        write(_envelope("content", seq, run_id, {"content": content, "chunk": True}))
        await asyncio.sleep(0)


async def stream_events(state: Work) -> Work:
    await _write_events(int(state["events"]), int(state["size"]))
    return {}


async def ask_approval(state: Work) -> Work:
    decision = interrupt({"tool": "git_commit", "args": {"repo_path": "no-such-repo", "message": "bench"}})
    return {"decision": str(decision)}


async def act(state: Work) -> Work:
    write = get_stream_writer()
    write(_envelope("tool_execution", 0, "run", {"status": "running", "decision": state.get("decision")}))
    await _write_events(int(state.get("events", 0)), int(state.get("size", 200)))
    return {}


stream = StateGraph(Work).add_node("stream_events", stream_events) \
    .add_edge(START, "stream_events").add_edge("stream_events", END).compile()

approval = StateGraph(Work).add_node("ask_approval", ask_approval).add_node("act", act) \
    .add_edge(START, "ask_approval").add_edge("ask_approval", "act").add_edge("act", END).compile()
