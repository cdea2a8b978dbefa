"""What one approve POST costs Aura's request path, without the network or a second process.

    python -m bench.request_cost [--n 1000] [--profile]

Starts a real `redis-server` on a free port (stopped at the end), serves Aura in this process through
Quart's test client with the bench's settings, and times the approve POST of pending approval
requests (stored beforehand through Aura's own store, one per caller: authentication, request ids,
the body, the desk, the store's Lua step that decides and publishes, the JSON answer) against a
bare Quart POST route answering JSON, each after a warm-up, one request at a time. With
`--profile`, pyinstrument's call tree of Aura's requests follows (the test client's own work is in
it too). Tokens are minted beforehand, one per request (minting is not what we measure).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from quart import Quart

from bench import servers as S


async def _timed(name: str, call: Callable[[int], Awaitable[None]], n: int, offset: int) -> None:
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        await call(offset + i)
    print(f"{name}: {(time.perf_counter() - started) / n * 1e6:.0f} µs per request "
          f"({(time.process_time() - cpu) / n * 1e6:.0f} µs CPU)")


async def _main(n: int, profile: bool) -> None:
    from adapters.jwt import mint_token
    from app.container import Container
    from app.factory import create_app
    from app.settings import Settings
    from domain.model.approval import ApprovalRequest

    workdir = Path(tempfile.mkdtemp(prefix="aura-request-cost-"))
    redis = S.redis_server(workdir).start()
    try:
        settings = Settings(auth={"jwt_secret": S.SECRET}, redis={"url": redis.url},
                            tools={"workspace_root": str(workdir)})
        container = Container(settings=settings)
        aura = create_app(settings, container)
        floor = Quart("floor")

        @floor.post("/approve/<wait_id>")
        async def approve(wait_id: str) -> dict[str, bool]:
            return {"approved": True}

        count = 3 * n + 200
        tokens = [mint_token(key=S.SECRET, sub=f"cost-u{i}", tenant_id=S.TENANT, ttl_seconds=3600)
                  for i in range(count)]
        async with aura.test_app() as aura_app, floor.test_app() as floor_app:
            aura_client, floor_client = aura_app.test_client(), floor_app.test_client()
            store = container.approval_store()
            now = int(time.time())
            for i in range(count):
                await store.create(ApprovalRequest(
                    request_id=f"req_{i:032x}", session_id=f"ses_{i:032x}", run_id=f"run_{i:032x}",
                    action_type="git_commit", tool_name="git_commit", message="Aura wants to run git_commit.",
                    context={"repo_path": "repo", "message": "m"}, user_id=f"cost-u{i}", tenant_id=S.TENANT,
                    created_at=now, expires_at=now + 3600))

            async def aura_post(i: int) -> None:
                response = await aura_client.post(f"/aura/hitl/approve/req_{i:032x}",
                                                  headers={"Authorization": f"Bearer {tokens[i]}",
                                                           "Content-Type": "application/json", "Content-Length": "0"})
                assert response.status_code == 200, response.status_code

            async def floor_post(i: int) -> None:
                response = await floor_client.post(f"/approve/w{i}")
                assert response.status_code == 200, response.status_code

            for call in (aura_post, floor_post):
                for i in range(200):
                    await call(i)
            await _timed("aura approve POST", aura_post, n, 200)
            await _timed("bare Quart POST", floor_post, n, 200)
            if profile:
                from pyinstrument import Profiler

                profiler = Profiler(interval=0.0001, async_mode="disabled")
                profiler.start()
                for i in range(n):
                    await aura_post(200 + n + i)
                profiler.stop()
                print(profiler.output_text(unicode=True, color=False))
    finally:
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    asyncio.run(_main(args.n, args.profile))


if __name__ == "__main__":
    main()
