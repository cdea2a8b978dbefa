"""The deployment files say what Aura needs. Docker cannot run here, so these read the files:
the compose file and the gateway route parse and carry the values the contract asks for, every
AURA_* variable they set is a real setting, and the Dockerfile is multi-stage, non-root, with a
health check. (The nginx site config runs for real in test_nginx.py.)"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def env_names() -> set[str]:
    spec = importlib.util.spec_from_file_location("settings_table", REPO / "scripts" / "settings_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names: set[str] = module.env_names()
    return names


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_compose_runs_redis_two_instances_on_it_and_nginx_as_the_gateway() -> None:
    compose = load(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert sorted(services) == ["aura-1", "aura-2", "gateway", "redis"]
    first, second = services["aura-1"], services["aura-2"]
    assert first["environment"] == second["environment"]  # same secret, same Redis
    env = first["environment"]
    assert env["AURA_REDIS__URL"] == "redis://redis:6379/0"
    assert env["AURA_AUTH__JWT_SECRET"].startswith("${AURA_JWT_SECRET:?")
    assert set(env) <= env_names()
    for aura in (first, second):
        assert aura["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert aura["depends_on"] == {"redis": {"condition": "service_healthy"}}
        assert aura["volumes"] == ["workspace:/workspace"]
    gateway = services["gateway"]
    assert gateway["ports"] == ["8080:8080"]
    assert gateway["volumes"] == ["./nginx/aura.conf:/etc/nginx/conf.d/default.conf:ro"]
    assert (DEPLOY / "nginx" / "aura.conf").is_file()


def test_the_gateway_route_strips_the_prefix_limits_the_body_and_lets_streams_live() -> None:
    gateway = load(DEPLOY / "gateway" / "application.yml")["spring"]["cloud"]["gateway"]
    assert gateway["httpclient"]["response-timeout"] == "300s"
    routes = {route["id"]: route for route in gateway["routes"]}
    assert list(routes) == ["aura-streams", "aura"]
    streams, rest = routes["aura-streams"], routes["aura"]
    assert streams["predicates"] == ["Path=/api/aura/test/stream,/api/aura/runs/*/events"]
    assert rest["predicates"] == ["Path=/api/aura/**"]
    assert streams["order"] < rest.get("order", 0)
    for route in (streams, rest):
        assert route["filters"][0] == "StripPrefix=1"
        assert route["filters"][1] == {"name": "RequestSize", "args": {"maxSize": "256KB"}}
    # a stream may last as long as Aura keeps a connection (AURA_STREAM__MAX_STREAM_SECONDS)
    from app.settings import StreamSettings

    assert streams["metadata"]["response-timeout"] == int(StreamSettings().max_stream_seconds * 1000)
    assert "response-timeout" not in rest.get("metadata", {})


def test_the_dockerfile_builds_a_wheel_and_runs_it_as_a_non_root_user() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM (\S+) AS (\S+)$", text, re.M)
    assert stages == [("${PYTHON_IMAGE}", "build"), ("${PYTHON_IMAGE}", "runtime")]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert "uv export --frozen --no-dev --no-emit-project" in text  # the lock's versions, nothing resolved anew
    assert "pip wheel --require-hashes" in text and "--require-hashes --requirement /wheels/requirements.txt" in text
    assert "python -m venv /opt/aura" in text and "--no-index --no-deps /wheels/aura-*.whl" in text
    assert re.findall(r"^USER (.+)$", text, re.M) == ["10001:10001"]
    assert re.findall(r"^EXPOSE (.+)$", text, re.M) == ["9000"]
    assert "HEALTHCHECK" in text and "/health" in text
    assert re.findall(r"^CMD (.+)$", text, re.M) == ['["aura", "serve"]']
    for name in re.findall(r"\b(AURA_[A-Z_]+)=", text):
        assert name in env_names() | {"AURA_CONFIG_FILE"}, name
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    assert ignored[ignored.index("*") + 1:ignored.index("*") + 6] == [
        "!pyproject.toml", "!uv.lock", "!README.md", "!src/", "!config/hypercorn.toml"]


def test_the_nginx_site_has_the_sse_settings() -> None:
    site = (DEPLOY / "nginx" / "aura.conf").read_text(encoding="utf-8")
    directives = {line.strip().rstrip(";") for line in site.splitlines()
                  if line.strip() and not line.strip().startswith("#")}
    assert {"location /api/aura/ {", "proxy_pass http://aura/aura/", "proxy_http_version 1.1",
            'proxy_set_header Connection ""', "client_max_body_size 256k", "proxy_read_timeout 60s"} <= directives
    assert not any(d.startswith(("proxy_buffering", "proxy_ignore_headers")) for d in directives)
    from app.settings import StreamSettings

    read_timeout = next(int(d.split()[1].rstrip("s")) for d in directives if d.startswith("proxy_read_timeout"))
    assert read_timeout >= 4 * StreamSettings().heartbeat_seconds  # outlasts a few missed heartbeats
