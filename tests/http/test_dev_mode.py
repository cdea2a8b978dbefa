"""Dev mode is safe to type in production by mistake: it never signs with a configured key, and its
token-minting endpoint never issues a role that acts for or decides for other users."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from jose import jwt

from app.factory import create_app
from app.settings import Settings
from tests.support import SECRET, token


async def test_dev_mode_refuses_tokens_signed_with_the_configured_secret(
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(auth={"jwt_secret": SECRET, "dev_mode": True})
    assert settings.auth.jwt_secret is not None and settings.auth.jwt_secret.get_secret_value() != SECRET
    app = create_app(settings)
    async with app.test_app():
        client = app.test_client()
        production_token = token("alice")
        refused = await client.get("/aura/hitl/requests", headers={"Authorization": f"Bearer {production_token}"})
        assert refused.status_code == 401
        minted = await (await client.post("/aura/console/dev-token", json={"user": "alice"})).get_json()
        # what dev mode mints is useless anywhere the configured secret is trusted
        with pytest.raises(jwt.JWTError):
            jwt.decode(minted["token"], SECRET, algorithms=["HS256"])
        accepted = await client.get("/aura/hitl/requests", headers={"Authorization": f"Bearer {minted['token']}"})
        assert accepted.status_code == 200


def test_dev_mode_replaces_an_rs256_key_with_its_own_secret(make_settings: Callable[..., Settings],
                                                             tmp_path: object) -> None:
    settings = make_settings(auth={"algorithm": "RS256", "public_key_file": "/nonexistent.pem", "jwt_secret": None,
                                   "dev_mode": True})
    assert (settings.auth.algorithm, settings.auth.public_key_file) == ("HS256", None)
    assert settings.auth.jwt_secret is not None and len(settings.auth.jwt_secret.get_secret_value()) >= 32
    settings.check_startup()


@pytest.mark.parametrize("role", ["dwp-service", "admin", "manager"])
async def test_the_dev_token_endpoint_never_mints_trusted_service_or_approver_roles(
        make_settings: Callable[..., Settings], role: str) -> None:
    app = create_app(make_settings(auth={"dev_mode": True}))
    async with app.test_app():
        response = await app.test_client().post("/aura/console/dev-token", json={"role": role})
        assert response.status_code == 403
        assert (await response.get_json())["code"] == "role_not_mintable"


async def test_the_dev_token_endpoint_mints_other_roles_and_none_by_default(
        make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(auth={"dev_mode": True}))
    async with app.test_app():
        client = app.test_client()
        plain = await (await client.post("/aura/console/dev-token")).get_json()
        assert "role" not in jwt.get_unverified_claims(plain["token"])
        viewer = await (await client.post("/aura/console/dev-token", json={"role": "viewer"})).get_json()
        assert jwt.get_unverified_claims(viewer["token"])["role"] == "viewer"


async def test_the_dev_token_endpoint_is_off_outside_dev_mode(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings())
    async with app.test_app():
        response = await app.test_client().post("/aura/console/dev-token", json={})
        assert response.status_code == 404
