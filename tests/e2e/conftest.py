from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.aura_process import AuraProcess
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
