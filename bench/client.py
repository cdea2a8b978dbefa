"""The load generator: a separate process that takes JSON commands on stdin, one a line, and
answers each with one JSON line on stdout. Its own CPU time is part of every answer, so a client
bottleneck is never mistaken for a server one.

Commands (see bench/run.py for the callers): streams, follow, park, release, approvals, redis_rtt, quit.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.sse import SSEStream, frame_data, frame_event, request

HOST = "127.0.0.1"
# LangGraph's stream frames that carry no event of the run: the run's id at the start, `run_done` at the end
LANGGRAPH_META = b"event: metadata"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Tokens:
    """Bearer headers for Aura, one user per index (cached: minting is not what we measure)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], dict[str, str]] = {}

    def headers(self, auth: dict[str, Any] | None, index: int) -> dict[str, str]:
        if not auth:
            return {}
        users = int(auth.get("users", 1))
        key = (auth["secret"], index % users)
        found = self._cache.get(key)
        if found is None:
            from adapters.jwt import mint_token

            token = mint_token(key=auth["secret"], sub=f"bench-u{index % users}", tenant_id=auth["tenant"],
                               ttl_seconds=6 * 3600)
            found = self._cache[key] = {"Authorization": f"Bearer {token}"}
        return found


TOKENS = Tokens()


def _headers(spec: dict[str, Any], index: int, body: bytes | None) -> dict[str, str]:
    headers = {"Accept": "text/event-stream", **TOKENS.headers(spec.get("auth"), index)}
    if body is not None:
        headers["Content-Type"] = "application/json"
    return headers


