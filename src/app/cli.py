"""The `aura` command line: serve, token, stream."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from adapters.jwt import mint_token
from app.settings import ConfigError, ServerSettings, Settings, load_settings, unknown_environment

DEV_USER, DEV_TENANT = "dev-user", "dev-tenant"


def _settings_for_serve(args: argparse.Namespace) -> Settings:
    if args.dev:
        os.environ.setdefault("AURA_LOG__FORMAT", "console")
        # dev mode mints tokens for anyone who asks: reachable from this machine only, unless told
        os.environ.setdefault("AURA_SERVER__HOST", "127.0.0.1")
        # the settings then replace any configured key with a throw-away secret
        os.environ["AURA_AUTH__DEV_MODE"] = "true"
        if "AURA_TOOLS__WORKSPACE_ROOT" not in os.environ:
            from app.demo import demo_workspace

            args.demo_workspace = demo_workspace()
            if args.demo_workspace is not None:
                os.environ["AURA_TOOLS__WORKSPACE_ROOT"] = str(args.demo_workspace)
    if args.host:
        os.environ["AURA_SERVER__HOST"] = args.host
    if args.port:
        os.environ["AURA_SERVER__PORT"] = str(args.port)
    return load_settings()


def _dev_banner(settings: Settings, demo: bool) -> str:
    assert settings.auth.jwt_secret is not None
    token = mint_token(key=settings.auth.jwt_secret.get_secret_value(), algorithm=settings.auth.algorithm,
                       sub=DEV_USER, tenant_id=DEV_TENANT, ttl_seconds=12 * 3600)
    host = settings.server.host
    any_address = host in ("0.0.0.0", "::", "")  # nosec B104 # compares, binds nothing
    base = f"http://{'127.0.0.1' if any_address else host}:{settings.server.port}"
    workspace = f"{settings.tools.workspace_root.resolve()}{' (throw-away, with a repository demo)' if demo else ''}"
    return (f"\nAura dev mode on {host}:{settings.server.port}: in-process Redis="
            f"{'no' if settings.redis.url else 'yes'}, model={settings.model.provider}, "
            f"workspace={workspace}\n"
            "Tokens are signed with a throw-away secret: no configured key is used, and they die with "
            "this process.\n"
            f"Dev token (user {DEV_USER}, tenant {DEV_TENANT}, 12 h):\n\n{token}\n\n"
            f"Try:\n  export AURA_TOKEN={token}\n"
            f"  curl -N -X POST {base}/aura/test/stream -H \"Authorization: Bearer $AURA_TOKEN\" "
            f"-H 'Content-Type: application/json' -d '{{\"prompt\": \"What changed in this repo?\"}}'\n"
            f"  AURA_URL={base} {sys.argv[0]} stream '@git_log {{\"repo_path\": \"demo\"}}'\n"
            f"  open {base}/aura/console\n")


class CannotListen(Exception):
    """The listen address cannot be bound (in use, unknown host, not this machine's, no permission)."""


async def _serve(settings: Settings) -> None:
    from hypercorn.asyncio.run import worker_serve
    from hypercorn.config import Config
    from hypercorn.utils import wrap_app

    from app.container import Container
    from app.factory import create_app

    config = Config()
    address = f"{settings.server.host}:{settings.server.port}"
    config.bind = [address]
    config.graceful_timeout = settings.server.graceful_timeout_seconds
    config.accesslog = None
    config.keep_alive_timeout = settings.server.keep_alive_timeout_seconds
    config.backlog = settings.server.listen_backlog
    try:
        # bound before anything starts, so a taken port or a bad host is one line, not a traceback
        sockets = config.create_sockets()
    except OSError as exc:  # socket.gaierror included
        raise CannotListen(f"cannot listen on {address}: {exc.strerror or exc}") from None
    container = Container(settings=settings)
    app = create_app(settings, container)
    gc.freeze()  # what start-up built lives as long as the process: no collection needs to scan it
    stop_requested = asyncio.Event()
    stop_serving = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)

    async def drain_then_stop() -> None:
        # hypercorn waits for open responses before it stops, and SSE responses never end by
        # themselves: end every run first (each stream gets `end` server_shutdown + [DONE]),
        # then let hypercorn close what is left within its graceful timeout.
        await stop_requested.wait()
        run_service = container.run_service()
        try:
            await asyncio.wait_for(run_service.shutdown("server_shutdown"),
                                   timeout=settings.server.graceful_timeout_seconds / 2)
        except TimeoutError:
            logging.getLogger("aura").warning("runs did not all end within half the grace period")
        stop_serving.set()

    drainer = asyncio.create_task(drain_then_stop())
    try:
        # hypercorn's own serve() with the sockets bound above
        await worker_serve(wrap_app(app, config.wsgi_max_body_size, "asgi"), config, sockets=sockets,
                           shutdown_trigger=stop_serving.wait)
    finally:
        drainer.cancel()


