from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.aura_process import AuraProcess
from tests.conftest import Store
from tests.redis_server import RedisServer
from tests.support import make_repo


@pytest.fixture
def e2e_workspace(tmp_path: Path) -> Path:
    root = tmp_path / "workspace"
    make_repo(root / "repo")
    return root


@pytest.fixture
def start_aura(e2e_workspace: Path, tmp_path: Path) -> Iterator[Callable[..., AuraProcess]]:
    started: list[AuraProcess] = []

    def start(**kwargs: Any) -> AuraProcess:
        name = f"aura-{len(started)}"
        process = AuraProcess(workspace=e2e_workspace, log_path=tmp_path / f"{name}.log", **kwargs)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def cluster(start_aura: Callable[..., AuraProcess], redis_server: RedisServer,
            clean_redis: redis.Redis) -> Callable[..., tuple[AuraProcess, AuraProcess]]:
    def start(**env: str) -> tuple[AuraProcess, AuraProcess]:
        a = start_aura(redis_url=redis_server.url, env={"AURA_RUNS__INSTANCE_ID": "aura-a", **env})
        b = start_aura(redis_url=redis_server.url, env={"AURA_RUNS__INSTANCE_ID": "aura-b", **env})
        return a, b
    return start


@pytest.fixture
def instances(start_aura: Callable[..., AuraProcess], store: Store) -> Callable[..., tuple[AuraProcess, AuraProcess]]:
    """Two Aura instances on one Redis: once a redis-server, once a 3-master Redis Cluster."""
    def start(**env: str) -> tuple[AuraProcess, AuraProcess]:
        a = start_aura(redis_url=store.url, env={"AURA_RUNS__INSTANCE_ID": "aura-a", **env})
        b = start_aura(redis_url=store.url, env={"AURA_RUNS__INSTANCE_ID": "aura-b", **env})
        return a, b
    return start
