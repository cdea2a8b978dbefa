"""The load the failover tests run (tests/e2e/test_sentinel.py, test_cluster_failover.py): runs on
two instances, each approved through the other instance, resumed with Last-Event-ID on either
when its connection ends before [DONE], every third one also followed from the other instance;
what the clients received and were answered, for the tests to hold against what Redis keeps."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.aura_process import AuraProcess
from tests.support import bearer

RUN_TIMEOUT_SECONDS = 30.0
RESUMES = 60  # with the reconnect delay, longer than a failover takes
LOAD_TIMEOUT_SECONDS = 120.0
# Notices (seq 0) the clients received, by run: how a run ended for its client when the log could not say.
NOTICES: dict[str, list[dict[str, Any]]] = {}


@dataclass
class Load:
    """What the clients saw: every event's bytes by (run, seq), every decision answered 200."""

    received: dict[tuple[str, int], bytes] = field(default_factory=dict)
    followed: dict[tuple[str, int], bytes] = field(default_factory=dict)  # read from the other instance
    approved: list[str] = field(default_factory=list)
    approval_answers: Counter[int] = field(default_factory=Counter)
    runs_completed: int = 0
    runs_completed_after_failover: int = 0
    runs_failed: list[str] = field(default_factory=list)
    # Streams that ended with [DONE] and no `end` (event or notice) before it, as "run: frames";
    # a client never resumes from its run's `end`, so each is a stream that left its client not
    # knowing how the run ended.
    done_without_end: list[str] = field(default_factory=list)
    # Resumes answered 404 run_not_found although the run's POST had answered 200 with its id.
    not_found: list[str] = field(default_factory=list)
    failover_done: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def runs_failed_why(self) -> list[str]:
        return [why.split(": ", 1)[1][:90] for why in self.runs_failed]

    def note(self) -> None:
        self.changed.set()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(LOAD_TIMEOUT_SECONDS):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            pytest.fail(f"no {what} within {LOAD_TIMEOUT_SECONDS} s: completed {self.runs_completed}, "
                        f"failed {self.runs_failed[-5:]}")


class LoadDriver:
    """`one_run` on `concurrency` workers against the instances until `drain` (each worker ends its
    run) or `finish` (stops the workers, closes the clients, prints what the load saw)."""

    def __init__(self, auras: Sequence[AuraProcess], concurrency: int) -> None:
        NOTICES.clear()  # the notices of this load only
        self.load = Load()
        self.clients = [httpx.AsyncClient(base_url=aura.url, timeout=RUN_TIMEOUT_SECONDS) for aura in auras]
        self.outcome = "the load did not reach its failover"  # what `finish` prints first
        self._stopping = False
        counter = itertools.count()

        async def worker() -> None:
            while not self._stopping:
                await one_run(next(counter), self.clients, self.load)

        self._workers = [asyncio.create_task(worker()) for _ in range(concurrency)]

    async def drain(self) -> None:
        self._stopping = True
        await asyncio.gather(*self._workers)

    async def finish(self) -> None:
        self._stopping = True
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for client in self.clients:
            await client.aclose()
        load = self.load
        print(f"{self.outcome}; runs completed {load.runs_completed}, failed {len(load.runs_failed)}; "
              f"events received {len(load.received)} (followers {len(load.followed)}); "
              f"approvals answered {dict(load.approval_answers)}; failed runs: {Counter(load.runs_failed_why())}; "
              f"streams ended [DONE] without an end: {load.done_without_end}; "
              f"resumes answered 404: {dict(Counter(load.not_found))}")