def _errors_summary(errors: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for error in errors:
        counts[error[:160]] = counts.get(error[:160], 0) + 1
    return counts


async def cmd_streams(spec: dict[str, Any]) -> dict[str, Any]:
    """`total` streams, at most `concurrency` at once (closed loop); each read to [DONE]."""
    port, path = spec["port"], spec["path"]
    bodies = [json.dumps(b).encode() for b in spec["bodies"]]
    total, concurrency = int(spec["total"]), int(spec["concurrency"])
    connect = asyncio.Semaphore(int(spec.get("connect_limit") or concurrency))
    slots = asyncio.Semaphore(concurrency)
    ttfe: list[float] = []
    events: list[int] = []
    open_now = peak_open = 0
    errors: list[str] = []
    nbytes = 0
    incomplete = 0
    # LangGraph ends a stream by ending its body (no [DONE])
    langgraph = spec.get("kind") == "langgraph"

    async def one(index: int) -> None:
        nonlocal nbytes, incomplete, open_now, peak_open
        body = bodies[index % len(bodies)]
        async with slots:
            started = time.perf_counter()
            open_now += 1
            peak_open = max(peak_open, open_now)
            try:
                async with connect:
                    response = await request(HOST, port, "POST", path, _headers(spec, index, body), body)
                try:
                    if response.status != 200:
                        errors.append(f"HTTP {response.status}: {(await response.read_all())[:200]!r}")
                        return
                    stream = SSEStream(response, ignore=LANGGRAPH_META if langgraph else None, crlf=langgraph)
                    await stream.drain()
                finally:
                    response.close()
            except Exception as exc:  # a failed stream is counted, not fatal
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            finally:
                open_now -= 1
            nbytes += stream.bytes
            events.append(stream.events)
            if not stream.done and not langgraph:
                incomplete += 1
            if stream.first_event_at is not None:
                ttfe.append((stream.first_event_at - started) * 1000.0)

    gc.collect()
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    return {"ok": len(events), "errors": len(errors), "error_kinds": _errors_summary(errors),
            "incomplete": incomplete, "events": sum(events), "events_min": min(events, default=0),
            "events_max": max(events, default=0), "bytes": nbytes, "ttfe_ms": ttfe if spec.get("ttfe") else [],
            "wall_s": wall, "client_cpu_s": cpu, "peak_open": peak_open}


async def cmd_follow(spec: dict[str, Any]) -> dict[str, Any]:
    """`total` runs started on the owner (A), each also read by a follower on B
    (GET /aura/runs/{id}/events from the first event on, as a user reconnecting to another instance
    would), at most `concurrency` at once; both streams read to [DONE]."""
    a, b, path = spec["a_port"], spec["b_port"], spec["path"]
    body = json.dumps(spec["body"]).encode()
    total, concurrency = int(spec["total"]), int(spec["concurrency"])
    slots = asyncio.Semaphore(concurrency)
    owner_events: list[int] = []
    follower_events: list[int] = []
    errors: list[str] = []
    incomplete = 0

    async def one(index: int) -> None:
        nonlocal incomplete
        async with slots:
            try:
                response = await request(HOST, a, "POST", path, _headers(spec, index, body), body)
                if response.status != 200:
                    errors.append(f"owner: HTTP {response.status}")
                    response.close()
                    return
                owner = SSEStream(response)
                frame = await owner.next_frame()
                run_id = json.loads(frame_data(frame or b"{}")).get("runId")
                followed = await request(HOST, b, "GET", f"/aura/runs/{run_id}/events",
                                         {**_headers(spec, index, None), "Last-Event-ID": "0"})
                if followed.status != 200:
                    errors.append(f"follower: HTTP {followed.status}")
                    followed.close()
                    response.close()
                    return
                follower = SSEStream(followed)
                try:
                    await asyncio.gather(owner.drain(), follower.drain())
                finally:
                    response.close()
                    followed.close()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            owner_events.append(owner.events)
            follower_events.append(follower.events)
            incomplete += (not owner.done) + (not follower.done)

    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    return {"ok": len(owner_events), "errors": len(errors), "error_kinds": _errors_summary(errors),
            "incomplete": incomplete, "owner_events": sum(owner_events), "follower_events": sum(follower_events),
            "wall_s": time.perf_counter() - wall0, "client_cpu_s": cpu_seconds() - cpu0}


@dataclass
class Parked:
    streams: list[SSEStream] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    ended_early: int = 0
    unexpected_events: int = 0
    errors: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


PARKED = Parked()


async def cmd_park(spec: dict[str, Any]) -> dict[str, Any]:
    """Open `n` streams and read each until the `until` event (hitl / ready); keep them open, reading
    heartbeats, until `release`."""
    port, path, method = spec["port"], spec.get("path", ""), spec.get("method", "POST")
    until = spec.get("until")
    body = json.dumps(spec["body"]).encode() if spec.get("body") is not None else None
    n = int(spec["n"])
    connect = asyncio.Semaphore(int(spec.get("connect_limit", 100)))
    parked_at: list[float] = []
    failures: list[str] = []

    async def hold(stream: SSEStream) -> None:
        before = stream.events
        last: list[bytes] = []
        try:
            while (frame := await stream.next_frame()) is not None:
                if not frame.startswith(b":"):
                    last = [*last[-2:], frame]
        except Exception as exc:
            PARKED.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if not getattr(stream, "released", False):
                PARKED.ended_early += 1
                if len(PARKED.samples) < 6:  # how the stream ended, for the report
                    PARKED.samples.append(" || ".join(f[-300:].decode("utf-8", "replace") for f in last))
            PARKED.unexpected_events += stream.events - before

    async def one(index: int) -> None:
        started = time.perf_counter()
        try:
            async with connect:
                if spec.get("kind") == "langgraph":
                    thread_stream = await _langgraph_park(port, spec["body"])
                    parked_at.append(time.perf_counter() - started)
                    PARKED.streams.append(thread_stream)
                    PARKED.tasks.append(asyncio.create_task(hold(thread_stream)))
                    return
                response = await request(HOST, port, method, path, _headers(spec, index, body), body)
                if response.status != 200:
                    failures.append(f"HTTP {response.status}: {(await response.read_all())[:200]!r}")
                    response.close()
                    return
                stream = SSEStream(response)
                while True:
                    frame = await stream.next_frame()
                    if frame is None:
                        failures.append("stream ended before parking")
                        response.close()
                        return
                    if frame_event(frame) == until:
                        break
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            return
        parked_at.append(time.perf_counter() - started)
        PARKED.streams.append(stream)
        PARKED.tasks.append(asyncio.create_task(hold(stream)))

    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return {"parked": len(PARKED.streams), "failures": len(failures), "failure_kinds": _errors_summary(failures),
            "wall_s": time.perf_counter() - wall0, "client_cpu_s": cpu_seconds() - cpu0,
            "park_p50_ms": _pct(parked_at, 50) * 1000, "park_p99_ms": _pct(parked_at, 99) * 1000}


async def cmd_release(spec: dict[str, Any]) -> dict[str, Any]:
    """Report what the parked streams saw while held, then close them all."""
    streams = PARKED.streams
    heartbeats = [s.comments for s in streams]
    result = {"held": len(streams), "ended_early": PARKED.ended_early, "unexpected_events": PARKED.unexpected_events,
              "errors": len(PARKED.errors), "error_kinds": _errors_summary(PARKED.errors),
              "heartbeats_min": min(heartbeats, default=0), "heartbeats_total": sum(heartbeats),
              "unexpected_samples": PARKED.samples}
    for stream in streams:
        stream.released = True  # type: ignore[attr-defined]
        stream.response.close()
    for task in PARKED.tasks:
        task.cancel()
    await asyncio.gather(*PARKED.tasks, return_exceptions=True)
    PARKED.__init__()  # type: ignore[misc]
    return result


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def cmd_approvals(spec: dict[str, Any]) -> dict[str, Any]:
    """Park `batch` waits on instance A, then approve them one after another on instance B: the
    latency is from sending the approve POST to reading the `running` event on A's stream. Back to
    back by default (the next approval goes out while A still finishes the one before and the
    client still reads its stream); `isolated` waits until that stream has ended first."""
    a, b = spec["a_port"], spec["b_port"]
    aura = spec["kind"] == "aura"
    langgraph = spec["kind"] == "langgraph"
    total, batch = int(spec["total"]), int(spec["batch"])
    body = json.dumps(spec.get("body")).encode() if spec.get("body") is not None else None
    latencies: list[float] = []
    post_ms: list[float] = []
    errors: list[str] = []
    # the shape of a parked run: events up to its wait's frame, and in all (with their bytes)
    frames_before: list[int] = []
    frames_all: list[int] = []
    bytes_all: list[int] = []
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    done = 0
    user_base = random.randrange(10**6)
    while done < total:
        size = min(batch, total - done)
        connect = asyncio.Semaphore(50)

        async def open_wait(index: int, done: int = done,
                            connect: asyncio.Semaphore = connect) -> tuple[SSEStream, str, int] | None:
            user = user_base + done + index
            if langgraph:
                try:
                    async with connect:
                        thread_stream = await _langgraph_park(a, spec["body"])
                    return thread_stream, thread_stream.thread_id, user
                except Exception as exc:
                    errors.append(f"open: {type(exc).__name__}: {exc}")
                    return None
            wait_path = spec["path"] if aura else f"/wait/w{user}-{random.getrandbits(64):x}"
            try:
                async with connect:  # the floor's wait is a POST when it writes a run's frames
                    response = await request(HOST, a, "POST" if body is not None else "GET", wait_path,
                                             _headers(spec, user, body), body)
                if response.status != 200:
                    errors.append(f"open: HTTP {response.status}")
                    response.close()
                    return None
                stream = SSEStream(response)
                while (frame := await stream.next_frame()) is not None:
                    kind = frame_event(frame)
                    if kind == ("hitl" if aura else "ready"):
                        data = json.loads(frame_data(frame))
                        wait_id = data["data"]["requestId"] if aura else data["id"]
                        frames_before.append(stream.events)
                        return stream, wait_id, user
                errors.append("open: stream ended before the wait")
                response.close()
            except Exception as exc:
                errors.append(f"open: {type(exc).__name__}: {exc}")
            return None

        opened = [w for w in await asyncio.gather(*(open_wait(i) for i in range(size))) if w is not None]
        drains = []
        for stream, wait_id, user in opened:
            approve_path = f"/aura/hitl/approve/{wait_id}" if aura else f"/approve/{wait_id}"
            approve_body = b""
            if langgraph:  # a run on the thread that resumes it: Command(resume=...)
                approve_path = f"/threads/{wait_id}/runs"
                approve_body = json.dumps({"assistant_id": spec["body"]["assistant_id"], "stream_mode": ["custom"],
                                           "command": {"resume": "approved"}}).encode()
            started = time.perf_counter()
            try:
                response = await request(HOST, b, "POST", approve_path,
                                         {**TOKENS.headers(spec.get("auth"), user), "Content-Type": "application/json"},
                                         approve_body)
                await response.read_all()
                response.close()
                posted = time.perf_counter()
                if response.status != 200:
                    errors.append(f"approve: HTTP {response.status}")
                    stream.response.close()
                    continue
                while (frame := await asyncio.wait_for(stream.next_frame(), 60)) is not None:
                    if frame_event(frame) in ("tool_execution", "custom") and \
                            (not (aura or langgraph) or b'"status":"running"' in frame):
                        break
                else:
                    errors.append("no running event")
                    continue
                latencies.append((time.perf_counter() - started) * 1000.0)
                post_ms.append((posted - started) * 1000.0)
            except Exception as exc:
                errors.append(f"approve: {type(exc).__name__}: {exc}")
                stream.response.close()
                continue
            drains.append(asyncio.create_task(_finish(stream, frames_all, bytes_all)))
            if spec.get("isolated"):
                await drains[-1]
        await asyncio.gather(*drains)
        done += size
    return {"approvals": len(latencies), "errors": len(errors), "error_kinds": _errors_summary(errors),
            "latency_ms": latencies, "post_ms": post_ms, "wall_s": time.perf_counter() - wall0,
            "client_cpu_s": cpu_seconds() - cpu0,
            "frames_before": _pct(frames_before, 50), "frames_all": _pct(frames_all, 50),
            "bytes_per_frame": sum(bytes_all) / sum(frames_all) if sum(frames_all) else None}


async def _finish(stream: SSEStream, frames: list[int], sizes: list[int]) -> None:
    try:
        if isinstance(stream, LangGraphStream):  # a thread's stream stays open: read to the run's end
            while (frame := await asyncio.wait_for(stream.next_frame(), 60)) is not None:
                if frame.startswith(LANGGRAPH_META) and b'"run_done"' in frame:
                    break
        else:
            await stream.drain()
            frames.append(stream.events)
            sizes.append(stream.bytes)
    finally:
        stream.response.close()


class LangGraphStream(SSEStream):
    """A LangGraph thread's stream (GET /threads/{id}/stream), held open as Aura's run stream is."""

    thread_id = ""


async def _json(port: int, method: str, path: str, body: dict[str, Any]) -> Any:
    response = await request(HOST, port, method, path, {"Content-Type": "application/json"},
                             json.dumps(body).encode())
    try:
        data = await response.read_all()
    finally:
        response.close()
    if response.status != 200:
        raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:200]!r}")
    return json.loads(data)


