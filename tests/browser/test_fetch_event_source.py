"""The same fetch-event-source integration (tests/js/aura-sse.mjs, with the library from npm) in a
page driven by headless Chromium, against two real Aura instances on a real redis-server: the
browser's own fetch, CORS and streams. A full run with an approval after heartbeats, the TCP
connection cut mid-run and mid-approval, a hidden then shown tab, and connections Aura ends on a
round-robin proxy over both instances: exactly one run, consecutive ids, one `end`, `[DONE]`."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from playwright.sync_api import BrowserContext, Page

from tests.aura_process import AuraProcess, free_port
from tests.browser.conftest import chromium
from tests.e2e.test_fetch_event_source import JS, CuttableProxy, approve, check_one_run, heartbeats_sent, node_binary
from tests.redis_server import RedisServer
from tests.support import bearer, make_repo, token

FES = "/node_modules/@microsoft/fetch-event-source/lib/esm/"
PAGE = """<!doctype html><meta charset="utf-8"><title>fetch-event-source</title>
<script type="importmap">@IMPORTS@</script>
<script type="module">
  import { streamAuraRun } from "/aura-sse.mjs";
  window.state = { events: [], requests: [], outcome: null, error: null };
  window.hidden = false;
  Object.defineProperty(document, "hidden", { get: () => window.hidden });
  window.setHidden = (hidden) => { window.hidden = hidden; document.dispatchEvent(new Event("visibilitychange")); };
  window.startRun = (config) => {
    const observed = (url, init) => {
      state.requests.push({ method: init.method, lastEventId: init.headers["last-event-id"] ?? null });
      return fetch(url, init);
    };
    streamAuraRun({ baseUrl: config.baseUrl, token: () => config.token, request: config.request, fetch: observed,
                    onEvent: (envelope) => state.events.push(envelope) })
      .then((outcome) => { state.outcome = outcome; }, (error) => { state.error = String(error); });
  };
</script>""".replace("@IMPORTS@", json.dumps({"imports": {  # the library's own relative imports have no .js
    "@microsoft/fetch-event-source": f"{FES}index.js", f"{FES}fetch": f"{FES}fetch.js",
    f"{FES}parse": f"{FES}parse.js"}}))


RECORDED: dict[str, bytes] = {}  # path -> an event-stream body recorded from a real run


class SpaFiles(SimpleHTTPRequestHandler):
    """The SPA's origin, a real loopback server: the page, the integration and the library (and,
    for EventSource, which cannot send a bearer token, bodies recorded from real Aura runs)."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript", ".mjs": "text/javascript"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, directory=str(JS), **kwargs)

    def do_GET(self) -> None:
        if self.path == "/":
            body = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path in RECORDED:
            body = RECORDED[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def spa_origin() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), SpaFiles)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    node_binary()  # the library comes from tests/js/node_modules (npm ci)
    with chromium(tmp_path_factory.mktemp("profile")) as context:
        yield context


@pytest.fixture
def two(redis_server: RedisServer, tmp_path: Path,
        spa_origin: str) -> Iterator[Callable[..., tuple[AuraProcess, AuraProcess]]]:
    started: list[AuraProcess] = []
    workspace = tmp_path / "workspace"
    make_repo(workspace / "repo")

    def start(**env: str) -> tuple[AuraProcess, AuraProcess]:
        for name in ("aura-a", "aura-b"):
            started.append(AuraProcess(workspace=workspace, log_path=tmp_path / f"{name}.log",
                                       redis_url=redis_server.url,
                                       env={"AURA_RUNS__INSTANCE_ID": name, "AURA_SERVER__CORS_ORIGINS": spa_origin,
                                            **env}).start())
        return started[-2], started[-1]

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def spa(browser: BrowserContext, spa_origin: str) -> Iterator[Page]:
    page = browser.new_page()
    page.goto(f"{spa_origin}/")
    page.wait_for_function("() => typeof window.startRun === 'function'")
    yield page
    page.close()


def stage(workspace_repo: Path) -> None:
    from tests.support import git

    (workspace_repo / f"f{time.monotonic_ns()}.txt").write_text("x\n")
    git(workspace_repo, "add", ".")


COMMIT = '@git_commit {"repo_path": "repo", "message": "From the browser"}'
ANSWER = '@answer {"text": "' + " ".join(f"w{i}" for i in range(40)) + '", "chunks": 40, "intervalMs": 40}'


def start(page: Page, base_url: str, prompt: str) -> None:
    page.evaluate("config => window.startRun(config)",
                  {"baseUrl": base_url, "token": token(), "request": {"prompt": prompt}})


def wait(page: Page, condition: str, arg: Any = None) -> None:
    page.wait_for_function(f"(arg) => {condition}", arg=arg, timeout=20_000)


def result(page: Page) -> dict[str, Any]:
    wait(page, "state.outcome !== null || state.error !== null")
    state: dict[str, Any] = page.evaluate("() => state")
    assert state["error"] is None, state["error"]
    return state


