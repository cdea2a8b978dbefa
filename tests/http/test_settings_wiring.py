"""Settings that only adapters read reach them through the container (app/settings.py is the one
place their defaults are written; the adapters have none of their own)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from app.container import Container


@pytest.mark.asyncio
async def test_settings_read_only_by_adapters_reach_them(make_settings: Callable[..., Any]) -> None:
    events = {"follow_idle_ms": 250, "follow_page": 7, "active_ttl_seconds": 900}
    container = Container(settings=make_settings(events=events, redis={"health_timeout_seconds": 0.25}))

    follower = container.run_follower()
    probe = container.health_probe()
    event_log = container.event_log()

    assert (follower._block_seconds, follower._page) == (0.25, 7)
    assert probe._timeout_seconds == 0.25
    assert event_log._active_ttl_arg == b"900"
    await container.closing().aclose()
