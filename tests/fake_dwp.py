"""A local stand-in for the DWP backend's REST API: records every request and answers scripted ones.

It runs `http.server` in a background thread, so it serves the same way whether the caller is a
test's event loop, another loop in another thread (an end-to-end service under hypercorn) or
plain synchronous code:

    with FakeDwp() as dwp:
        dwp.respond("GET", "/orders/42", FakeResponse.of_json({"id": 42}))
        ...  # point the code under test at dwp.base_url
        assert dwp.requests[0].headers["x-tenant-id"] == "acme"
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# serve_forever() notices a shutdown request only between polls; a short poll keeps teardown fast.
_POLL_SECONDS = 0.01
# A kept-alive connection whose client vanished must not pin a handler thread forever.
_IDLE_CONNECTION_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake backend received it. Header names are lower-cased; `path` and
    `query_string` are exactly as sent (still percent-encoded)."""

    method: str
    path: str
    query_string: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        """The body parsed as JSON (None when there was no body)."""
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True, slots=True)
class FakeResponse:
    """A scripted answer. `hang` keeps the connection open without answering until the server
    stops, to provoke the client's timeout."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    hang: bool = False

    @classmethod
    def of_json(cls, data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> FakeResponse:
        return cls(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    @classmethod
    def of_text(cls, text: str, status: int = 200, content_type: str = "text/plain; charset=utf-8") -> FakeResponse:
        return cls(status, text.encode(), {"Content-Type": content_type})

    @classmethod
    def redirect(cls, location: str, status: int = 302) -> FakeResponse:
        return cls(status, b"", {"Location": location})

    @classmethod
    def hanging(cls) -> FakeResponse:
        return cls(hang=True)


def _not_found(path: str) -> FakeResponse:
    # Shaped like Spring Boot's default error body, which the real backend answers with.
    return FakeResponse.of_json({"status": 404, "error": "Not Found", "path": path}, status=404)


class _BackloggedServer(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: a burst of tool calls from many concurrent runs
    # overflowed it and some connections were reset (httpx ReadError) before being accepted.
    request_queue_size = 1024


class FakeDwp:
    """The fake backend. Script answers per method and path with `respond`; a route answers its
    queued responses in order and then keeps repeating the last one. Unscripted routes answer 404."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._lock = threading.Lock()
        self._routes: dict[tuple[str, str], list[FakeResponse]] = {}
        self._requests: list[RecordedRequest] = []
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> FakeDwp:
        if self._server is not None:
            raise RuntimeError("the fake DWP backend is already running")
        self._stopping.clear()
        server = _BackloggedServer((self._host, 0), _handler_class(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": _POLL_SECONDS}, name="fake-dwp", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()  # releases hanging responses
        server.shutdown()
        server.server_close()
        thread.join()
        self._server = self._thread = None

    def __enter__(self) -> FakeDwp:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the fake DWP backend is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    # --- scripting and inspection -----------------------------------------------------------

    def respond(self, method: str, path: str, *responses: FakeResponse) -> None:
        """Queue answers for `method path` (path without query string, as sent)."""
        if not responses:
            raise ValueError("give at least one response")
        with self._lock:
            self._routes.setdefault((method.upper(), path), []).extend(responses)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        """Forget scripted answers and recorded requests (e.g. between end-to-end tests)."""
        with self._lock:
            self._routes.clear()
            self._requests.clear()

    def _answer(self, request: RecordedRequest) -> FakeResponse:
        with self._lock:
            self._requests.append(request)
            queued = self._routes.get((request.method, request.path))
            if not queued:
                return _not_found(request.path)
            return queued.pop(0) if len(queued) > 1 else queued[0]


def _handler_class(fake: FakeDwp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = _IDLE_CONNECTION_SECONDS
        # Head and body leave in one write, without Nagle's delay: each answer takes milliseconds, not 40.
        wbufsize = 1 << 16
        disable_nagle_algorithm = True

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            target = urlsplit(self.path)
            headers: dict[str, str] = {}
            for name, value in self.headers.items():
                key = name.lower()
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
            recorded = RecordedRequest(
                method=self.command,
                path=target.path,
                query_string=target.query,
                query=dict(parse_qsl(target.query, keep_blank_values=True)),
                headers=headers,
                body=body,
            )
            response = fake._answer(recorded)
            if response.hang:
                fake._stopping.wait()
                self.close_connection = True
                return
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            self.wfile.write(response.body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output quiet; the recorded requests say what happened

    return Handler
