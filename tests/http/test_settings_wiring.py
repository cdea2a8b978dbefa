"""Settings that only adapters read reach them through the container (app/settings.py is the one
place their defaults are written; the adapters have none of their own)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from app.container import Container


@pytest.mark.asyncio
async def test_the_follow_and_readiness_settings_reach_their_adapters(make_settings: Callable[..., Any]) -> None:
    container = Container(settings=make_settings(events={"follow_idle_ms": 250, "follow_page": 7},
                                                 redis={"health_timeout_seconds": 0.25}))

    follower = container.run_follower()
    probe = container.health_probe()

    assert (follower._block_seconds, follower._page) == (0.25, 7)
    assert probe._timeout_seconds == 0.25
    await container.closing().aclose()