def frames(buffer: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The whole SSE frames in `buffer` as (id, data) and the incomplete rest."""
    out = []
    *blocks, rest = buffer.split(b"\n\n")
    for block in blocks:
        lines = [line for line in block.split(b"\n") if b": " in line and not line.startswith(b":")]
        fields = dict(line.split(b": ", 1) for line in lines)
        if b"data" in fields:
            out.append((fields.get(b"id", b""), fields[b"data"]))
    return out, rest


def is_store_failure_notice(data: bytes) -> bool:
    """The closing pair a run sends when the store failed under it (`error` store_unavailable,
    retryable, then `end` failed store_unavailable): sent even when the log cannot take it."""
    envelope = json.loads(data)
    if envelope["type"] == "error":
        return bool(envelope["data"]["errorType"] == "store_unavailable" and envelope["data"]["retryable"])
    return bool(envelope["type"] == "end" and envelope["data"]["reason"] == "store_unavailable")


async def approve(client: httpx.AsyncClient, request_id: str, user: str, load: Load) -> None:
    """Approve as a client does: retry what is retryable until the decision is answered."""
    while True:
        try:
            answer = await client.post(f"/aura/hitl/approve/{request_id}", headers=bearer(user))
        except httpx.TransportError:
            continue
        load.approval_answers[answer.status_code] += 1
        if answer.status_code == 200:
            load.approved.append(request_id)
            load.note()
            return
        if answer.status_code != 503:  # 409: decided already (a retry of one that was applied)
            return
        await asyncio.sleep(0.1)  # the client's retry back-off (Retry-After), not a wait for an outcome


async def read_events(response: httpx.Response, into: dict[tuple[str, int], bytes], load: Load,
                      run_id: str) -> AsyncIterator[bytes]:
    """Each frame's data as it arrives, noted by (run, seq) in `into` (the [DONE] too, unnoted);
    a [DONE] with no `end` before it in this stream is noted in `load.done_without_end`."""
    buffer = b""
    seen: list[str] = []
    async for chunk in response.aiter_bytes():
        got, buffer = frames(buffer + chunk)
        for frame_id, data in got:
            if data == b"[DONE]":
                if "end" not in seen:
                    load.done_without_end.append(f"{run_id}: {' '.join(seen) or 'nothing'}")
                yield data
                continue
            envelope = json.loads(data)
            seen.append(envelope["type"])
            if not frame_id:  # a notice (seq 0: no resume point), not an event of the log
                assert envelope["seq"] == 0, data
                NOTICES.setdefault(envelope["runId"], []).append(envelope)
                yield data
                continue
            frame_run, seq = frame_id.decode().rsplit(":", 1)
            into[(frame_run, int(seq))] = data
            yield data


async def follow(client: httpx.AsyncClient, run_id: str, user: str, load: Load) -> None:
    """Read the run from the instance that does not own it, from its first event to its end."""
    try:
        async with asyncio.timeout(RUN_TIMEOUT_SECONDS):
            async with client.stream("GET", f"/aura/runs/{run_id}/events", headers=bearer(user)) as response:
                if response.status_code == 200:
                    async for _ in read_events(response, load.followed, load, run_id):
                        pass
                elif response.status_code == 404:
                    load.not_found.append(f"{run_id} (followed)")
    except (httpx.TransportError, TimeoutError):
        pass  # a cut follow is a client's retry, not a loss: what it received is checked all the same


async def one_run(i: int, clients: list[httpx.AsyncClient], load: Load) -> None:
    """One run as a client drives it: started on one instance, approved on the other, resumed
    with Last-Event-ID (on either) when its connection ends before [DONE]; every third run is
    also read from the other instance from its first event."""
    home, other = clients[i % 2], clients[(i + 1) % 2]
    user = f"user{i % 20}"
    prompt = "@dwp_request " + json.dumps({"method": "POST", "path": "/api/items", "body": {"marker": f"m{i}"}})
    after_failover = load.failover_done
    last, last_seq, run_id = b"", 0, ""
    decided: set[str] = set()
    retry = False
    final_end: dict[str, Any] | None = None  # the last `end` the client read (an event or a notice)
    follower: asyncio.Task[None] | None = None

    async def consume(response: httpx.Response) -> None:
        nonlocal last, last_seq, retry, final_end
        retry = False
        async for data in read_events(response, load.received, load, run_id):
            last = data
            if data == b"[DONE]":
                continue
            envelope = json.loads(data)
            if envelope["type"] == "end":
                final_end = envelope["data"]
            if envelope["seq"] == 0:
                if envelope["type"] == "error" and envelope["data"]["retryable"]:
                    retry = True  # "reconnect with Last-Event-ID": the client does
                continue
            last_seq = max(last_seq, envelope["seq"])
            if envelope["type"] == "hitl" and envelope["data"]["requestId"] not in decided:
                decided.add(envelope["data"]["requestId"])
                await approve(other, envelope["data"]["requestId"], user, load)

    try:
        async with asyncio.timeout(RUN_TIMEOUT_SECONDS):
            async with home.stream("POST", "/aura/test/stream", json={"prompt": prompt},
                                   headers=bearer(user)) as response:
                if response.status_code != 200:
                    load.runs_failed.append(f"{i}: HTTP {response.status_code}")
                    return
                run_id = response.headers["x-aura-run-id"]
                if i % 3 == 0:
                    follower = asyncio.create_task(follow(other, run_id, user, load))
                try:
                    await consume(response)
                except httpx.TransportError:
                    pass
            for attempt in range(1, RESUMES + 1):
                if last == b"[DONE]" and not retry:
                    break
                resume_on = clients[(i + attempt) % 2]
                headers = {**bearer(user), "Last-Event-ID": f"{run_id}:{last_seq}"} if last_seq else bearer(user)
                try:
                    async with resume_on.stream("GET", f"/aura/runs/{run_id}/events", headers=headers) as response:
                        if response.status_code == 200:
                            await consume(response)
                        elif response.status_code == 404:
                            load.not_found.append(run_id)
                except httpx.TransportError:
                    pass
                if last != b"[DONE]" or retry:
                    await asyncio.sleep(0.2)  # the client's reconnect delay (the stream's retry: hint)
    except TimeoutError:
        load.runs_failed.append(f"{i}: run {run_id} after seq {last_seq} timed out")
        return
    finally:
        if follower is not None:
            await follower
        load.note()
    if retry:  # its last stream said "the store failed: reconnect"
        load.runs_failed.append(f"{i}: still failing after {RESUMES} resumes: {final_end}")
    elif final_end is not None and final_end["status"] == "completed":
        load.runs_completed += 1
        load.runs_completed_after_failover += after_failover
    else:
        load.runs_failed.append(f"{i}: ended {final_end if final_end is not None else last[:200]!r}")