def test_a_full_run_with_an_approval_after_heartbeats(two: Callable[..., tuple[AuraProcess, AuraProcess]],
                                                       clean_redis: redis.Redis, spa: Page) -> None:
    a, _ = two(AURA_STREAM__HEARTBEAT_SECONDS="0.05")
    stage(a.workspace / "repo")
    start(spa, f"{a.url}/aura/", COMMIT)
    wait(spa, "state.events.some(e => e.type === 'hitl')")
    before = heartbeats_sent(a.url)
    while heartbeats_sent(a.url) < before + 5:
        time.sleep(0.02)
    approve(a.url, clean_redis)
    state = result(spa)
    events = check_one_run(state, clean_redis)
    assert state["outcome"] == {"runId": events[0]["runId"], "status": "completed", "lastSeq": events[-1]["seq"]}
    assert state["requests"] == [{"method": "POST", "lastEventId": None}]


def test_tcp_cuts_and_a_hidden_tab_resume_the_same_run(two: Callable[..., tuple[AuraProcess, AuraProcess]],
                                                        clean_redis: redis.Redis, spa: Page) -> None:
    a, _ = two()
    stage(a.workspace / "repo")
    proxy = CuttableProxy(a.port)
    try:
        start(spa, f"http://127.0.0.1:{proxy.port}/aura/", COMMIT)
        wait(spa, "state.events.some(e => e.type === 'plan_step')")
        assert proxy.cut() == 1  # mid-run
        wait(spa, "state.events.some(e => e.type === 'hitl') && state.requests.length >= 2")
        assert proxy.cut() == 1  # mid-approval (on the resumed connection)
        wait(spa, "state.requests.length >= 3")
        spa.evaluate("() => setHidden(true)")
        spa.evaluate("() => setHidden(false)")
        wait(spa, "state.requests.length >= 4")
        approve(a.url, clean_redis)
        state = result(spa)
    finally:
        proxy.close()
    events = check_one_run(state, clean_redis)
    assert state["requests"][0] == {"method": "POST", "lastEventId": None}
    assert all(re.fullmatch(rf"{events[0]['runId']}:\d+", r["lastEventId"] or "") for r in state["requests"][1:])


def test_a_tcp_cut_mid_answer_and_connections_aura_ends_over_both_instances(
        two: Callable[..., tuple[AuraProcess, AuraProcess]], clean_redis: redis.Redis, spa: Page) -> None:
    a, b = two(AURA_STREAM__MAX_STREAM_SECONDS="0.4", AURA_STREAM__RECONNECT_HINT_MS="50",
               AURA_STREAM__HEARTBEAT_SECONDS="0.1")
    proxy = CuttableProxy(a.port, b.port)  # round robin: each connection to the other instance
    try:
        start(spa, f"http://127.0.0.1:{proxy.port}/aura/", ANSWER)
        wait(spa, "state.events.filter(e => e.type === 'content').length >= 5")
        proxy.cut()
        state = result(spa)
    finally:
        proxy.close()
    events = check_one_run(state, clean_redis)
    assert "".join(e["data"]["content"] for e in events if e["type"] == "content" and e["data"]["chunk"]) == \
        " ".join(f"w{i}" for i in range(40))
    assert len(state["requests"]) >= 3  # the cut, and connections Aura ended
    assert [r["lastEventId"] is None for r in state["requests"]] == [True] + [False] * (len(state["requests"]) - 1)


def test_the_browsers_own_eventsource_never_sees_a_heartbeat(
        two: Callable[..., tuple[AuraProcess, AuraProcess]], clean_redis: redis.Redis, spa: Page) -> None:
    """EventSource cannot send a bearer token, so it reads the exact bytes of a real run (with
    heartbeats every 50 ms during its approval wait), recorded with httpx and served as they came."""
    a, _ = two(AURA_STREAM__HEARTBEAT_SECONDS="0.05")
    stage(a.workspace / "repo")
    body = b""
    approved = False
    with httpx.stream("POST", f"{a.url}/aura/test/stream", json={"prompt": COMMIT}, headers=bearer(),
                      timeout=10) as response:
        for chunk in response.iter_bytes():
            body += chunk
            if not approved and b"event: hitl" in body and body.count(b": ping\n") >= 5:
                approved = True
                approve(a.url, clean_redis)
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b": ping\n") >= 5
    RECORDED["/recorded"] = body
    types = sorted({m.group(1).decode() for m in re.finditer(rb"^event: (\w+)$", body, re.M)})
    seen = spa.evaluate("""types => new Promise((resolve) => {
        const seen = [];
        const source = new EventSource("/recorded");
        const take = (message) => {
            seen.push({type: message.type, data: message.data, id: message.lastEventId});
            if (message.data === "[DONE]") { source.close(); resolve(seen); }
        };
        source.onmessage = take;
        for (const type of types) source.addEventListener(type, take);
    })""", types)
    assert seen[-1] == {"type": "message", "data": "[DONE]", "id": seen[-2]["id"]}
    envelopes = [json.loads(message["data"]) for message in seen[:-1]]  # no empty message among them
    assert [m["type"] for m in seen[:-1]] == [e["type"] for e in envelopes]
    assert [m["id"] for m in seen[:-1]] == [f"{e['runId']}:{e['seq']}" for e in envelopes]
    assert [e["seq"] for e in envelopes] == list(range(1, len(envelopes) + 1))
