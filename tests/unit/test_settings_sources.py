"""Where a setting's value comes from: the model's default, else a YAML file named by
AURA_CONFIG_FILE, else the environment, which wins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.settings import ConfigError, Settings, load_settings


@pytest.fixture(autouse=True)
def no_aura_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("AURA_")]:
        monkeypatch.delenv(name)


def test_without_a_file_or_environment_every_setting_is_the_models_default() -> None:
    loaded = load_settings()

    assert loaded.model_dump(mode="json") == Settings.model_construct().model_dump(mode="json")


def test_a_named_file_overrides_the_defaults_and_the_environment_overrides_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings_file = tmp_path / "aura.yaml"
    settings_file.write_text("server:\n  port: 9100\n  max_body_bytes: 4096\nhitl:\n  approver_roles: [lead]\n")
    monkeypatch.setenv("AURA_CONFIG_FILE", str(settings_file))
    monkeypatch.setenv("AURA_SERVER__PORT", "9200")

    loaded = load_settings()

    assert (loaded.server.port, loaded.server.max_body_bytes, loaded.hitl.approver_roles) == (9200, 4096, ["lead"])
    assert loaded.server.host == Settings.model_construct().server.host


def test_a_named_file_that_is_missing_stops_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AURA_CONFIG_FILE", str(tmp_path / "absent.yaml"))

    with pytest.raises(ConfigError, match="does not exist or is not a file"):
        load_settings()


def test_an_approval_wait_longer_than_the_requests_life_in_redis_stops_start_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AURA_HITL__TIMEOUT_SECONDS", "1801")

    with pytest.raises(ConfigError, match="AURA_HITL__TIMEOUT_SECONDS"):
        load_settings()

    monkeypatch.setenv("AURA_HITL__TIMEOUT_SECONDS", "1800")
    assert load_settings().hitl.timeout_seconds == 1800


def test_replica_confirmations_without_a_redis_url_stop_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AURA_REDIS__WAIT_REPLICAS", "1")

    with pytest.raises(ConfigError, match="the in-process Redis has no replicas"):
        load_settings()

    monkeypatch.setenv("AURA_REDIS__URL", "redis://127.0.0.1:6379/0")
    assert load_settings().redis.confirming_replicas == 1


def test_a_replica_wait_longer_than_half_the_socket_timeout_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # The socket timeout (5 s) bounds the read of a whole batch, its WAIT included.
    monkeypatch.setenv("AURA_REDIS__URL", "redis+sentinel://127.0.0.1:26379/aura")
    monkeypatch.setenv("AURA_REDIS__WAIT_TIMEOUT_MS", "2501")

    with pytest.raises(ConfigError, match=r"^AURA_REDIS__WAIT_TIMEOUT_MS: 2501 ms is more than 2500 ms, half the "
                                          r"Redis socket timeout \(5 s\)"):
        load_settings()

    monkeypatch.setenv("AURA_REDIS__WAIT_TIMEOUT_MS", "2500")
    assert load_settings().redis.wait_timeout_ms == 2500
