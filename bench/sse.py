"""A lean HTTP/1.1 + Server-Sent Events client on raw asyncio streams.

The load generator must cost far less CPU than the servers it measures, so this reads big blocks,
undoes chunked transfer encoding by hand and only splits frames on blank lines: no per-frame
objects unless a caller asks for the frame's content.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

READ_SIZE = 65536


class HTTPError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body


def build_request(method: str, host: str, port: int, path: str, headers: Mapping[str, str],
                  body: bytes | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    raw: bytearray = field(default_factory=bytearray)  # received bytes not yet decoded
    chunked: bool = False
    length: int | None = None
    eof: bool = False

    def close(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()  # no lingering FIN handshake: the load generator must stay cheap

    async def body_blocks(self) -> AsyncIterator[bytes]:
        """The decoded body, block by block, until its end (or the connection's)."""
        remaining = self.length
        while True:
            if self.chunked:
                out, done = self._dechunk()
                if out:
                    yield out
                if done:
                    return
            elif self.raw:
                block = bytes(self.raw)
                self.raw.clear()
                if remaining is not None:
                    remaining -= len(block)
                yield block
                if remaining is not None and remaining <= 0:
                    return
            elif remaining is not None and remaining <= 0:
                return
            data = await self.reader.read(READ_SIZE)
            if not data:
                self.eof = True
                return
            self.raw += data

    def _dechunk(self) -> tuple[bytes, bool]:
        out = bytearray()
        raw = self.raw
        pos = 0
        done = False
        while True:
            end = raw.find(b"\r\n", pos)
            if end < 0:
                break
            size = int(raw[pos:end].split(b";", 1)[0], 16)
            if size == 0:
                done = True
                pos = end + 2
                break
            start = end + 2
            if len(raw) < start + size + 2:
                break
            out += raw[start:start + size]
            pos = start + size + 2
        del raw[:pos]
        return bytes(out), done

    async def read_all(self) -> bytes:
        return b"".join([block async for block in self.body_blocks()])


async def request(host: str, port: int, method: str, path: str, headers: Mapping[str, str],
                  body: bytes | None = None) -> Response:
    reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE * 4)
    try:
        writer.write(build_request(method, host, port, path, headers, body))
        head = await reader.readuntil(b"\r\n\r\n")
    except BaseException:
        writer.transport.abort()
        raise
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    parsed: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            parsed[name.strip().lower()] = value.strip()
    response = Response(status, parsed, reader, writer)
    response.chunked = "chunked" in parsed.get("transfer-encoding", "").lower()
    if "content-length" in parsed:
        response.length = int(parsed["content-length"])
    return response


class SSEStream:
    """Frames of an event stream; counts what it sees."""

    def __init__(self, response: Response, ignore: bytes | None = None, crlf: bool = False) -> None:
        self.response = response
        # frames that start with `ignore` are neither events nor comments (LangGraph's `metadata`)
        self.ignore = ignore
        # lines end with CRLF (sse-starlette's default, LangGraph's): read as LF
        self.crlf = crlf
        self._blocks = response.body_blocks()
        self._body = b""
        self._pending: list[bytes] = []
        self.events = 0
        self.comments = 0
        self.bytes = 0
        self.done = False
        self.first_event_at: float | None = None

    async def next_frame(self) -> bytes | None:
        """The next frame (without its blank line); None at the end of the body. Comment lines
        are counted wherever they stand: Aura's heartbeat is a comment line with no blank line
        after it (docs/contract.md), so it may open the next event's frame or stand alone at the
        end of what has arrived; a frame of comments alone comes back as `b":"`."""
        while not self._pending:
            try:
                block = await self._blocks.__anext__()
            except StopAsyncIteration:
                return None
            self.bytes += len(block)
            data = self._body + block
            parts = (data.replace(b"\r\n", b"\n") if self.crlf else data).split(b"\n\n")
            comments = self.comments
            self._body = self._count_leading_comments(parts.pop())
            self._pending = parts
            self._pending.reverse()
            if not self._pending and self.comments > comments:
                return b":"  # comment lines, no frame yet: report them now
        frame = self._count_leading_comments(self._pending.pop(), frame=True)
        if not frame:
            return b":"
        if frame == b"data: [DONE]":
            self.done = True
        elif self.ignore is not None and frame.startswith(self.ignore):
            pass
        else:
            self.events += 1
            if self.first_event_at is None:
                self.first_event_at = time.perf_counter()
        return frame

    def _count_leading_comments(self, part: bytes, *, frame: bool = False) -> bytes:
        """`part` without the complete comment lines it starts with, each counted (in a `frame`,
        whose blank line was cut off, the last line is complete too)."""
        while part.startswith(b":"):
            end = part.find(b"\n")
            if end < 0:
                if frame:
                    self.comments += 1
                    return b""
                return part  # a comment line still arriving
            self.comments += 1
            part = part[end + 1:]
        return part

    async def drain(self) -> None:
        """Read to the end, counting, with as little work per frame as possible (blocks without
        a comment line are counted without being split into frames)."""
        while self._pending:
            if await self.next_frame() is None:
                return
        async for block in self._blocks:
            self.bytes += len(block)
            data = self._body + block
            if self.crlf:
                data = data.replace(b"\r\n", b"\n")
            cut = data.rfind(b"\n\n")
            if cut < 0:
                self._body = self._count_leading_comments(data)
                continue
            complete, self._body = data[:cut + 2], self._count_leading_comments(data[cut + 2:])
            if complete.startswith(b":") or b"\n:" in complete:
                self._pending = complete[:-2].split(b"\n\n")
                self._pending.reverse()
                while self._pending:
                    await self.next_frame()
                if self.done:
                    return
                continue
            frames = complete.count(b"\n\n")
            done = complete.endswith(b"data: [DONE]\n\n")
            if done:
                self.done = True
                frames -= 1
            new_events = frames
            if self.ignore is not None:
                new_events -= complete.count(b"\n\n" + self.ignore) + (1 if complete.startswith(self.ignore) else 0)
            if new_events > 0 and self.first_event_at is None:
                self.first_event_at = time.perf_counter()
            self.events += new_events
            if done:
                return


def frame_event(frame: bytes) -> str | None:
    for line in frame.split(b"\n"):
        if line.startswith(b"event:"):
            return line[6:].strip().decode()
    return None


def frame_data(frame: bytes) -> bytes:
    return b"\n".join(line[5:].lstrip(b" ") for line in frame.split(b"\n") if line.startswith(b"data:"))
