"""Every way a caller can fail authentication, at the HTTP edge: exact status and problem code."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dependency_injector import providers
from jose import jwt
from quart import Quart, g, request

from app.container import Container
from app.factory import create_app
from app.settings import Settings
from domain.model.ports import Clock
from tests.http.live import open_stream
from tests.support import SECRET, token

STREAM = "/aura/test/stream"
NOW = int(time.time())


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def raw(claims: dict[str, Any], *, key: str = SECRET, alg: str = "HS256", headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def claims(**overrides: Any) -> dict[str, Any]:
    # valid for hours, so a slow suite (collection to this test) never sees it expire
    base = {"sub": "alice", "tenant_id": "acme", "exp": NOW + 4 * 3600, "iat": NOW}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PRIVATE = RSA_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
RSA_PUBLIC = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()

# (case id, Authorization header or None, extra headers, expected status, expected code)
HS_CASES: list[tuple[str, str | None, dict[str, str], int, str]] = [
    ("missing header", None, {}, 401, "missing_token"),
    ("basic scheme", "Basic YWxpY2U6cHc=", {}, 401, "malformed_token"),
    ("bearer without token", "Bearer ", {}, 401, "malformed_token"),
    ("garbage", "Bearer not-a-jwt", {}, 401, "malformed_token"),
    ("two segments", "Bearer aaa.bbb", {}, 401, "malformed_token"),
    ("truncated mid-character", "Bearer " + raw(claims())[:-10], {}, 401, "malformed_token"),
    ("truncated signature", "Bearer " + raw(claims())[:-12], {}, 401, "invalid_signature"),
    ("payload swapped", "Bearer " + ".".join([raw(claims()).split(".")[0], b64(claims(sub="root")),
                                             raw(claims()).split(".")[2]]), {}, 401, "invalid_signature"),
    ("oversized", "Bearer " + raw(claims(pad="x" * 9000)), {}, 401, "malformed_token"),
    ("wrong secret", "Bearer " + raw(claims(), key="another-secret-that-is-also-long-enough-123"), {}, 401,
     "invalid_signature"),
    ("alg none", "Bearer " + b64({"alg": "none", "typ": "JWT"}) + "." + b64(claims()) + ".", {}, 401,
     "unsupported_algorithm"),
    ("HS384 to HS256 verifier", "Bearer " + raw(claims(), alg="HS384"), {}, 401, "unsupported_algorithm"),
    ("RS256 to HS256 verifier", "Bearer " + raw(claims(), key=RSA_PRIVATE, alg="RS256"), {}, 401,
     "unsupported_algorithm"),
    ("expired", "Bearer " + raw(claims(exp=NOW - 3600)), {}, 401, "token_expired"),
    ("not yet valid", "Bearer " + raw(claims(nbf=NOW + 3600)), {}, 401, "token_not_yet_valid"),
    ("issued in the future", "Bearer " + raw(claims(iat=NOW + 3600)), {}, 401, "token_not_yet_valid"),
    ("no exp", "Bearer " + raw(claims(exp=None)), {}, 401, "missing_claim"),
    ("no sub", "Bearer " + raw(claims(sub=None)), {}, 401, "missing_claim"),
    ("no tenant_id", "Bearer " + raw(claims(tenant_id=None)), {}, 401, "missing_claim"),
    ("numeric tenant_id", "Bearer " + raw(claims(tenant_id=42)), {}, 401, "invalid_claim"),
    ("empty sub", "Bearer " + raw(claims(sub="")), {}, 401, "invalid_claim"),
    ("exp as text", "Bearer " + raw(claims(exp="tomorrow")), {}, 401, "invalid_claim"),
    ("exp 10^30", "Bearer " + raw(claims(exp=10**30)), {}, 401, "token_lifetime_too_long"),
    ("exp 10^30 without iat", "Bearer " + raw(claims(exp=10**30, iat=None)), {}, 401, "token_lifetime_too_long"),
    ("lifetime a second over a day", "Bearer " + raw(claims(iat=NOW - 60, exp=NOW - 60 + 86_401)), {}, 401,
     "token_lifetime_too_long"),
    ("issued long ago, valid for two more days", "Bearer " + raw(claims(iat=None, exp=NOW + 2 * 86_400)), {}, 401,
     "token_lifetime_too_long"),
    ("tenant header mismatch", "Bearer " + token(), {"X-Tenant-ID": "globex"}, 403, "tenant_mismatch"),
    ("user header mismatch", "Bearer " + token(), {"X-User-ID": "bob"}, 403, "user_mismatch"),
    ("untrusted role impersonates", "Bearer " + token("svc", role="admin"), {"X-User-ID": "bob"}, 403,
     "user_mismatch"),
]


@pytest.mark.parametrize(("authorization", "headers", "status", "code"),
                         [c[1:] for c in HS_CASES], ids=[c[0] for c in HS_CASES])
async def test_refused_callers_get_exact_problems(client: Any, authorization: str | None, headers: dict[str, str],
                                                  status: int, code: str) -> None:
    all_headers = dict(headers)
    if authorization is not None:
        all_headers["Authorization"] = authorization
    response = await client.post(STREAM, json={"prompt": "x" * 100}, headers=all_headers)
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = await response.get_json()
    assert (problem["status"], problem["code"]) == (status, code)
    assert set(problem) == {"type", "title", "status", "detail", "code", "traceId"}
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    credential = (authorization or "").split(" ", 1)[-1]
    if len(credential) >= 8:
        assert credential[:40] not in json.dumps(problem)  # no token echo


async def test_matching_headers_are_accepted(client: Any) -> None:
    response = await client.post(STREAM, json={"prompt": "hi"},
                                 headers={"Authorization": f"Bearer {token()}", "X-Tenant-ID": "acme",
                                          "X-User-ID": "alice"})
    assert response.status_code == 200
    await response.get_data()


async def test_trusted_service_role_acts_for_the_named_user(app: Quart) -> None:
    service = token("dwp-backend", role="dwp-service")
    context, live = await open_stream(app, '@git_commit {"repo_path": "repo", "message": "m"}',
                                      headers={"Authorization": f"Bearer {service}", "X-User-ID": "bob"})
    hitl = await live.until("hitl")
    client = app.test_client()
    request_id = hitl["data"]["requestId"]
    # the run belongs to bob: bob sees its approval request, alice (same tenant) may not
    as_bob = await client.get(f"/aura/hitl/requests/{request_id}", headers={"Authorization": f"Bearer {token('bob')}"})
    assert as_bob.status_code == 200 and (await as_bob.get_json())["userId"] == "bob"
    as_alice = await client.get(f"/aura/hitl/requests/{request_id}", headers={"Authorization": f"Bearer {token()}"})
    assert as_alice.status_code == 404  # as for an unknown id
    await client.post(f"/aura/hitl/reject/{request_id}", headers={"Authorization": f"Bearer {token('bob')}"})
    await live.rest()
    await context.__aexit__(None, None, None)


@pytest.fixture
def rs_app(make_settings: Callable[..., Settings], tmp_path: Path) -> Quart:
    key_file = tmp_path / "public.pem"
    key_file.write_text(RSA_PUBLIC)
    return create_app(make_settings(auth={"jwt_secret": None, "algorithm": "RS256",
                                          "public_key_file": str(key_file)}))


async def test_rs256_tokens_are_verified_with_the_public_key(rs_app: Quart) -> None:
    client = rs_app.test_client()
    good = await client.post(STREAM, json={"prompt": "hi"},
                             headers={"Authorization": "Bearer " + raw(claims(), key=RSA_PRIVATE, alg="RS256")})
    assert good.status_code == 200
    await good.get_data()
    # the classic confusion: an HS256 token whose "secret" is the public key
    forged = "Bearer " + b64({"alg": "HS256", "typ": "JWT"}) + "." + b64(claims()) + ".c2lnbmF0dXJl"
    confused = await client.post(STREAM, json={"prompt": "hi"}, headers={"Authorization": forged})
    assert confused.status_code == 401 and (await confused.get_json())["code"] == "unsupported_algorithm"


@pytest.mark.parametrize(("extra", "code"), [
    ({"iss": "https://idp.dwp", "aud": "someone-else"}, "invalid_audience"),
    ({"iss": "https://evil", "aud": "aura"}, "invalid_issuer"),
    ({"aud": "aura"}, "invalid_issuer"),
    ({"iss": "https://idp.dwp"}, "invalid_audience"),
])
async def test_issuer_and_audience_are_checked_when_configured(make_settings: Callable[..., Settings],
                                                               extra: dict[str, str], code: str) -> None:
    app = create_app(make_settings(auth={"issuer": "https://idp.dwp", "audience": "aura"}))
    client = app.test_client()
    refused = await client.post(STREAM, json={"prompt": "hi"}, headers={"Authorization": "Bearer " + raw(
        claims(**extra))})
    assert refused.status_code == 401 and (await refused.get_json())["code"] == code
    accepted = await client.post(STREAM, json={"prompt": "hi"}, headers={"Authorization": "Bearer " + raw(
        claims(iss="https://idp.dwp", aud=["aura", "other"]))})
    assert accepted.status_code == 200
    await accepted.get_data()


def test_startup_refuses_a_short_secret(make_settings: Callable[..., Settings]) -> None:
    from app.settings import ConfigError

    with pytest.raises(ConfigError, match="AURA_AUTH__JWT_SECRET is missing or shorter than 32 bytes"):
        create_app(make_settings(auth={"jwt_secret": "short"}))
    with pytest.raises(ConfigError, match="AURA_AUTH__JWT_SECRET"):
        create_app(make_settings(auth={"jwt_secret": None}))
    create_app(make_settings(auth={"jwt_secret": "short", "dev_mode": True}))  # dev mode may


async def test_a_verified_token_leaves_the_request_and_stays_with_the_caller(app: Quart) -> None:
    bearer = token("bob")
    seen: dict[str, Any] = {}

    @app.after_request
    async def _look(response: Any) -> Any:
        seen.update(token=g.bearer_token, user=g.principal.user_id, headers=dict(request.headers),
                    scope=[name for name, _ in request.scope["headers"]])
        return response

    response = await app.test_client().get("/aura/hitl/requests/req_x", headers={"Authorization": f"Bearer {bearer}"})
    assert response.status_code == 404
    # kept once, for the tools that forward it; gone from Quart's headers and from the ASGI scope
    assert seen["token"] == bearer and seen["user"] == "bob"
    assert "Authorization" not in seen["headers"] and "User-Agent" in seen["headers"]
    assert b"authorization" not in [name.lower() for name in seen["scope"]] and seen["scope"]


@pytest.mark.parametrize(("lifetime", "status"), [(86_400, 200), (86_400 + 1, 401)])
async def test_a_token_of_exactly_the_maximum_age_is_accepted(client: Any, lifetime: int, status: int) -> None:
    response = await client.get("/aura/hitl/requests",
                                headers={"Authorization": "Bearer " + raw(claims(iat=NOW, exp=NOW + lifetime))})
    assert response.status_code == status


async def test_the_maximum_token_age_is_a_setting(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(auth={"max_token_age_seconds": 600}))
    client = app.test_client()
    short = await client.get("/aura/hitl/requests", headers={"Authorization": f"Bearer {token(ttl_seconds=600)}"})
    hour = await client.get("/aura/hitl/requests", headers={"Authorization": f"Bearer {token(ttl_seconds=3600)}"})
    assert short.status_code == 200
    assert hour.status_code == 401 and (await hour.get_json())["code"] == "token_lifetime_too_long"


class MovingClock(Clock):
    def __init__(self, now: float) -> None:
        self.at = now

    def now(self) -> float:
        return self.at


async def test_a_token_verified_before_is_refused_once_expired_with_the_same_problem(
        make_settings: Callable[..., Settings]) -> None:
    """The verifier remembers verified tokens; a remembered one still expires on time, and the
    caller gets exactly the problem an unremembered expired token gets."""
    clock = MovingClock(NOW)
    container = Container(settings=make_settings())
    container.clock.override(providers.Object(clock))
    client = create_app(container.settings(), container).test_client()
    fresh = raw(claims(exp=NOW + 600))
    leeway = make_settings().auth.leeway_seconds

    for _ in range(2):
        accepted = await client.get("/aura/hitl/requests", headers={"Authorization": f"Bearer {fresh}"})
        assert accepted.status_code == 200
    clock.at = NOW + 600 + leeway
    remembered = await client.get("/aura/hitl/requests", headers={"Authorization": f"Bearer {fresh}"})
    never_seen = await client.get("/aura/hitl/requests",
                                  headers={"Authorization": "Bearer " + raw(claims(exp=NOW + 600, jti="other"))})

    for response in (remembered, never_seen):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token", error_description="token_expired"'
        problem = await response.get_json()
        del problem["traceId"]
        assert problem == {"type": "https://dwp.example/problems/token_expired", "title": "Unauthorized",
                           "status": 401, "detail": "The token has expired.", "code": "token_expired"}


async def test_a_verified_token_with_a_changed_signature_is_refused(client: Any) -> None:
    good = raw(claims())
    assert (await client.get("/aura/hitl/requests", headers={"Authorization": f"Bearer {good}"})).status_code == 200
    at = len(good) - 10
    forged = good[:at] + ("A" if good[at] != "A" else "B") + good[at + 1:]

    response = await client.get("/aura/hitl/requests", headers={"Authorization": f"Bearer {forged}"})

    assert response.status_code == 401 and (await response.get_json())["code"] == "invalid_signature"
