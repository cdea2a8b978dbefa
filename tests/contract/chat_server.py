"""A scripted OpenAI-compatible Chat Completions server for contract and end-to-end tests.

It speaks plain HTTP/1.1 over `asyncio.start_server`, so what a client receives is byte for byte
what the real API sends: a status line, `content-type: text/event-stream`, a chunked (or
connection-close) body of `data: {...}\\n\\n` frames ending with `data: [DONE]\\n\\n`.

Each incoming request takes the next behaviour from a queue (`enqueue`) and is recorded
(method, path, headers, parsed JSON body) in `requests` for assertions:

    async with ChatServer() as server:
        server.enqueue(Reply.rate_limited(retry_after="1"), Stream.recording("content"))
        ... point a client at f"{server.url}/v1" ...
        assert server.requests[1].body["stream"] is True
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal, Protocol

RECORDINGS = Path(__file__).parent / "recordings"
CREATED = 1767000000


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # the request target, query string included
    headers: Mapping[str, str]  # names lower-cased
    body: Any  # parsed JSON, or None when the body was empty or not JSON
    raw_body: bytes


class Behaviour(Protocol):
    async def respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; return True when the connection may serve another one."""


def _status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()


def _header_block(headers: Mapping[str, str]) -> bytes:
    return "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode() + b"\r\n"


def split_frames(text: str) -> list[str]:
    """Split an SSE body into its frames, each keeping its terminating blank line."""
    return [frame + "\n\n" for frame in text.split("\n\n") if frame.strip()]


def data_frame(payload: Mapping[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n"


DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class Stream:
    """A 200 event stream of `frames` (raw SSE text, one frame per network write).

    `cut_after=n` drops the connection after n frames (mid-chunk-stream when chunked);
    `stall_after=n` sends n frames and then goes silent until the client hangs up.
    """

    frames: Sequence[str]
    framing: Literal["chunked", "close"] = "chunked"
    cut_after: int | None = None
    stall_after: int | None = None

    @classmethod
    def recording(cls, name: str, **options: Any) -> Stream:
        return cls(split_frames((RECORDINGS / f"{name}.sse").read_text(encoding="utf-8")), **options)

    async def respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
                   "x-request-id": "req_contract_test"}
        if self.framing == "chunked":
            headers["transfer-encoding"] = "chunked"
        else:
            headers["connection"] = "close"
        writer.write(_status_line(200) + _header_block(headers))
        await writer.drain()
        for sent, frame in enumerate(self.frames):
            if sent == self.cut_after:
                return False
            if sent == self.stall_after:
                await reader.read()  # returns at EOF: the client gave up waiting
                return False
            data = frame.encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n" if self.framing == "chunked" else data)
            await writer.drain()
        if self.framing == "chunked":
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        return False


@dataclass(frozen=True)
class Reply:
    """A complete non-streamed answer, e.g. an error status with the provider's JSON error body."""

    status: int
    body: Mapping[str, Any] | str = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def error(cls, status: int, message: str, code: str | None = None, type_: str = "server_error",
              headers: Mapping[str, str] | None = None) -> Reply:
        return cls(status, {"error": {"message": message, "type": type_, "param": None, "code": code}},
                   headers or {})

    @classmethod
    def rate_limited(cls, retry_after: str | None = None) -> Reply:
        return cls.error(429, "Rate limit reached for requests", "rate_limit_exceeded", "requests",
                         {"retry-after": retry_after} if retry_after is not None else None)

    async def respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        body = (self.body if isinstance(self.body, str) else json.dumps(self.body)).encode()
        headers = {"content-type": "application/json", "content-length": str(len(body)), **self.headers}
        writer.write(_status_line(self.status) + _header_block(headers) + body)
        await writer.drain()
        return True


def _chunk(delta: Mapping[str, Any] | None, finish_reason: str | None = None,
           usage: Mapping[str, int] | None = None, model: str = "gpt-4o-mini-2024-07-18") -> str:
    choices = [] if delta is None else [
        {"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish_reason}
    ]
    payload = {"id": "chatcmpl-contract", "object": "chat.completion.chunk", "created": CREATED,
               "model": model, "system_fingerprint": "fp_contract", "choices": choices,
               "usage": None if usage is None else {**usage, "total_tokens": sum(usage.values())}}
    return data_frame(payload)


def content_frames(pieces: Iterable[str], *, finish_reason: str = "stop",
                   usage: Mapping[str, int] | None = None) -> list[str]:
    """A streamed text answer in OpenAI's format, one piece per chunk."""
    frames = [_chunk({"role": "assistant", "content": "", "refusal": None})]
    frames += [_chunk({"content": piece}) for piece in pieces]
    frames.append(_chunk({}, finish_reason))
    if usage is not None:
        frames.append(_chunk(None, usage=usage))
    return [*frames, DONE]


def tool_call_frames(calls: Sequence[tuple[str, str, Sequence[str]]], *,
                     usage: Mapping[str, int] | None = None) -> list[str]:
    """Streamed tool calls `(id, name, argument fragments)` in OpenAI's format, indexes 0, 1, ..."""
    frames = []
    for index, (call_id, name, fragments) in enumerate(calls):
        opening = {"index": index, "id": call_id, "type": "function",
                   "function": {"name": name, "arguments": ""}}
        first = {"role": "assistant", "content": None, "tool_calls": [opening]} if index == 0 else {
            "tool_calls": [opening]}
        frames.append(_chunk(first))
        frames += [_chunk({"tool_calls": [{"index": index, "function": {"arguments": f}}]})
                   for f in fragments]
    frames.append(_chunk({}, "tool_calls"))
    if usage is not None:
        frames.append(_chunk(None, usage=usage))
    return [*frames, DONE]


class ChatServer:
    """Serves queued behaviours on 127.0.0.1 (a free port) and records every request."""

    def __init__(self, default: Behaviour | None = None) -> None:
        self.requests: list[RecordedRequest] = []
        self._queue: deque[Behaviour] = deque()
        self._default = default
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """`http://127.0.0.1:<port>`; an OpenAI-style base URL is `f"{url}/v1"`."""
        if self._server is None:
            raise RuntimeError("the server is not started")
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def enqueue(self, *behaviours: Behaviour) -> None:
        self._queue.extend(behaviours)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ChatServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _next_behaviour(self) -> Behaviour:
        if self._queue:
            return self._queue.popleft()
        if self._default is not None:
            return self._default
        return Reply.error(500, "chat_server: no scripted response left", "unscripted")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while (request := await _read_request(reader)) is not None:
                self.requests.append(request)
                if not await self._next_behaviour().respond(reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing left to answer
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> RecordedRequest | None:
    request_line = await reader.readline()
    if not request_line.strip():
        return None
    method, target, _version = request_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    raw_body = await reader.readexactly(int(headers.get("content-length", "0")))
    body = None
    if raw_body and "json" in headers.get("content-type", ""):
        body = json.loads(raw_body)
    return RecordedRequest(method, target, headers, body, raw_body)
