"""The console at /aura/console: its routes in process, then the page in a real Chromium against
the real service (hypercorn), and aura-client.js on its own inside the browser."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jose import jwt
from playwright.sync_api import BrowserContext, Locator, Page, expect
from quart import Quart

from adapters.http.routes.console import ASSETS, CONSOLE_DIR, CONTENT_SECURITY_POLICY, ConsoleConfig
from tests.aura_process import AuraProcess
from tests.browser.conftest import PageProblems, chromium, start_service
from tests.support import bearer, git, make_repo, token

pytestmark = pytest.mark.e2e

COMMIT = '@git_commit {"repo_path": "repo", "message": "Add feature"}'
OFF = ConsoleConfig(dev_mode=False, mint_dev_token=None)


def minting(user: str, tenant: str, role: str | None) -> str:
    return token(user, tenant, role=role)


DEV = ConsoleConfig(dev_mode=True, mint_dev_token=minting)


# ---- routes, in process ----------------------------------------------------------------------

async def test_the_page_and_its_assets_are_served_without_a_token_under_a_strict_csp(
        console_app: Callable[[ConsoleConfig], Quart]) -> None:
    client = console_app(OFF).test_client()
    for path, name in [("/aura/console", "index.html")] + [(f"/aura/console/{n}", n) for n in ASSETS]:
        response = await client.get(path)
        assert response.status_code == 200, path
        assert response.headers["Content-Type"] == ASSETS[name]
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert await response.get_data() == (CONSOLE_DIR / name).read_bytes()
    icon = await client.get("/aura/console/favicon.svg")
    assert (icon.status_code, icon.headers["Content-Type"]) == (200, "image/svg+xml")
    assert (await icon.get_data(as_text=True)).startswith('<svg xmlns="http://www.w3.org/2000/svg"')
    assert CONTENT_SECURITY_POLICY == (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def test_the_page_has_no_inline_script_style_or_handler() -> None:
    html = (CONSOLE_DIR / "index.html").read_text()
    assert html.count("<script") == 1 and '<script type="module" src="console/console.js"></script>' in html
    assert "<style" not in html and " style=" not in html and " on" + "click=" not in html


async def test_unknown_files_are_404_problems_and_nothing_outside_the_console_is_reachable(
        console_app: Callable[[ConsoleConfig], Quart]) -> None:
    client = console_app(OFF).test_client()
    for path in ["/aura/console/missing.js", "/aura/console/..%2Froutes%2Fconsole.py", "/aura/console/__init__.py"]:
        response = await client.get(path)
        assert response.status_code == 404, path
        assert response.headers["Content-Type"] == "application/problem+json"
        assert (await response.get_json())["code"] == "not_found"


async def test_a_trailing_slash_redirects_relatively_so_it_works_behind_the_gateway(
        console_app: Callable[[ConsoleConfig], Quart]) -> None:
    response = await console_app(OFF).test_client().get("/aura/console/")
    assert response.status_code == 308
    assert response.headers["Location"] == "../console"


async def test_outside_dev_mode_the_page_offers_no_dev_token_and_none_is_minted(
        console_app: Callable[[ConsoleConfig], Quart]) -> None:
    client = console_app(OFF).test_client()
    assert await (await client.get("/aura/console/config")).get_json() == {"devMode": False}
    response = await client.post("/aura/console/dev-token", json={})
    assert response.status_code == 404
    body = await response.get_json()
    assert (body["code"], body["detail"]) == ("not_found", "Dev tokens are only minted when Aura runs in dev mode.")


async def test_dev_mode_without_a_minter_mints_nothing(console_app: Callable[[ConsoleConfig], Quart]) -> None:
    client = console_app(ConsoleConfig(dev_mode=True, mint_dev_token=None)).test_client()
    assert await (await client.get("/aura/console/config")).get_json() == {"devMode": False}
    assert (await client.post("/aura/console/dev-token")).status_code == 404


async def test_dev_mode_mints_a_token_the_service_accepts(console_app: Callable[[ConsoleConfig], Quart]) -> None:
    client = console_app(DEV).test_client()
    assert await (await client.get("/aura/console/config")).get_json() == {"devMode": True}
    response = await client.post("/aura/console/dev-token")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    minted = await response.get_json()
    assert {k: v for k, v in minted.items() if k != "token"} == {
        "tokenType": "Bearer", "user": "dev-user", "tenant": "dev-tenant", "role": None}
    claims = jwt.get_unverified_claims(minted["token"])
    assert (claims["sub"], claims["tenant_id"], "role" in claims) == ("dev-user", "dev-tenant", False)
    pending = await client.get("/aura/hitl/requests", headers={"Authorization": f"Bearer {minted['token']}"})
    assert pending.status_code == 200 and await pending.get_json() == {"requests": []}


async def test_dev_tokens_for_another_user_and_bad_names(console_app: Callable[[ConsoleConfig], Quart]) -> None:
    client = console_app(DEV).test_client()
    minted = await (await client.post("/aura/console/dev-token",
                                      json={"user": "bob", "tenant": "t2", "role": None})).get_json()
    claims = jwt.get_unverified_claims(minted["token"])
    assert (claims["sub"], claims["tenant_id"], "role" in claims) == ("bob", "t2", False)
    refused = await client.post("/aura/console/dev-token", json={"user": "bob smith"})
    assert refused.status_code == 422
    assert (await refused.get_json())["code"] == "validation_error"


def test_the_frontend_guide_shows_the_sse_parser_of_aura_client_verbatim() -> None:
    client = (CONSOLE_DIR / "aura-client.js").read_text()
    guide = (Path(__file__).resolve().parents[2] / "docs" / "frontend.md").read_text()
    parser = re.search(r"^export class SseParser \{.*?^\}\n", client, re.S | re.M)
    assert parser is not None
    assert f"```js\n{parser.group(0)}```" in guide


# ---- the page in Chromium against the real service -------------------------------------------

def stage(workspace: Path, name: str) -> None:
    repo = workspace / "repo"
    (repo / name).write_text(f"{name}\n")
    git(repo, "add", name)


def region(page: Page, name: str) -> Locator:
    return page.get_by_role("region", name=name, exact=True)


def open_console(page: Page, aura: AuraProcess) -> None:
    page.goto(f"{aura.url}/aura/console")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")


def start_run(page: Page, prompt: str, bearer_token: str | None = None) -> None:
    if bearer_token is not None:
        page.get_by_label("Bearer token (JWT)").fill(bearer_token)
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_role("button", name="Run", exact=True).click()


def test_approve_then_reject_a_commit_in_the_console(start_aura: Callable[..., AuraProcess], workspace: Path,
                                                     page: Page, artifacts: Path) -> None:
    aura = start_aura()
    stage(workspace, "feature.txt")
    open_console(page, aura)
    expect(page.get_by_role("button", name="Mint dev token")).to_be_hidden()
    start_run(page, COMMIT, token())

    # the run waits for a human: the plan, the timeline and the approval card say so
    approval = region(page, "Approval needed")
    expect(approval).to_be_visible()
    expect(page.locator("#approval-message")).to_have_text(
        'Aura wants to run git_commit with {"repo_path": "repo", "message": "Add feature"}.')
    expect(page.locator("#approval-action")).to_have_text("git_commit")
    assert json.loads(page.locator("#approval-args").inner_text()) == {"repo_path": "repo", "message": "Add feature"}
    plan = region(page, "Plan").locator("li")
    expect(plan).to_have_count(1)
    expect(plan.locator(".step-title")).to_have_text("1. Run git_commit")
    expect(plan.locator(".badge")).to_have_text("waiting_approval")
    timeline = region(page, "Timeline").locator("li")
    expect(timeline.locator(".step-title")).to_have_text(
        ["Analyse the request", "Plan the work", "Run git_commit", "Approval: git_commit"])
    expect(timeline.locator(".badge")).to_have_text(["completed", "completed", "in_progress", "waiting_approval"])
    tool = region(page, "Tool executions").locator("li")
    expect(tool.locator(".badge")).to_have_text("pending")
    expect(page.locator("#run-status")).to_have_text("running")

    approval.get_by_role("button", name="Approve").click()

    expect(page.locator("#run-status")).to_have_text("completed")
    expect(page.locator("#approval-decision")).to_have_text("Approved by alice.")
    expect(tool.locator(".tool-name")).to_have_text("git_commit")
    expect(tool.locator(".badge")).to_have_text("success")
    commit = git(workspace / "repo", "rev-parse", "--short", "HEAD")
    summary = f"Committed {commit}: Add feature"
    assert json.loads(tool.locator(".tool-outcome pre").inner_text()) == {
        "commit": git(workspace / "repo", "rev-parse", "HEAD"), "summary": summary}
    # the offline model's wording around the tool's summary is its own business; the line is exact
    assert f"- git_commit: {summary}" in page.locator("#answer").inner_text().splitlines()
    expect(plan.locator(".badge")).to_have_text("completed")
    expect(page.locator("#plan-progress-label")).to_have_text("1 of 1 steps finished")
    expect(timeline.locator(".badge")).to_have_text(["completed"] * 5)
    expect(page.locator("#run-message")).to_have_text("The run completed.")
    expect(page.locator("#errors-empty")).to_be_visible()
    assert git(workspace / "repo", "log", "-1", "--format=%s") == "Add feature"
    page.screenshot(path=str(artifacts / "console.png"), full_page=True)

    # a second run, rejected with a reason: the tool never runs
    stage(workspace, "second.txt")
    start_run(page, COMMIT)
    expect(approval.get_by_role("button", name="Approve")).to_be_enabled()
    approval.get_by_label("Reason for rejecting (optional)").fill("not now")
    approval.get_by_role("button", name="Reject").click()

    expect(page.locator("#run-status")).to_have_text("completed")
    expect(page.locator("#approval-decision")).to_have_text("Rejected by alice: not now.")
    expect(tool.locator(".badge")).to_have_text("rejected")
    expect(tool.locator(".tool-outcome dt")).to_have_text("Error")
    expect(tool.locator(".tool-outcome pre")).to_have_text("Rejected: not now")
    expect(plan.locator(".badge")).to_have_text("skipped")
    expect(approval.get_by_role("button", name="Approve")).to_be_disabled()
    assert git(workspace / "repo", "log", "-1", "--format=%s") == "Add feature"  # nothing new committed
    assert git(workspace / "repo", "diff", "--cached", "--name-only") == "second.txt"
    page.screenshot(path=str(artifacts / "console-rejected.png"), full_page=True)


def test_dev_mode_mints_a_token_and_the_answer_streams_chunk_by_chunk(
        start_aura: Callable[..., AuraProcess], page: Page) -> None:
    aura = start_aura(env={"AURA_AUTH__DEV_MODE": "true"})
    open_console(page, aura)
    page.get_by_role("button", name="Mint dev token").click()
    expect(page.locator("#token-hint")).to_have_text("Dev token for dev-user in tenant dev-tenant (no role).")
    claims = jwt.get_unverified_claims(page.get_by_label("Bearer token (JWT)").input_value())
    assert (claims["sub"], claims["tenant_id"], "role" in claims) == ("dev-user", "dev-tenant", False)

    # every text node the answer receives, in order: the chunks, then the whole answer
    page.evaluate("""() => {
        window.answerPieces = [];
        new MutationObserver((records) => {
            for (const record of records) {
                for (const node of record.addedNodes) window.answerPieces.push(node.textContent);
            }
        }).observe(document.getElementById("answer"), { childList: true });
    }""")
    text = "Aura streams this answer in forty small pieces, one event each."
    start_run(page, "@answer " + json.dumps({"text": text, "chunks": 40}))

    expect(page.locator("#run-status")).to_have_text("completed")
    expect(page.locator("#answer")).to_have_text(text)
    pieces: list[str] = page.evaluate("window.answerPieces")
    assert len(pieces) == 41 and "".join(pieces[:40]) == text and pieces[40] == text
    expect(region(page, "Tool executions").locator("li")).to_have_count(0)


def test_a_streamed_thought_grows_in_one_item_and_ends_as_its_final_text(
        start_aura: Callable[..., AuraProcess], page: Page) -> None:
    aura = start_aura(env={"AURA_AUTH__DEV_MODE": "true"})
    open_console(page, aura)
    page.get_by_role("button", name="Mint dev token").click()
    # the offline model plans two steps for this; the plan's descriptions stream as pieces
    start_run(page, "Show me the recent history of this repository")
    expect(page.locator("#run-status")).to_have_text("completed")
    planning = page.locator("#thoughts li", has=page.locator(".thought-type", has_text="planning"))
    expect(planning).to_have_count(1)
    expect(planning.locator(".thought-text")).to_have_text(
        "Planned 3 step(s): 1. Read the request and the page context; 2. Read the recent commit history; "
        "3. Summarise the findings for the user")
    expect(page.locator("#thoughts li.thought-growing")).to_have_count(0)


def test_http_errors_show_the_problem_code(start_aura: Callable[..., AuraProcess], page: Page,
                                           page_problems: PageProblems) -> None:
    page_problems.allow(r"^error: Failed to load resource: the server responded with a status of 401 ")
    aura = start_aura()
    open_console(page, aura)
    start_run(page, "hello")
    errors = region(page, "Errors").locator("li")
    expect(errors).to_have_count(1)
    expect(errors).to_contain_text("HTTP 401 missing_token: An Authorization: Bearer <token> header is required.")
    expect(page.locator("#run-status")).to_have_text("not started")
    expect(page.get_by_role("button", name="Run", exact=True)).to_be_enabled()

    page.get_by_label("Page context (JSON object)").fill("[1, 2]")
    start_run(page, "hello", token())
    expect(page.locator("#context-error")).to_have_text(
        'The context must be a JSON object, e.g. {"path": "/items/42"}.')
    expect(page.get_by_label("Page context (JSON object)")).to_be_focused()


def test_the_console_is_usable_with_the_keyboard(start_aura: Callable[..., AuraProcess], workspace: Path,
                                                 page: Page) -> None:
    aura = start_aura()
    stage(workspace, "keyboard.txt")
    open_console(page, aura)
    page.get_by_label("Bearer token (JWT)").fill(token())
    page.get_by_label("Prompt", exact=True).fill(COMMIT)
    page.get_by_role("button", name="Run", exact=True).focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("button", name="Stop")).to_be_focused()
    approve = region(page, "Approval needed").get_by_role("button", name="Approve")
    expect(approve).to_be_enabled()
    # from Stop, the next stops are the arguments, the reason and then Approve
    for _ in range(3):
        page.keyboard.press("Tab")
    expect(approve).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#run-status")).to_have_text("completed")
    expect(page.locator("#approval-decision")).to_have_text("Approved by alice.")


def test_the_console_resumes_when_aura_ends_each_connection(start_aura: Callable[..., AuraProcess],
                                                            workspace: Path, page: Page) -> None:
    """Aura ends every connection after 0.5 s with a `retry:` hint; the console resumes from
    resumeUrl with Last-Event-ID while the run waits, and shows every event exactly once."""
    aura = start_aura(env={"AURA_STREAM__MAX_STREAM_SECONDS": "0.5", "AURA_STREAM__RECONNECT_HINT_MS": "50"})
    stage(workspace, "resumed.txt")
    open_console(page, aura)
    start_run(page, COMMIT, token())
    approve = region(page, "Approval needed").get_by_role("button", name="Approve")
    expect(approve).to_be_enabled()
    expect(page.locator("#connection")).to_have_text("resumed")
    approve.click()
    expect(page.locator("#run-status")).to_have_text("completed")
    last_seq = page.locator("#last-seq").inner_text()
    expect(page.locator("#event-count")).to_have_text(last_seq)  # no event twice, none missing
    expect(region(page, "Tool executions").locator(".badge")).to_have_text("success")
    expect(region(page, "Approval needed").locator("#approval-decision")).to_have_text("Approved by alice.")
    assert git(workspace / "repo", "log", "-1", "--format=%s") == "Add feature"


def test_stop_cancels_a_waiting_run(start_aura: Callable[..., AuraProcess], workspace: Path, page: Page) -> None:
    aura = start_aura()
    stage(workspace, "stopped.txt")
    open_console(page, aura)
    start_run(page, COMMIT, token())
    approval = region(page, "Approval needed")
    expect(approval.get_by_role("button", name="Approve")).to_be_enabled()
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#run-status")).to_have_text("cancelled")
    expect(approval.get_by_role("button", name="Approve")).to_be_disabled()
    expect(page.get_by_role("button", name="Run", exact=True)).to_be_focused()
    request_id = page.locator("#approval-request").inner_text()
    record = httpx.get(f"{aura.url}/aura/hitl/requests/{request_id}", headers=bearer()).json()
    assert record["status"] == "cancelled"
    assert git(workspace / "repo", "log", "-1", "--format=%s") == "Initial commit"


# ---- aura-client.js on its own, in the browser ---------------------------------------------------

@pytest.fixture(scope="module")
def client_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    """The console page of one service, for evaluating aura-client.js with fake fetches."""
    root = tmp_path_factory.mktemp("client")
    make_repo(root / "workspace" / "repo")
    aura = start_service(root / "workspace", root, "aura")
    try:
        with chromium(root / "chromium-profile") as context:
            yield open_client_page(context, aura)
    finally:
        aura.stop()


def open_client_page(context: BrowserContext, aura: AuraProcess) -> Page:
    page = context.pages[0] if context.pages else context.new_page()
    open_console(page, aura)
    return page


def in_browser(page: Page, body: str) -> Any:
    """Run `body` (an async function body with `client` = the aura-client.js module) in the page."""
    return page.evaluate(f"""async () => {{
        const client = await import(new URL("console/aura-client.js", location.href).href);
        const encoder = new TextEncoder();
        const frame = (seq, type, data) =>
            `id: run_1:${{seq}}\\nevent: ${{type}}\\n` +
            `data: ${{JSON.stringify({{type, seq, runId: "run_1", data}})}}\\n\\n`;
        // a response body that hands out one part per read, then closes, errors, hangs, or errors
        // once the given promise settles (streams drop data queued before an error, so a test
        // that needs every part read first errors only when its client has seen them)
        const body = (parts, end = "close") => {{
            let next = 0;
            const fail = (controller) => controller.error(new TypeError("network error"));
            return new ReadableStream({{ pull(controller) {{
                if (next < parts.length) controller.enqueue(encoder.encode(parts[next++]));
                else if (end === "error") fail(controller);
                else if (end === "close") controller.close();
                else if (end === "hang") return new Promise(() => {{}});
                else return end.then(() => fail(controller));
            }} }});
        }};
        const sse = (parts, end) =>
            new Response(body(parts, end), {{ headers: {{ "Content-Type": "text/event-stream" }} }});
        {body}
    }}""")


def test_the_sse_parser_follows_the_spec(client_page: Page) -> None:
    pushes = in_browser(client_page, """
        const parser = new client.SseParser();
        const chunks = ["\\ufeffid: 1\\r\\nevent: plan_step\\r", "\\ndata: line one\\r\\ndata:line two\\r\\n\\r\\n",
                        ": ping\\n\\n", "data: x\\rid: 2\\r\\r", "retry: 1500\\nunknown: field\\ndata\\n\\n",
                        "data: {\\"a\\": 1", "}\\n", "\\n", ": bye\\nretry: 250\\n\\n", "data: never finished"];
        return chunks.map((chunk) => ({frames: parser.push(chunk), retry: parser.reconnectionTimeMs}));
    """)
    message = {"id": None, "event": "message", "comment": None}
    assert pushes == [
        {"frames": [], "retry": None},
        {"frames": [{"id": "1", "event": "plan_step", "data": "line one\nline two", "comment": None}], "retry": None},
        {"frames": [{"id": None, "event": "", "data": "", "comment": "ping"}], "retry": None},
        {"frames": [{**message, "id": "2", "data": "x"}], "retry": None},
        {"frames": [{**message, "data": ""}], "retry": 1500},
        {"frames": [], "retry": 1500},
        {"frames": [], "retry": 1500},
        {"frames": [{**message, "data": '{"a": 1}'}], "retry": 1500},
        # Aura ends a connection it wants resumed with a comment and a bare `retry:` (no event)
        {"frames": [{"id": None, "event": "", "data": "", "comment": "bye"}], "retry": 250},
        {"frames": [], "retry": 250},
    ]


def test_a_dropped_stream_resumes_with_last_event_id_and_delivers_each_event_once(client_page: Page) -> None:
    result = in_browser(client_page, """
        const calls = [];
        let sawSeq3;
        const seq3Seen = new Promise((resolve) => { sawSeq3 = resolve; });
        const answers = [
            () => sse([frame(1, "start", {message: "m", resumeUrl: "/aura/runs/run_1/events"}),
                       frame(2, "content", {content: "a", chunk: true}), ": ping\\n\\n",
                       frame(3, "content", {content: "b", chunk: true})], seq3Seen),
            () => { throw new TypeError("offline"); },
            () => new Response("{}", {status: 503, headers: {"Content-Type": "application/problem+json"}}),
            () => sse([frame(2, "content", {content: "a", chunk: true}),
                       frame(3, "content", {content: "b", chunk: true}),
                       frame(4, "end", {status: "completed"}), "data: [DONE]\\n\\n", frame(5, "thought", {})]),
        ];
        const fetch = async (url, init) => {
            calls.push({url: String(url), method: init.method, headers: init.headers, body: init.body ?? null});
            return answers[calls.length - 1]();
        };
        const aura = new client.AuraClient({baseUrl: "/api/aura/", token: () => "tok", fetch, reconnectDelayMs: 1});
        const seqs = [], reconnects = [];
        let heartbeats = 0, resumed = 0;
        const outcome = await aura.streamRun({prompt: "p", onDisconnect: "continue"}, {
            idempotencyKey: "key-1",
            onEvent: (e) => { seqs.push(e.seq); if (e.seq === 3) sawSeq3(); }, onHeartbeat: () => heartbeats++,
            onReconnect: (r) => reconnects.push(r), onResumed: () => resumed++});
        return {outcome, seqs, reconnects, heartbeats, resumed, calls, origin: location.origin};
    """)
    origin = result["origin"]
    assert result["outcome"] == {"runId": "run_1", "status": "completed", "lastSeq": 4}
    assert result["seqs"] == [1, 2, 3, 4]
    assert (result["heartbeats"], result["resumed"]) == (1, 1)
    assert result["reconnects"] == [{"attempt": 1, "lastSeq": 3, "delayMs": 1},
                                    {"attempt": 2, "lastSeq": 3, "delayMs": 2},
                                    {"attempt": 3, "lastSeq": 3, "delayMs": 4}]
    resume = {"url": f"{origin}/api/aura/runs/run_1/events", "method": "GET", "body": None,
              "headers": {"Accept": "text/event-stream", "Last-Event-ID": "run_1:3", "Authorization": "Bearer tok"}}
    assert result["calls"] == [
        {"url": f"{origin}/api/aura/test/stream", "method": "POST",
         "body": '{"prompt":"p","onDisconnect":"continue"}',
         "headers": {"Accept": "text/event-stream", "Content-Type": "application/json", "Idempotency-Key": "key-1",
                     "Authorization": "Bearer tok"}},
        resume, resume, resume,
    ]


def test_a_drop_before_start_sends_the_post_again_with_the_same_idempotency_key(client_page: Page) -> None:
    result = in_browser(client_page, """
        const posts = [];
        const answers = [
            () => { throw new TypeError("the answer was lost"); },
            () => sse([": ping\\n\\n"], "error"),
            () => sse([frame(1, "start", {message: "m", resumeUrl: "/aura/runs/run_1/events"}),
                       frame(2, "end", {status: "completed"}), "data: [DONE]\\n\\n"]),
        ];
        const fetch = async (url, init) => {
            posts.push({method: init.method, path: new URL(url).pathname, key: init.headers["Idempotency-Key"],
                        lastEventId: init.headers["Last-Event-ID"] ?? null});
            return answers[posts.length - 1]();
        };
        const seqs = [];
        const outcome = await new client.AuraClient({token: "t", fetch, reconnectDelayMs: 1})
            .streamRun({prompt: "p"}, {onEvent: (e) => seqs.push(e.seq)});
        return {outcome, seqs, posts};
    """)
    assert result["outcome"] == {"runId": "run_1", "status": "completed", "lastSeq": 2}
    assert result["seqs"] == [1, 2]
    posts = result["posts"]
    assert [(p["method"], p["path"], p["lastEventId"]) for p in posts] == [("POST", "/aura/test/stream", None)] * 3
    key = posts[0]["key"]
    assert re.fullmatch(r"[0-9a-f]{32}", key) and [p["key"] for p in posts] == [key] * 3


def test_notices_without_an_id_are_delivered_and_never_move_last_event_id(client_page: Page) -> None:
    result = in_browser(client_page, """
        const notice = (type, data) =>
            `event: ${type}\\ndata: ${JSON.stringify({type, seq: 0, runId: "run_1", data})}\\n\\n`;
        const lastEventIds = [];
        const answers = [
            () => sse([frame(1, "start", {message: "m", resumeUrl: "/aura/runs/run_1/events"}),
                       frame(2, "thought", {content: "t"})], "close"),
            () => sse([notice("error", {errorType: "events_lost", message: "gone", retryable: false}),
                       notice("snapshot", {status: "running", lastSeq: 9}), frame(10, "thought", {content: "u"})],
                      "close"),
            () => sse([frame(10, "thought", {content: "u"}), frame(11, "end", {status: "completed"}),
                       "data: [DONE]\\n\\n"]),
        ];
        const fetch = async (url, init) => {
            lastEventIds.push(init.headers["Last-Event-ID"] ?? null);
            return answers[lastEventIds.length - 1]();
        };
        const delivered = [];
        const outcome = await new client.AuraClient({token: "t", fetch, reconnectDelayMs: 1})
            .streamRun({prompt: "p"}, {onEvent: (e) => delivered.push([e.type, e.seq])});
        return {outcome, delivered, lastEventIds};
    """)
    assert result == {
        "outcome": {"runId": "run_1", "status": "completed", "lastSeq": 11},
        "delivered": [["start", 1], ["thought", 2], ["error", 0], ["snapshot", 0], ["thought", 10], ["end", 11]],
        "lastEventIds": [None, "run_1:2", "run_1:10"],
    }


def test_a_silent_connection_counts_as_dropped(client_page: Page) -> None:
    result = in_browser(client_page, """
        const lastEventIds = [];
        const answers = [
            () => sse([frame(1, "start", {message: "m", resumeUrl: "/aura/runs/run_1/events"})], "hang"),
            () => sse([frame(2, "end", {status: "timeout"}), "data: [DONE]\\n\\n"]),
        ];
        const fetch = async (url, init) => {
            lastEventIds.push(init.headers["Last-Event-ID"] ?? null);
            return answers[lastEventIds.length - 1]();
        };
        const aura = new client.AuraClient({token: "t", fetch, idleTimeoutMs: 50, reconnectDelayMs: 1});
        const outcome = await aura.streamRun({prompt: "p"});
        return {outcome, lastEventIds};
    """)
    assert result == {"outcome": {"runId": "run_1", "status": "timeout", "lastSeq": 2},
                      "lastEventIds": [None, "run_1:1"]}


def test_failures_become_problems_or_stream_errors(client_page: Page) -> None:
    result = in_browser(client_page, """
        const problem = {type: "https://dwp.example/problems/token_expired", title: "Unauthorized", status: 401,
                         detail: "The token has expired.", code: "token_expired", traceId: "t1"};
        const refuse = async () => new Response(JSON.stringify(problem), {status: 401,
            headers: {"Content-Type": "application/problem+json", "WWW-Authenticate": "Bearer"}});
        const describe = (error) => ({name: error.name, message: error.message, status: error.status ?? null,
                                      code: error instanceof client.AuraProblem ? error.code : null,
                                      traceId: error.traceId ?? null, lastSeq: error.lastSeq ?? null});
        const start = frame(1, "start", {message: "m", resumeUrl: "/aura/runs/run_1/events"});
        const outcomes = [];
        for (const attempt of [
            () => new client.AuraClient({token: "t", fetch: refuse}).streamRun({prompt: "p"}),
            () => new client.AuraClient({token: "t", fetch: refuse}).approve("req_1"),
            // a gateway's HTML error page still becomes a problem with its status
            () => new client.AuraClient({token: "t", fetch: async () => new Response("<h1>Bad gateway</h1>",
                {status: 502, statusText: "Bad Gateway", headers: {"Content-Type": "text/html"}})})
                .streamRun({prompt: "p"}),
            // the resume endpoint says the run is gone
            () => {
                let call = 0;
                const fetch = async () => call++ === 0 ? sse([start], "close")
                    : new Response(JSON.stringify({status: 404, code: "run_not_found", detail: "No such run."}),
                                   {status: 404, headers: {"Content-Type": "application/problem+json"}});
                return new client.AuraClient({token: "t", fetch, reconnectDelayMs: 1}).streamRun({prompt: "p"});
            },
            // offline for good after the start: give up after maxReconnects
            () => {
                let call = 0;
                const fetch = async () => { if (call++ === 0) return sse([start], "close"); throw new TypeError("x"); };
                return new client.AuraClient({token: "t", fetch, reconnectDelayMs: 1, maxReconnects: 2})
                    .streamRun({prompt: "p"});
            },
            // the caller stops reading
            () => {
                const stop = new AbortController();
                const fetch = async () => sse([start], "hang");
                return new client.AuraClient({token: "t", fetch}).streamRun({prompt: "p"},
                    {signal: stop.signal, onEvent: () => stop.abort()});
            },
        ]) {
            try { outcomes.push({resolved: await attempt()}); } catch (error) { outcomes.push(describe(error)); }
        }
        return outcomes;
    """)
    expired = {"name": "AuraProblem", "message": "The token has expired.", "status": 401, "code": "token_expired",
               "traceId": "t1", "lastSeq": None}
    assert result == [
        expired,
        expired,
        {"name": "AuraProblem", "message": "Bad Gateway", "status": 502, "code": "http_502", "traceId": None,
         "lastSeq": None},
        {"name": "AuraProblem", "message": "No such run.", "status": 404, "code": "run_not_found", "traceId": None,
         "lastSeq": None},
        {"name": "AuraStreamError", "message": "The connection dropped and 2 reconnections failed.", "status": None,
         "code": None, "traceId": None, "lastSeq": 1},
        {"name": "AbortError", "message": "signal is aborted without reason", "status": None, "code": None,
         "traceId": None, "lastSeq": None},
    ]


def test_http_requests_need_no_bearer_for_the_page(start_aura: Callable[..., AuraProcess]) -> None:
    """The page is public, the API is not: the console relies on that split."""
    aura = start_aura()
    assert httpx.get(f"{aura.url}/aura/console").status_code == 200
    assert httpx.get(f"{aura.url}/aura/hitl/requests").status_code == 401
    assert httpx.get(f"{aura.url}/aura/hitl/requests", headers=bearer()).status_code == 200
