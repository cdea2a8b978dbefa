"""@microsoft/fetch-event-source, the library a DWP SPA reaches for, from npm, in Node, driving
real Aura instances on a real redis-server, with the integration docs/frontend.md gives
(tests/js/aura-sse.mjs, and the Angular-style service tests/js/aura-run.service.mjs): a full run,
an approval after heartbeats, TCP connections cut mid-run and mid-approval, a tab hidden and shown,
connections Aura ends itself, and two instances behind nginx. Every time: exactly one run,
consecutive ids, one `end`, `[DONE]`."""

from __future__ import annotations

import itertools
import json
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.aura_process import AuraProcess, free_port
from tests.e2e.test_cluster import COMMIT, stage
from tests.proxy.nginx_process import SHIPPED_SITE, NginxProcess, shipped_site
from tests.support import bearer, token

JS = Path(__file__).resolve().parents[1] / "js"
ANSWER = '@answer {"text": "' + " ".join(f"w{i}" for i in range(40)) + '", "chunks": 40, "intervalMs": 40}'


def node_binary() -> str:
    found = shutil.which("node")
    if found is None or not (JS / "node_modules" / "@microsoft" / "fetch-event-source").is_dir():
        pytest.fail("node and tests/js/node_modules are needed (./scripts/test runs `npm ci` in tests/js)",
                    pytrace=False)
    return found