async def _langgraph_park(port: int, body: dict[str, Any]) -> LangGraphStream:
    """A LangGraph run parked on `interrupt()`, as a LangGraph app does it: a thread, a run on it
    that stops at the interrupt, then the thread's stream held open for what its resumption writes."""
    thread = await _json(port, "POST", "/threads", {})
    thread_id = thread["thread_id"]
    state = await _json(port, "POST", f"/threads/{thread_id}/runs/wait", body)
    if "__interrupt__" not in state:
        raise RuntimeError(f"the run did not stop at its interrupt: {str(state)[:200]}")
    response = await request(HOST, port, "GET", f"/threads/{thread_id}/stream?stream_mode=custom",
                             {"Accept": "text/event-stream"})
    if response.status != 200:
        response.close()
        raise RuntimeError(f"thread stream: HTTP {response.status}")
    stream = LangGraphStream(response, ignore=LANGGRAPH_META, crlf=True)
    stream.thread_id = thread_id
    return stream


async def cmd_redis_rtt(spec: dict[str, Any]) -> dict[str, Any]:
    """The Redis floor: PUBLISH on one connection -> message read on a subscribed one
    (redis-py asyncio with the hiredis parser), sequentially."""
    from redis.asyncio import Redis
    from redis.utils import HIREDIS_AVAILABLE

    publisher, subscriber = Redis.from_url(spec["url"]), Redis.from_url(spec["url"])
    pubsub = subscriber.pubsub()
    channel = f"bench:rtt:{random.getrandbits(64):x}"
    await pubsub.subscribe(channel)
    while (await pubsub.get_message(timeout=1.0)) is None:
        pass
    latencies = []
    cpu0 = cpu_seconds()
    for i in range(int(spec["n"])):
        started = time.perf_counter()
        await publisher.publish(channel, b'{"type":"approval","requestId":"req_%d"}' % i)
        while True:
            message = await pubsub.get_message(timeout=5.0)
            if message is not None and message["type"] == "message":
                break
        latencies.append((time.perf_counter() - started) * 1000.0)
    cpu = cpu_seconds() - cpu0
    await pubsub.aclose()
    await publisher.aclose()
    await subscriber.aclose()
    return {"latency_ms": latencies, "hiredis": HIREDIS_AVAILABLE, "client_cpu_s": cpu}


COMMANDS = {"streams": cmd_streams, "park": cmd_park, "release": cmd_release, "approvals": cmd_approvals,
            "redis_rtt": cmd_redis_rtt, "follow": cmd_follow}


async def main() -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or not line.strip():
            return
        message = json.loads(line)
        if message["cmd"] == "quit":
            return
        try:
            result = await COMMANDS[message["cmd"]](message)
        except Exception as exc:  # the orchestrator decides what a failed command means
            result = {"fatal": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    import resource as _resource

    soft, hard = _resource.getrlimit(_resource.RLIMIT_NOFILE)
    _resource.setrlimit(_resource.RLIMIT_NOFILE, (hard, hard))
    if "--uvloop" in sys.argv:
        import uvloop

        uvloop.install()
    asyncio.run(main())
