from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol

from app.container import Container
from app.factory import create_app
from app.settings import Settings
from tests.support import SECRET, make_repo


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "workspace"
    make_repo(root / "repo")
    return root


@pytest.fixture
def make_settings(workspace: Path) -> Callable[..., Settings]:
    def build(**sections: Any) -> Settings:
        values: dict[str, Any] = {
            "auth": {"jwt_secret": SECRET},
            "tools": {"workspace_root": str(workspace)},
            "stream": {"heartbeat_seconds": 15},
        }
        for name, section in sections.items():
            values[name] = {**values.get(name, {}), **section}
        return Settings(**values)

    return build


@pytest.fixture
def container(make_settings: Callable[..., Settings]) -> Container:
    return Container(settings=make_settings())


@pytest.fixture
async def app(container: Container) -> AsyncIterator[Quart]:
    application = create_app(container.settings(), container)
    async with application.test_app() as test_app:
        yield test_app.app  # type: ignore[attr-defined]


@pytest.fixture
def client(app: Quart) -> TestClientProtocol:
    return app.test_client()