class NodeClient:
    """tests/js/drive.mjs in a subprocess: its JSON lines as they come, its stdin for visibility."""

    def __init__(self, base_url: str, request: dict[str, Any], mode: str = "plain") -> None:
        config = {"baseUrl": base_url, "token": token(), "request": request, "mode": mode}
        self.process = subprocess.Popen([node_binary(), str(JS / "drive.mjs"), json.dumps(config)], cwd=JS,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(json.loads(line))

    def until(self, matches: Callable[[dict[str, Any]], bool], seconds: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"nothing matched in {seconds} s; seen: {self.seen}; "
                                     f"stderr: {self.stderr()}") from None
            self.seen.append(line)
            if "error" in line:
                raise AssertionError(f"the client failed: {line['error']}")
            if matches(line):
                return line

    def event(self, event_type: str, seconds: float = 20) -> dict[str, Any]:
        return self.until(lambda line: line.get("event") == event_type, seconds)

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def result(self, seconds: float = 30) -> dict[str, Any]:
        line = self.until(lambda line: "outcome" in line, seconds)
        self.process.wait(10)
        return line

    def stderr(self) -> str:
        if self.process.poll() is None:
            return "(running)"
        assert self.process.stderr is not None
        return self.process.stderr.read()

    @property
    def requests(self) -> list[dict[str, Any]]:
        return [line["request"] for line in self.seen if "request" in line]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class CuttableProxy:
    """A TCP proxy whose open connections can be cut (RST) at once, like a network drop."""

    def __init__(self, *upstream_ports: int) -> None:
        self.port = free_port()
        self._upstreams = itertools.cycle(upstream_ports)  # several: round robin, one per connection
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._open: list[socket.socket] = []
        self._lock = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", next(self._upstreams)))
            with self._lock:
                self._open += [client, upstream]
                self._lock.notify_all()
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        try:
            target.shutdown(socket.SHUT_WR)  # pass the end on (a cut closes both itself)
        except OSError:
            pass

    def cut(self, wait_seconds: float = 10) -> int:
        """Cut every open connection (waiting for the client's next one when none is open: a
        client between two attempts); how many were cut."""
        with self._lock:
            self._lock.wait_for(lambda: bool(self._open), wait_seconds)
            cut, self._open = self._open, []
        for connection in cut:
            # Linger 0: the close resets the connection (RST) instead of ending it; the shutdown
            # of the reading side first wakes the pipe thread blocked in recv, which would
            # otherwise keep the socket alive past the close.
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            try:
                connection.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            connection.close()
        return len(cut) // 2

    def close(self) -> None:
        self._listener.close()
        self.cut(wait_seconds=0)


@pytest.fixture
def clients() -> Iterator[Callable[..., NodeClient]]:
    started: list[NodeClient] = []

    def start(base_url: str, request: dict[str, Any], mode: str = "plain") -> NodeClient:
        started.append(NodeClient(base_url, request, mode))
        return started[-1]

    yield start
    for client in started:
        client.close()


def heartbeats_sent(url: str) -> int:
    match = re.search(r"^aura_heartbeats_sent_total (\S+)$", httpx.get(f"{url}/metrics").text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def approve(url: str, store: redis.Redis) -> None:
    (key,) = store.keys("hitl:request:*")
    request_id = key.decode().split(":", 2)[2]
    assert httpx.post(f"{url}/aura/hitl/approve/{request_id}", headers=bearer()).status_code == 200


def check_one_run(result: dict[str, Any], store: redis.Redis, status: str = "completed") -> list[dict[str, Any]]:
    """Exactly one run, consecutive seqs from 1, one `end` last, and the outcome after [DONE]."""
    events = result["events"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events].count("end") == 1 and events[-1]["type"] == "end"
    assert events[-1]["data"]["status"] == status
    assert len({e["runId"] for e in events}) == 1
    assert store.keys("aura:run:*:meta") == [f"aura:run:{{{events[0]['runId']}}}:meta".encode()]
    return events


@pytest.mark.parametrize("mode", ["plain", "service"])
def test_a_full_run_with_an_approval_after_heartbeats(
        cluster: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path, clean_redis: redis.Redis,
        clients: Callable[..., NodeClient], mode: str) -> None:
    a, _ = cluster(AURA_STREAM__HEARTBEAT_SECONDS="0.05")
    stage(e2e_workspace)
    client = clients(f"{a.url}/aura/", {"prompt": COMMIT}, mode)
    client.event("hitl")
    before = heartbeats_sent(a.url)
    while heartbeats_sent(a.url) < before + 5:  # five heartbeats reach the client while it waits
        time.sleep(0.02)
    approve(a.url, clean_redis)
    result = client.result()
    events = check_one_run(result, clean_redis)
    assert result["outcome"] == ({"completed": True} if mode == "service" else
                                 {"runId": events[0]["runId"], "status": "completed", "lastSeq": events[-1]["seq"]})
    assert client.requests == [{"method": "POST", "lastEventId": None}]  # no heartbeat was taken for an end


def test_tcp_cuts_mid_run_and_mid_approval_resume_the_same_run(
        cluster: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path, clean_redis: redis.Redis,
        clients: Callable[..., NodeClient]) -> None:
    a, _ = cluster()
    stage(e2e_workspace)
    proxy = CuttableProxy(a.port)
    try:
        client = clients(f"http://127.0.0.1:{proxy.port}/aura/", {"prompt": COMMIT})
        client.event("plan_step")
        assert proxy.cut() == 1  # mid-run
        client.event("hitl")
        assert proxy.cut() == 1  # mid-approval (the run waits for a human), on the resumed connection
        client.until(lambda line: "request" in line)  # the library is back
        approve(a.url, clean_redis)
        result = client.result()
    finally:
        proxy.close()
    events = check_one_run(result, clean_redis)
    retries = client.requests[1:]
    assert len(retries) >= 2 and all(r["method"] == "POST" for r in retries)
    assert all(re.fullmatch(rf"{events[0]['runId']}:\d+", r["lastEventId"] or "") for r in retries)


def test_a_tcp_cut_in_the_middle_of_a_streamed_answer(
        cluster: Callable[..., tuple[AuraProcess, AuraProcess]], clean_redis: redis.Redis,
        clients: Callable[..., NodeClient]) -> None:
    a, _ = cluster()
    proxy = CuttableProxy(a.port)
    try:
        client = clients(f"http://127.0.0.1:{proxy.port}/aura/", {"prompt": ANSWER})
        for _ in range(5):
            client.event("content")
        assert proxy.cut() == 1
        result = client.result()
    finally:
        proxy.close()
    events = check_one_run(result, clean_redis)
    assert "".join(e["data"]["content"] for e in events if e["type"] == "content" and e["data"]["chunk"]) == \
        " ".join(f"w{i}" for i in range(40))
    assert len(client.requests) == 2 and client.requests[1]["lastEventId"].startswith(events[0]["runId"] + ":")


def test_a_hidden_then_shown_tab_resumes_the_run_it_left(
        cluster: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path, clean_redis: redis.Redis,
        clients: Callable[..., NodeClient]) -> None:
    a, _ = cluster(AURA_STREAM__DISCONNECT_GRACE_SECONDS="30")  # onDisconnect: cancel, the default
    stage(e2e_workspace)
    client = clients(f"{a.url}/aura/", {"prompt": COMMIT})
    hitl = client.event("hitl")
    client.send("hide")  # the library closes the stream
    client.send("show")  # and sends the POST again, with its Last-Event-ID
    client.until(lambda line: "request" in line)
    approve(a.url, clean_redis)
    result = client.result()
    events = check_one_run(result, clean_redis)
    first, again = client.requests
    assert first == {"method": "POST", "lastEventId": None} and again["method"] == "POST"
    run_id, seq = again["lastEventId"].rsplit(":", 1)
    assert run_id == events[0]["runId"] and int(seq) >= hitl["seq"]


def test_connections_aura_ends_and_two_instances_behind_nginx(
        cluster: Callable[..., tuple[AuraProcess, AuraProcess]], e2e_workspace: Path, clean_redis: redis.Redis,
        clients: Callable[..., NodeClient], tmp_path: Path) -> None:
    a, b = cluster(AURA_STREAM__MAX_STREAM_SECONDS="0.4", AURA_STREAM__RECONNECT_HINT_MS="50",
                   AURA_STREAM__HEARTBEAT_SECONDS="0.1")
    site_port = free_port()
    proxy = NginxProcess(directory=tmp_path / "nginx", aura_port=a.port,
                         sites={SHIPPED_SITE.name: shipped_site(site_port, [a.port, b.port])}).start()
    try:
        stage(e2e_workspace)
        client = clients(f"http://127.0.0.1:{site_port}/api/aura/", {"prompt": COMMIT})
        client.event("hitl")
        while len(client.requests) < 4:  # Aura ends each connection after 0.4 s; round robin
            client.until(lambda line: "request" in line)
        approve(a.url, clean_redis)
        result = client.result()
        answer = clients(f"http://127.0.0.1:{site_port}/api/aura/", {"prompt": ANSWER}).result()
    finally:
        proxy.stop()
    events = result["events"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events].count("end") == 1 and events[-1]["data"]["status"] == "completed"
    assert len(client.requests) >= 4 and client.requests[0]["lastEventId"] is None
    assert all(r["lastEventId"].startswith(events[0]["runId"] + ":") for r in client.requests[1:])
    long_events = answer["events"]
    assert [e["seq"] for e in long_events] == list(range(1, len(long_events) + 1))
    assert long_events[-1]["data"]["status"] == "completed"
    assert len(clean_redis.keys("aura:run:*:meta")) == 2  # the approval run and the answer: no other


def test_the_frontend_guide_shows_the_integration_the_suite_runs_verbatim() -> None:
    guide = (Path(__file__).resolve().parents[2] / "docs" / "frontend.md").read_text()
    blocks = re.findall(r"^```js\n(.*?)^```$", guide, re.S | re.M)
    for name in ("aura-sse.mjs", "aura-run.service.mjs"):
        assert (JS / name).read_text() in blocks, f"docs/frontend.md does not show tests/js/{name} as it is"
