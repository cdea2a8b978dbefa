"""create_app(): the Quart application, wired from settings."""

from __future__ import annotations

import asyncio
import logging

from quart import Quart
from quart_schema import QuartSchema

from adapters.http.asgi import SendTimeoutMiddleware
from adapters.http.json_depth import install_depth_limited_json
from adapters.http.openapi import AuraOpenAPIProvider
from adapters.http.problems import register_problem_handlers
from adapters.http.routes import console, docs, health, hitl, runs, stream
from adapters.http.web import CorsPolicy, install_authentication, install_request_context, pass_responses_through
from app.container import Container, shutdown
from app.settings import Settings, load_settings
from domain.model.errors import StoreUnavailable

log = logging.getLogger("aura")


def create_app(settings: Settings | None = None, container: Container | None = None) -> Quart:
    settings = settings or load_settings()
    settings.check_startup()
    container = container or Container(settings=settings)

    app = Quart("aura")
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_body_bytes
    app.config["BODY_TIMEOUT"] = 30
    app.config["QUART_SCHEMA_CONVERT_CASING"] = False
    app.config["QUART_SCHEMA_SWAGGER_JS_URL"] = docs.SWAGGER_JS_URL
    app.config["QUART_SCHEMA_SWAGGER_CSS_URL"] = docs.SWAGGER_CSS_URL
    QuartSchema(
        app,
        info={"title": "Aura", "version": "1.0",
              "description": "The agent service of the DWP: streamed runs, tools and human approvals."},
        security_schemes={"bearer": {"type": "http", "scheme": "bearer", "bearer_format": "JWT"}},
        swagger_ui_path="/docs", redoc_ui_path=None, scalar_ui_path=None,
        openapi_provider_class=AuraOpenAPIProvider,
    )
    pass_responses_through(app)
    register_problem_handlers(app)
    install_depth_limited_json(app)
    install_request_context(app, CorsPolicy(frozenset(settings.server.cors_origins)))
    metrics = container.metrics()
    # Each route module's blueprint takes the providers of the services it uses: a provider call per
    # request, where dependency-injector's @inject added a resolver and a wrapper coroutine per call.
    protected = [stream.blueprint(container.run_access, container.stream_config),
                 hitl.blueprint(container.approval_desk),
                 runs.blueprint(container.run_access, container.stream_config)]
    install_authentication(app, container.authenticator(),
                           protected_blueprints={blueprint.name for blueprint in protected},
                           on_failure=metrics.auth_failed)

    app.register_blueprint(health.blueprint(container.health_probe, container.run_service, container.metrics,
                                            container.metrics_require_auth, container.authenticator))
    app.register_blueprint(docs.bp)
    # The console is public: its page holds no data, and its API calls carry a token.
    app.register_blueprint(console.blueprint(container.console_config))
    for blueprint in protected:
        app.register_blueprint(blueprint)

    preparing: set[asyncio.Task[None]] = set()

    @app.before_serving
    async def _start() -> None:
        run_service = container.run_service()
        container.run_control().listen(lambda run_id, reason: run_service.cancel(run_id, reason))
        # Lost runs are declared even when nobody follows them: every instance looks, once a lease.
        container.run_access().watch_for_lost_runs(settings.runs.lease_seconds)
        # The approval signals' one pattern subscription, before the first run waits on it.
        container.signal_bus().listen()
        preparing.add(asyncio.get_running_loop().create_task(_load_approval_scripts(container)))

    @app.after_serving
    async def _shutdown() -> None:
        for task in preparing:
            task.cancel()
        await shutdown(container)

    # Writes to a client that stopped reading must not block forever (hypercorn waits for the
    # socket to drain); past the timeout the connection is dropped and the run follows its policy.
    app.asgi_app = SendTimeoutMiddleware(  # type: ignore[method-assign, assignment]
        app.asgi_app, settings.stream.send_timeout_seconds)

    return app


async def _load_approval_scripts(container: Container) -> None:
    # In the background: an instance starts while Redis is away too (/ready says so meanwhile),
    # and a decision that finds its script missing loads it itself.
    try:
        await container.approval_store().load_scripts()
    except StoreUnavailable as exc:
        log.warning("could not load the approval scripts at start-up: %s", exc)
