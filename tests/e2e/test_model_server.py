"""Aura under hypercorn with its OpenAI-compatible adapter pointed at a local Chat Completions server."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from tests.aura_process import AuraProcess
from tests.contract.chat_server import ChatServer, Stream, content_frames, tool_call_frames
from tests.redis_server import RedisServer
from tests.sse_client import open_run
from tests.support import bearer, git

PLAN = json.dumps({"steps": [{"description": "Commit the staged change", "tool": "git_commit",
                              "args": {"repo_path": "repo", "message": "From the model"}}]})
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_a_real_model_run_with_approval_and_a_remembered_thread(
        start_aura: Callable[..., AuraProcess], e2e_workspace: Path, redis_server: RedisServer) -> None:
    store = redis.Redis.from_url(redis_server.url)
    store.flushall()
    repo = e2e_workspace / "repo"
    (repo / "model.txt").write_text("written by the model\n")
    git(repo, "add", "model.txt")
    async with ChatServer() as chat:
        chat.enqueue(
            Stream(content_frames([PLAN[:20], PLAN[20:]])),
            Stream(tool_call_frames([("call_a", "git_commit",
                                      ['{"repo_path": "repo",', ' "message": "From the model"}'])])),
            Stream(content_frames(["Committed ", "the change."])),
            Stream(content_frames(["The ", "commit ", "is ", "done."], usage={"prompt_tokens": 50,
                                                                              "completion_tokens": 4})),
        )
        aura = start_aura(redis_url=redis_server.url, env={
            "AURA_MODEL__PROVIDER": "openai", "AURA_MODEL__BASE_URL": f"{chat.url}/v1",
            "AURA_MODEL__API_KEY": "sk-test-key", "AURA_MODEL__NAME": "gpt-test"})
        async with httpx.AsyncClient(base_url=aura.url, timeout=20) as client:
            async with open_run(client, {"prompt": "Please commit my staged work", "thread_id": "thread-1",
                                         "context": {"title": "Repo page"}},
                                {**bearer(), "traceparent": TRACEPARENT}) as run:
                hitl = await run.until("hitl")
                assert hitl["data"]["context"] == {"repo_path": "repo", "message": "From the model"}
                signal = json.dumps({"type": "approval", "requestId": hitl["data"]["requestId"],
                                     "status": "approved", "userId": "alice", "timestamp": int(time.time())})
                store.set(f"hitl:signal:{hitl['data']['sessionId']}", signal, ex=300)
                store.publish(f"hitl:channel:{hitl['data']['sessionId']}", signal)
                events = await run.rest()
        assert git(repo, "log", "-1", "--format=%s") == "From the model"
        chunks = [e["data"]["content"] for e in events if e["type"] == "content" and e["data"]["chunk"]]
        assert chunks == ["The ", "commit ", "is ", "done."]
        final = [e["data"] for e in events if e["type"] == "content" and not e["data"]["chunk"]]
        assert final == [{"content": "The commit is done.", "chunk": False}]
        assert [e["data"]["status"] for e in events if e["type"] == "tool_execution"] == \
            ["pending", "running", "success"]
        assert events[-1]["data"]["status"] == "completed"

        # what the model was sent: the key, the trace, the tools, the tool result fed back
        plan_request, step_request, after_tool, answer_request = chat.requests[:4]
        assert plan_request.headers["authorization"] == "Bearer sk-test-key"
        assert plan_request.headers["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        assert plan_request.body["model"] == "gpt-test" and plan_request.body["stream"] is True
        plan_format = plan_request.body["response_format"]
        assert plan_format["type"] == "json_schema" and plan_format["json_schema"]["strict"] is False
        variants = plan_format["json_schema"]["schema"]["properties"]["steps"]["items"]["anyOf"]
        assert {"git_commit", "git_status"} <= {n for v in variants for n in v["properties"]["tool"].get("enum", [])}
        assert plan_request.body["max_completion_tokens"] == 768  # the plan's budget, by default
        # the step's first call names the planned tool
        assert step_request.body["tool_choice"] == {"type": "function", "function": {"name": "git_commit"}}
        assert "Repo page" in plan_request.body["messages"][0]["content"]
        tool_names = {t["function"]["name"] for t in step_request.body["tools"]}
        assert {"git_commit", "git_status", "git_log"} <= tool_names
        tool_message = after_tool.body["messages"][-1]
        assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == "call_a"
        assert json.loads(tool_message["content"])["summary"].startswith("Committed")
        assert "tools" not in answer_request.body

        # the second run of the thread sees the first one's history
        chat.enqueue(Stream(content_frames(['{"steps": []}'])), Stream(content_frames(["Looked back."])),
                     Stream(content_frames(["You committed ", "earlier."])))
        async with httpx.AsyncClient(base_url=aura.url, timeout=20) as client:
            second = await client.post("/aura/test/stream", headers=bearer(),
                                       json={"prompt": "What did we do?", "thread_id": "thread-1"})
            assert second.status_code == 200 and second.text.endswith("data: [DONE]\n\n")
            history = chat.requests[4].body["messages"]
            assert [m["role"] for m in history[:4]] == ["system", "user", "assistant", "user"]
            assert history[1]["content"] == "Please commit my staged work"
            assert history[2]["content"].startswith("The commit is done.")
            assert "git_commit success" in history[2]["content"]
            assert history[3]["content"] == "What did we do?"

            # The same thread id from another user or tenant names a thread of their own: empty.
            for headers in (bearer("bob"), bearer("alice", "globex")):
                chat.enqueue(Stream(content_frames(['{"steps": []}'])), Stream(content_frames(["Nothing."])),
                             Stream(content_frames(["Nothing yet."])))
                seen = len(chat.requests)
                other = await client.post("/aura/test/stream", headers=headers,
                                          json={"prompt": "Show me", "thread_id": "thread-1"})
                assert other.status_code == 200 and other.text.endswith("data: [DONE]\n\n")
                sent = chat.requests[seen].body["messages"]
                assert "assistant" not in [m["role"] for m in sent]  # no earlier turn
                assert "Please commit my staged work" not in json.dumps(sent)
    store.close()


async def test_model_failure_reaches_the_client_as_a_typed_error(
        start_aura: Callable[..., AuraProcess], redis_server: RedisServer) -> None:
    from tests.contract.chat_server import Reply

    async with ChatServer(default=Reply.error(503, "overloaded")) as chat:
        aura = start_aura(env={"AURA_MODEL__PROVIDER": "openai", "AURA_MODEL__BASE_URL": f"{chat.url}/v1",
                               "AURA_MODEL__MAX_RETRIES": "1"})
        async with httpx.AsyncClient(base_url=aura.url, timeout=20) as client:
            response = await client.post("/aura/test/stream", headers=bearer(), json={"prompt": "hi"})
        body = response.text
        assert "event: error" in body and '"errorType":"llm_unavailable"' in body
        assert body.endswith("data: [DONE]\n\n") and "overloaded" not in body
        assert len(chat.requests) == 2  # one retry before the first token