def cmd_serve(args: argparse.Namespace) -> int:
    from app.logging_setup import configure_logging

    try:
        settings = _settings_for_serve(args)
        settings.check_startup()
    except ConfigError as exc:
        print(f"aura: cannot start: {exc}", file=sys.stderr)
        return 2
    for line in unknown_environment(os.environ):
        print(f"aura: warning: {line}", file=sys.stderr)
    configure_logging(settings.log.level, settings.log.format)
    if settings.auth.dev_mode:
        print(_dev_banner(settings, demo=getattr(args, "demo_workspace", None) is not None), file=sys.stderr,
              flush=True)
    try:
        loop_factory = _loop_factory(settings.server.event_loop)
    except ImportError:
        print("aura: cannot start: AURA_SERVER__EVENT_LOOP=uvloop but uvloop is not installed", file=sys.stderr)
        return 2
    if settings.server.gc_threshold:
        # Every collection of the oldest generation scans every live object, and a busy server
        # holds many (streams, runs, buffers): at 1,000 streams Python's default thresholds cost
        # about a fifth of the CPU (bench). Collect less often; cycles are still collected.
        _, middle, oldest = gc.get_threshold()
        gc.set_threshold(settings.server.gc_threshold, max(middle, 20), max(oldest, 100))
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve(settings))
    except CannotListen as exc:
        print(f"aura: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop runs the same asyncio code on libuv with about a fifth less CPU under load
    (bench: options); `auto` uses it where it is installed, plain asyncio elsewhere."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def cmd_token(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.private_key_file:
        key, algorithm = Path(args.private_key_file).read_text(), settings.auth.algorithm
    elif settings.auth.jwt_secret is not None:
        key, algorithm = settings.auth.jwt_secret.get_secret_value(), settings.auth.algorithm
    else:
        print("aura: set AURA_AUTH__JWT_SECRET (or pass --private-key-file for RS*)", file=sys.stderr)
        return 2
    extra: dict[str, Any] = {}
    token = mint_token(key=key, algorithm=algorithm, sub=args.sub, tenant_id=args.tenant, role=args.role,
                       email=args.email, ttl_seconds=args.ttl, issuer=settings.auth.issuer,
                       audience=settings.auth.audience, extra=extra or None)
    print(token)
    return 0


def _format_event(event_type: str, payload: dict[str, Any]) -> str:
    data = payload.get("data", {})
    seq = payload.get("seq")
    if event_type == "content":
        return "" if data.get("chunk") else f"[{seq}] answer:\n{data.get('content')}"
    if event_type == "thought":  # a streamed thought's pieces are followed by its whole text
        return "" if data.get("chunk") else f"[{seq}] thought/{data.get('thoughtType')}: {data.get('content')}"
    if event_type == "plan_step":
        return f"[{seq}] plan {data.get('index')}. {data.get('description')}"
    if event_type == "plan_step_update":
        return f"[{seq}] step {data.get('stepId')} → {data.get('status')} {data.get('note') or ''}".rstrip()
    if event_type == "timeline_step_update":
        return f"[{seq}] timeline {data.get('title')}: {data.get('status')}"
    if event_type == "tool_execution":
        extra = f" error={data.get('error')}" if data.get("error") else ""
        return f"[{seq}] tool {data.get('toolName')} {data.get('status')}{extra}"
    if event_type == "hitl":
        return (f"[{seq}] WAITING FOR APPROVAL {data.get('requestId')}: {data.get('message')}\n"
                f"       approve: aura approve {data.get('requestId')}")
    if event_type == "error":
        return f"[{seq}] ERROR {data.get('errorType')}: {data.get('message')}"
    return f"[{seq}] {event_type}: {json.dumps(data, ensure_ascii=False)}"


def _token_for_client(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get("AURA_TOKEN")
    if token:
        return token
    settings = load_settings()
    if settings.auth.jwt_secret is None:
        raise SystemExit("aura: pass --token, set AURA_TOKEN, or set AURA_AUTH__JWT_SECRET to mint one")
    return mint_token(key=settings.auth.jwt_secret.get_secret_value(), algorithm=settings.auth.algorithm,
                      sub=args.user, tenant_id=args.tenant, ttl_seconds=3600)


def cmd_stream(args: argparse.Namespace) -> int:
    import httpx
    from httpx_sse import connect_sse

    try:
        context = json.loads(args.context) if args.context else {}
    except ValueError:
        print("aura: --context must be JSON", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"prompt": args.prompt, "context": context}
    if args.thread:
        body["thread_id"] = args.thread
    headers = {"Authorization": f"Bearer {_token_for_client(args)}"}
    status, run_id = "unknown", None

    def interrupted(_signum: int, _frame: object) -> None:
        # Ends the process here: a KeyboardInterrupt raised inside httpx's connection pool can
        # leave its lock held, and closing the client on the way out then hangs.
        sys.stdout.flush()
        print(f"\naura: interrupted: stopped reading {f'run {run_id}' if run_id else 'the run'}",
              file=sys.stderr, flush=True)
        os._exit(130)

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        with httpx.Client(base_url=args.url, timeout=httpx.Timeout(10.0, read=None)) as client, \
                connect_sse(client, "POST", "/aura/test/stream", json=body, headers=headers) as source:
            if source.response.status_code != 200:
                source.response.read()
                print(_problem_line(source.response.status_code, _json_or_text(source.response)), file=sys.stderr)
                return 1
            for sse in source.iter_sse():
                if not sse.data:
                    continue  # a heartbeat: parsers that dispatch on the blank line after `: ping` give no data
                if sse.data == "[DONE]":
                    break
                payload = json.loads(sse.data)
                run_id = run_id or payload.get("runId")
                if sse.event == "content" and payload["data"].get("chunk"):
                    continue
                line = _format_event(sse.event, payload)
                if line:
                    print(line, flush=True)
                if sse.event == "end":
                    status = payload["data"].get("status", "unknown")
    except httpx.TransportError as exc:
        print(f"aura: {_transport_problem(args.url, exc)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0 if status == "completed" else 1


def _transport_problem(url: str, exc: Exception) -> str:
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return f"cannot reach {url}: is the service running? ({_reason(exc)})"
    return f"lost the connection to {url}: {_reason(exc)}"


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.rsplit("] ", 1)[-1]  # "[Errno 111] Connection refused" -> "Connection refused"


def _json_or_text(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"detail": response.text[:200]}


def _api(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {_token_for_client(args)}"}
    try:
        response = httpx.request(method, f"{args.url}{path}", json=body, headers=headers, timeout=10)
    except httpx.TransportError as exc:
        raise SystemExit(f"aura: {_transport_problem(args.url, exc)}") from None
    return response.status_code, _json_or_text(response)


def _problem_line(status: int, body: Any) -> str:
    return f"aura: HTTP {status} {body.get('code', '')}: {body.get('detail', '')}".rstrip()


def cmd_requests(args: argparse.Namespace) -> int:
    status, body = _api(args, "GET", "/aura/hitl/requests")
    if status != 200:
        print(_problem_line(status, body), file=sys.stderr)
        return 1
    requests = body["requests"]
    if not requests:
        print("No pending approvals.")
    now = time.time()
    for item in requests:
        print(f"{item['requestId']}  {item['toolName']}  {_expiry(item['expiresAt'], now)}  {item['message']}")
    return 0


def _expiry(expires_at: float, now: float) -> str:
    """`expires 14:03:10 (in 4m 50s)`: the local wall time and what is left of the wait."""
    clock = datetime.fromtimestamp(expires_at).astimezone().strftime("%H:%M:%S")
    left = int(expires_at - now)
    if left <= 0:
        return f"expired {clock}"
    minutes, seconds = divmod(left, 60)
    return f"expires {clock} (in {f'{minutes}m ' if minutes else ''}{seconds}s)"


def _decide(args: argparse.Namespace, approve: bool) -> int:
    path = f"/aura/hitl/{'approve' if approve else 'reject'}/{args.request_id}"
    status, body = _api(args, "POST", path, None if approve else {"reason": args.reason})
    if status == 200:
        print(f"{body['requestId']} {body['status']} by {body['decidedBy']}")
        return 0
    print(_problem_line(status, body) + (f" (already {body['requestStatus']})" if status == 409 else ""),
          file=sys.stderr)
    return {404: 3, 409: 4, 410: 5}.get(status, 1)


def cmd_approve(args: argparse.Namespace) -> int:
    return _decide(args, approve=True)


def cmd_reject(args: argparse.Namespace) -> int:
    return _decide(args, approve=False)


def _client_options(parser: argparse.ArgumentParser) -> None:
    local = f"http://127.0.0.1:{ServerSettings().port}"  # a service started here with the default port
    parser.add_argument("--url", default=os.environ.get("AURA_URL", local))
    parser.add_argument("--token", help="bearer token (default: $AURA_TOKEN, or minted from the secret)")
    parser.add_argument("--user", default=DEV_USER)
    parser.add_argument("--tenant", default=DEV_TENANT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aura", description="Aura, the agent service of the DWP.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service under hypercorn")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--dev", action="store_true",
                       help="dev mode: listens on 127.0.0.1, signs with a throw-away secret (never a configured "
                            "one), prints a ready-to-use token, console logs")
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="mint a token with the configured secret")
    token.add_argument("--sub", required=True)
    token.add_argument("--tenant", required=True)
    token.add_argument("--role")
    token.add_argument("--email")
    token.add_argument("--ttl", type=int, default=3600)
    token.add_argument("--private-key-file", help="PEM private key, for RS* algorithms")
    token.set_defaults(func=cmd_token)

    stream = sub.add_parser("stream", help="stream a run and print it readably")
    stream.add_argument("prompt")
    stream.add_argument("--context", help="page context as JSON")
    stream.add_argument("--thread")
    _client_options(stream)
    stream.set_defaults(func=cmd_stream)

    pending = sub.add_parser("requests", help="list your pending approvals")
    _client_options(pending)
    pending.set_defaults(func=cmd_requests)

    approve = sub.add_parser("approve", help="approve a pending request (exit 4 if decided, 5 if expired)")
    approve.add_argument("request_id")
    _client_options(approve)
    approve.set_defaults(func=cmd_approve)

    reject = sub.add_parser("reject", help="reject a pending request")
    reject.add_argument("request_id")
    reject.add_argument("--reason", default=None)
    _client_options(reject)
    reject.set_defaults(func=cmd_reject)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"aura: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\naura: interrupted", file=sys.stderr)
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
